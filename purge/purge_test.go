package purge_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/purge"
	"github.com/pgcache/pgcache/testenv"
)

func newPurger(t *testing.T, cfg purge.Config, del purge.Deleter, gate purge.Waiter) *purge.Purger {
	t.Helper()
	p, err := purge.New(cfg, del, gate, nil, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// run starts p.Run under ctx and closes p when the test ends; the
// returned func waits for Run's result.
func run(t *testing.T, ctx context.Context, p *purge.Purger) func() error {
	t.Helper()
	done := make(chan struct{})
	var err error
	go func() {
		err = p.Run(ctx)
		close(done)
	}()
	t.Cleanup(func() {
		p.Close()
		<-done
	})
	return func() error {
		<-done
		return err
	}
}

func handle(t *testing.T, ctx context.Context, p *purge.Purger, b *bus.Batch, a purge.Acker) {
	t.Helper()
	if err := p.Handle(ctx, b, a); err != nil {
		t.Fatalf("Handle: %v", err)
	}
}

// waitAck waits for a's ack or fails the test.
func waitAck(t *testing.T, ctx context.Context, a *fakeAck, what string) {
	t.Helper()
	select {
	case <-a.acked:
	case <-ctx.Done():
		t.Fatalf("%s: not acked", what)
	}
}

// eventually polls cond until it holds or ctx ends.
func eventually(t *testing.T, ctx context.Context, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-tick.C:
		case <-ctx.Done():
			t.Fatalf("never happened: %s", what)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  purge.Config
	}{
		{"no dc", purge.Config{Mode: "delete"}},
		{"bad mode", purge.Config{DC: "dc1", Mode: "evict"}},
		{"retry order", purge.Config{DC: "dc1", RetryMin: time.Second, RetryMax: time.Millisecond}},
		{"tiny backlog", purge.Config{DC: "dc1", MaxBacklogBytes: 10}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := purge.New(tc.cfg, newFake(1), nil, nil, zaptest.NewLogger(t))
			if !errors.Is(err, purge.ErrConfig) {
				t.Errorf("got %v; want purge.ErrConfig", err)
			}
		})
	}
	if _, err := purge.New(purge.Config{DC: "dc1"}, newFake(1), nil, nil, zaptest.NewLogger(t)); err != nil {
		t.Errorf("defaults: got %v; want nil", err)
	}
}

// TestAckOnlyWhenAllApplied: without a backlog, a key whose server is
// down keeps its batch unacked (and alive with progress signals), while
// batches and keys of the live server go on.
func TestAckOnlyWhenAllApplied(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	f := newFake(2)
	f.setDown(1, true)
	cfg := purge.Config{DC: "dc1", RetryMin: time.Millisecond, RetryMax: 5 * time.Millisecond, Progress: 5 * time.Millisecond}
	p := newPurger(t, cfg, f, nil)
	run(t, ctx, p)

	blocked, healthy := newAck(), newAck()
	handle(t, ctx, p, &bus.Batch{CommitLSN: 1, Keys: []string{"a", "s1:dead", "b"}}, blocked)
	handle(t, ctx, p, &bus.Batch{CommitLSN: 2, Keys: []string{"c", "d"}}, healthy)
	waitAck(t, ctx, healthy, "healthy batch while another batch's server was down")
	eventually(t, ctx, "a and b applied", func() bool { return f.count("a") == 1 && f.count("b") == 1 })
	eventually(t, ctx, "progress signals", func() bool { return blocked.progress.Load() > 0 })
	if blocked.isAcked() {
		t.Fatal("batch acked with a key not applied")
	}
	f.setDown(1, false)
	waitAck(t, ctx, blocked, "batch after its server came back")
	if got := f.count("s1:dead"); got != 1 {
		t.Errorf("s1:dead applied %d times; want 1", got)
	}
	if got := f.count("a"); got != 1 {
		t.Errorf("a applied %d times; want 1 (a retry must resend only the failed keys)", got)
	}
}

// TestHardStopDoesNotAck: cancelling Run's and Handle's ctx leaves an
// unfinished batch unacked, so JetStream delivers it again.
func TestHardStopDoesNotAck(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	f := newFake(1)
	f.setDown(0, true)
	p := newPurger(t, purge.Config{DC: "dc1", RetryMin: time.Millisecond, RetryMax: 2 * time.Millisecond}, f, nil)
	done := run(t, ctx, p)
	a := newAck()
	handle(t, ctx, p, &bus.Batch{CommitLSN: 1, Keys: []string{"k"}}, a)
	cancel()
	if err := done(); err != nil {
		t.Errorf("Run after a hard stop: got %v; want nil", err)
	}
	p.Close()
	if a.isAcked() {
		t.Error("batch acked after a hard stop with its key unapplied")
	}
}

// TestDrain: the soft stop finishes every batch received (acked), then
// Run returns and Handle refuses more; Close after it is harmless, twice.
func TestDrain(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f := newFake(2)
	f.setDown(1, true)
	p := newPurger(t, purge.Config{DC: "dc1", RetryMin: time.Millisecond, RetryMax: 2 * time.Millisecond}, f, nil)
	done := run(t, ctx, p)
	a := newAck()
	handle(t, ctx, p, &bus.Batch{CommitLSN: 1, Keys: []string{"x", "s1:y"}}, a)
	drained := make(chan error, 1)
	go func() { drained <- p.Drain(ctx) }()
	eventually(t, ctx, "x applied", func() bool { return f.count("x") == 1 })
	select {
	case <-drained:
		t.Fatal("Drain returned with a batch unfinished")
	default:
	}
	f.setDown(1, false)
	if err := <-drained; err != nil {
		t.Fatalf("Drain: %v", err)
	}
	if !a.isAcked() {
		t.Error("Drain returned before the batch was acked")
	}
	if err := p.Handle(ctx, &bus.Batch{CommitLSN: 2, Keys: []string{"z"}}, newAck()); !errors.Is(err, purge.ErrClosed) {
		t.Errorf("Handle after Drain: got %v; want ErrClosed", err)
	}
	if err := done(); err != nil {
		t.Errorf("Run after Drain: got %v; want nil", err)
	}
	p.Close()
	p.Close()
	if f.count("z") != 0 {
		t.Error("a batch handed in after Drain was applied")
	}
}

// TestDrainTimeout: a drain whose ctx ends first reports it and leaves
// the batch unacked.
func TestDrainTimeout(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f := newFake(1)
	f.setDown(0, true)
	p := newPurger(t, purge.Config{DC: "dc1", RetryMin: time.Millisecond, RetryMax: 2 * time.Millisecond}, f, nil)
	run(t, ctx, p)
	a := newAck()
	handle(t, ctx, p, &bus.Batch{CommitLSN: 1, Keys: []string{"k"}}, a)
	dctx, dcancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer dcancel()
	if err := p.Drain(dctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Drain: got %v; want its ctx's deadline", err)
	}
	p.Close()
	if a.isAcked() {
		t.Error("batch acked with its key unapplied")
	}
}

func TestStaleMode(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f := newFake(1)
	p := newPurger(t, purge.Config{DC: "dc1", Mode: purge.ModeStale, StaleTTL: 7 * time.Second}, f, nil)
	run(t, ctx, p)
	a := newAck()
	handle(t, ctx, p, &bus.Batch{CommitLSN: 1, Keys: []string{"x"}}, a)
	waitAck(t, ctx, a, "stale batch")
	f.mu.Lock()
	ttl := f.stale["x"]
	f.mu.Unlock()
	if ttl != 7*time.Second {
		t.Errorf("stale ttl %s; want 7s", ttl)
	}
	if f.count("x") != 0 {
		t.Error("stale mode deleted the key")
	}
}

// TestInvalidKeys: a batch with keys memcached cannot take applies its
// valid keys, counts the others by reason, and is acked (never retried).
func TestInvalidKeys(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f := newFake(1)
	m := purge.NewMetrics(nil, "dc1")
	p, err := purge.New(purge.Config{DC: "dc1"}, f, nil, m, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	run(t, ctx, p)
	a := newAck()
	long := strings.Repeat("<", 251)
	handle(t, ctx, p, &bus.Batch{CommitLSN: 1, Keys: []string{"ok1", "", long, "has space", "nl\nkey", "nul\x00", "ok2", "tab\tok"}}, a)
	waitAck(t, ctx, a, "batch with invalid keys")
	for _, k := range []string{"ok1", "ok2", "tab\tok"} {
		if f.count(k) != 1 {
			t.Errorf("valid key %q applied %d times; want 1", k, f.count(k))
		}
	}
	for reason, want := range map[string]float64{"empty": 1, "too_long": 1, "invalid_char": 3} {
		if got := counterValue(t, m.InvalidKeys.WithLabelValues(reason)); got != want {
			t.Errorf("invalid keys %s: got %v; want %v", reason, got, want)
		}
	}
	// A batch of invalid keys only is acked too.
	b := newAck()
	handle(t, ctx, p, &bus.Batch{CommitLSN: 2, Keys: []string{"", "a b"}}, b)
	waitAck(t, ctx, b, "batch of invalid keys only")
}

// gateFunc is a Waiter from a function.
type gateFunc func(ctx context.Context, commit, end uint64) error

func (g gateFunc) Wait(ctx context.Context, commit, end uint64) error { return g(ctx, commit, end) }

func TestGateHoldsPurge(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f := newFake(1)
	entered, release := make(chan struct{}), make(chan struct{})
	gate := gateFunc(func(ctx context.Context, _, _ uint64) error {
		close(entered)
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	p := newPurger(t, purge.Config{DC: "dc2"}, f, gate)
	run(t, ctx, p)
	a := newAck()
	handle(t, ctx, p, &bus.Batch{CommitLSN: 1, Keys: []string{"g"}}, a)
	<-entered
	if f.count("g") != 0 {
		t.Fatal("key purged before the gate opened")
	}
	close(release)
	waitAck(t, ctx, a, "gated batch")
	if f.count("g") != 1 {
		t.Error("key not purged after the gate opened")
	}
}

// TestBacklogDownServer: with a backlog, keys of a server that keeps
// failing are recorded after RecordAfter and their batches acked, the
// live server's keys are not held, the per-server figures say who is
// behind by how much, and on return the backlog is applied and trimmed.
func TestBacklogDownServer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	f := newFake(2)
	f.setDown(1, true)
	bl := newMemBacklog()
	m := purge.NewMetrics(nil, "dc1")
	p, err := purge.New(purge.Config{DC: "dc1", RetryMin: time.Millisecond, RetryMax: 5 * time.Millisecond, RecordAfter: 20 * time.Millisecond}, f, nil, m, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	p.WithBacklog(bl)
	run(t, ctx, p)
	var acks []*fakeAck
	for i := 0; i < 20; i++ {
		a := newAck()
		acks = append(acks, a)
		handle(t, ctx, p, &bus.Batch{CommitLSN: uint64(i + 1), Keys: []string{fmt.Sprintf("live%d", i), fmt.Sprintf("s1:dead%d", i)}}, a)
	}
	for i, a := range acks {
		waitAck(t, ctx, a, fmt.Sprintf("batch %d (dead key recorded)", i))
	}
	if got := len(bl.keys("srv1")); got != 20 {
		t.Fatalf("backlog of srv1 holds %d keys; want 20", got)
	}
	st := p.Stats()
	if st[1].Pending != 20 || !st[1].Down || st[1].OldestAge <= 0 || st[1].BacklogBytes == 0 {
		t.Errorf("srv1 stats %+v; want 20 pending, down, an age and bytes", st[1])
	}
	if st[0].Pending != 0 || st[0].Down {
		t.Errorf("srv0 stats %+v; want nothing pending", st[0])
	}
	f.setDown(1, false)
	eventually(t, ctx, "backlog replayed and trimmed", func() bool {
		return len(bl.keys("srv1")) == 0 && f.count("s1:dead19") == 1 && !p.Stats()[1].Down
	})
	for i := 0; i < 20; i++ {
		if f.count(fmt.Sprintf("s1:dead%d", i)) != 1 {
			t.Errorf("s1:dead%d applied %d times; want 1", i, f.count(fmt.Sprintf("s1:dead%d", i)))
		}
	}
	if got := counterValue(t, m.Replayed.WithLabelValues("srv1")); got != 20 {
		t.Errorf("replayed %v; want 20", got)
	}
}

// TestBacklogOverflowFlushes: past MaxBacklogBytes the server is marked
// for a flush, which it gets when it returns, before keys go to it again;
// a new purger finds the mark (a restart in between).
func TestBacklogOverflowFlushes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	f := newFake(2)
	f.setDown(1, true)
	bl := newMemBacklog()
	cfg := purge.Config{DC: "dc1", RetryMin: time.Millisecond, RetryMax: 5 * time.Millisecond, RecordAfter: 10 * time.Millisecond, MaxBacklogBytes: 300}
	p := newPurger(t, cfg, f, nil)
	p.WithBacklog(bl)
	run(t, ctx, p)
	for i := 0; i < 10; i++ {
		a := newAck()
		handle(t, ctx, p, &bus.Batch{CommitLSN: uint64(i + 1), Keys: []string{"s1:" + strings.Repeat("k", 60) + fmt.Sprint(i)}}, a)
		waitAck(t, ctx, a, "batch for the down server")
	}
	if !p.Stats()[1].FlushPending {
		t.Fatal("backlog past its bound; want a flush pending")
	}
	p.Close()

	// A restarted purger finds the flush mark and flushes on return.
	p2 := newPurger(t, cfg, f, nil)
	p2.WithBacklog(bl)
	run(t, ctx, p2)
	eventually(t, ctx, "the restarted purger sees the flush mark", func() bool { return p2.Stats()[1].FlushPending })
	f.setDown(1, false)
	eventually(t, ctx, "server flushed", func() bool { return f.flushed(1) == 1 && !p2.Stats()[1].Down })
	if st := p2.Stats()[1]; st.FlushPending || st.Pending != 0 {
		t.Errorf("after the flush: %+v; want nothing pending", st)
	}
	a := newAck()
	handle(t, ctx, p2, &bus.Batch{CommitLSN: 20, Keys: []string{"s1:after"}}, a)
	waitAck(t, ctx, a, "batch after the flush")
	if f.count("s1:after") != 1 {
		t.Error("key after the flush not applied")
	}
}

// TestPurgeRealPool applies batches to real memcached servers through
// mcpool with a real replica's LSN gate: with replay paused the key stays,
// on resume it goes. One server down for a while: its keys are applied
// after it returns, and the other server's keys are not held up.
func TestPurgeRealPool(t *testing.T) {
	env := testenv.New(t, testenv.Options{DCs: 1, NoNATS: true})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	log := zaptest.NewLogger(t)
	dc := env.DCs[0]
	pcfg := mcpool.DefaultConfig()
	pcfg.Servers = dc.MemcachedAddrs()
	pool, err := mcpool.New(pcfg, log)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	gate, err := purge.NewGate(purge.GateConfig{DSN: dc.Replica.DSN("")}, log)
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = gate.Run(ctx) }()
	p := newPurger(t, purge.Config{DC: dc.Name, RetryMin: 5 * time.Millisecond, RetryMax: 50 * time.Millisecond}, pool, gate)
	run(t, ctx, p)

	set := func(key string) {
		t.Helper()
		if _, err := pool.MetaSet(ctx, key, []byte("v"), mcpool.SetOptions{}); err != nil {
			t.Fatalf("set %s: %v", key, err)
		}
	}
	exists := func(key string) bool {
		t.Helper()
		r, err := pool.MetaGet(ctx, key, "v")
		if err != nil {
			t.Fatalf("get %s: %v", key, err)
		}
		return r.Status == mcpool.StatusVA || r.Status == mcpool.StatusHD
	}

	// Gate: pause replay, commit, and the purge waits for replay.
	set("gated")
	if err := dc.Replica.PauseReplay(ctx); err != nil {
		t.Fatal(err)
	}
	if err := env.Primary.Exec(ctx, "CREATE TABLE g (id int)"); err != nil {
		t.Fatal(err)
	}
	lsnText, _ := env.Primary.CurrentLSN(ctx)
	lsn, _ := purge.ParseLSN(lsnText)
	a := newAck()
	handle(t, ctx, p, &bus.Batch{CommitLSN: lsn - 1, EndLSN: lsn, Keys: []string{"gated"}}, a)
	time.Sleep(300 * time.Millisecond) // give a wrong purger time to act; the check below cannot pass by luck
	if !exists("gated") {
		t.Fatal("key purged while the replica had not replayed its commit")
	}
	if err := dc.Replica.ResumeReplay(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-a.acked:
	case <-ctx.Done():
		t.Fatal("not purged after replay resumed")
	}
	if exists("gated") {
		t.Fatal("key still there after ack")
	}

	// One server down: keys on it wait, keys on the other go.
	var onDead, onLive []string
	for i := 0; len(onDead) < 20 || len(onLive) < 20; i++ {
		k := fmt.Sprintf("k%d", i)
		if pool.Pick(k) == 0 {
			onDead = append(onDead, k)
		} else {
			onLive = append(onLive, k)
		}
	}
	for _, k := range append(append([]string{}, onDead...), onLive...) {
		set(k)
	}
	if err := dc.Memcached[0].Kill(); err != nil {
		t.Fatal(err)
	}
	deadAck, liveAck := newAck(), newAck()
	cur, _ := dc.Replica.ReplayLSN(ctx)
	curLSN, _ := purge.ParseLSN(cur)
	handle(t, ctx, p, &bus.Batch{CommitLSN: curLSN - 1, Keys: onDead}, deadAck)
	handle(t, ctx, p, &bus.Batch{CommitLSN: curLSN - 1, Keys: onLive}, liveAck)
	select {
	case <-liveAck.acked:
	case <-ctx.Done():
		t.Fatal("live server's batch held up by a dead server")
	}
	for _, k := range onLive {
		if exists(k) {
			t.Errorf("%s still on the live server", k)
		}
	}
	if deadAck.isAcked() {
		t.Fatal("batch acked while its server was down")
	}
	// Bring it back: the pending deletes land and the batch is acked.
	if err := dc.Memcached[0].Start(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-deadAck.acked:
	case <-ctx.Done():
		t.Fatal("pending keys never applied after the server returned")
	}
}

// counterValue reads a counter.
func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(c); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil || len(mfs) != 1 || len(mfs[0].GetMetric()) != 1 {
		t.Fatalf("gather: %v", err)
	}
	return mfs[0].GetMetric()[0].GetCounter().GetValue()
}

// brokenBacklog is a memBacklog whose Load fails while broken is set.
type brokenBacklog struct {
	*memBacklog
	broken atomic.Bool
}

func (b *brokenBacklog) Load(ctx context.Context, server string) (purge.BacklogState, error) {
	if b.broken.Load() {
		return purge.BacklogState{}, errors.New("backlog unavailable")
	}
	return b.memBacklog.Load(ctx, server)
}

// TestBacklogUnreadable: a backlog that cannot be read at start does not
// stall purging; once it can be read, a down server's keys are recorded.
func TestBacklogUnreadable(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	f := newFake(2)
	bl := &brokenBacklog{memBacklog: newMemBacklog()}
	bl.broken.Store(true)
	p := newPurger(t, purge.Config{DC: "dc1", RetryMin: time.Millisecond, RetryMax: 5 * time.Millisecond, RecordAfter: 10 * time.Millisecond}, f, nil)
	p.WithBacklog(bl)
	run(t, ctx, p)
	a := newAck()
	handle(t, ctx, p, &bus.Batch{CommitLSN: 1, Keys: []string{"x", "s1:y"}}, a)
	waitAck(t, ctx, a, "batch while the backlog is unreadable")
	bl.broken.Store(false)
	f.setDown(1, true)
	b := newAck()
	handle(t, ctx, p, &bus.Batch{CommitLSN: 2, Keys: []string{"s1:z"}}, b)
	waitAck(t, ctx, b, "batch of a down server once the backlog is readable")
	if got := bl.keys("srv1"); len(got) != 1 || got[0] != "s1:z" {
		t.Errorf("backlog of srv1 %v; want [s1:z]", got)
	}
}

// TestMaxBytes: batches beyond MaxBytes wait in Handle until earlier
// ones finish; a batch larger than MaxBytes still goes, alone.
func TestMaxBytes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f := newFake(1)
	f.setDown(0, true)
	p := newPurger(t, purge.Config{DC: "dc1", MaxBytes: 400, RetryMin: time.Millisecond, RetryMax: 2 * time.Millisecond}, f, nil)
	run(t, ctx, p)
	// 64 + 4*(1+32) = 196 bytes each: two fit, the third waits.
	for i := 0; i < 2; i++ {
		handle(t, ctx, p, &bus.Batch{CommitLSN: uint64(i + 1), Keys: []string{"a", "b", "c", "d"}}, newAck())
	}
	hctx, hcancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer hcancel()
	if err := p.Handle(hctx, &bus.Batch{CommitLSN: 3, Keys: []string{"e", "f", "g", "h"}}, newAck()); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("third batch past MaxBytes: got %v; want it to wait (its ctx's deadline)", err)
	}
	f.setDown(0, false)
	big := newAck()
	handle(t, ctx, p, &bus.Batch{CommitLSN: 4, Keys: []string{strings.Repeat("x", 200), strings.Repeat("y", 200)}}, big)
	waitAck(t, ctx, big, "a batch larger than MaxBytes")
}
