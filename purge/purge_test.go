package purge_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/purge"
	"github.com/pgcache/pgcache/testenv"
)

// fakeDeleter fails keys listed in down until they are removed from it.
type fakeDeleter struct {
	mu      sync.Mutex
	down    map[string]bool
	applied map[string]int
	stale   map[string]time.Duration
}

func newFake() *fakeDeleter {
	return &fakeDeleter{down: map[string]bool{}, applied: map[string]int{}, stale: map[string]time.Duration{}}
}

var errDown = errors.New("server down")

func (f *fakeDeleter) Delete(_ context.Context, key string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.down[key] {
		return errDown
	}
	f.applied[key]++
	return nil
}

func (f *fakeDeleter) MarkStale(_ context.Context, key string, ttl time.Duration) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stale[key] = ttl
	return nil
}

func (f *fakeDeleter) setDown(key string, down bool) {
	f.mu.Lock()
	f.down[key] = down
	f.mu.Unlock()
}

func (f *fakeDeleter) count(key string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.applied[key]
}

type fakeAck struct {
	acked    chan struct{}
	progress atomic.Int32
}

func newAck() *fakeAck { return &fakeAck{acked: make(chan struct{})} }

func (a *fakeAck) Ack(context.Context) error { close(a.acked); return nil }
func (a *fakeAck) InProgress() error         { a.progress.Add(1); return nil }

func (a *fakeAck) isAcked() bool {
	select {
	case <-a.acked:
		return true
	default:
		return false
	}
}

func newPurger(t *testing.T, ctx context.Context, cfg purge.Config, del purge.Deleter, gate purge.Waiter) *purge.Purger {
	t.Helper()
	p, err := purge.New(ctx, cfg, del, gate, nil, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  purge.Config
	}{
		{"no dc", purge.Config{Mode: "delete"}},
		{"bad mode", purge.Config{DC: "dc1", Mode: "evict"}},
		{"retry order", purge.Config{DC: "dc1", RetryMin: time.Second, RetryMax: time.Millisecond}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := purge.New(context.Background(), tc.cfg, newFake(), nil, nil, zaptest.NewLogger(t)); err == nil {
				t.Error("got nil error; want one")
			}
		})
	}
}

// TestAckOnlyWhenAllApplied: a key whose server is down keeps its batch
// unacked (and alive with progress signals) while other batches go on.
func TestAckOnlyWhenAllApplied(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	f := newFake()
	f.setDown("dead:1", true)
	cfg := purge.Config{DC: "dc1", RetryMin: time.Millisecond, RetryMax: 5 * time.Millisecond, Progress: 5 * time.Millisecond}
	p := newPurger(t, ctx, cfg, f, nil)

	blocked, healthy := newAck(), newAck()
	p.Handle(&bus.Batch{CommitLSN: 1, Keys: []string{"a", "dead:1", "b"}}, blocked)
	p.Handle(&bus.Batch{CommitLSN: 2, Keys: []string{"c", "d"}}, healthy)
	select {
	case <-healthy.acked:
	case <-ctx.Done():
		t.Fatal("healthy batch never acked while another batch's server was down")
	}
	for f.count("a") == 0 || f.count("b") == 0 {
		time.Sleep(time.Millisecond)
	}
	if blocked.isAcked() {
		t.Fatal("batch acked with a key not applied")
	}
	for blocked.progress.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	f.setDown("dead:1", false)
	select {
	case <-blocked.acked:
	case <-ctx.Done():
		t.Fatal("batch not acked after its server came back")
	}
	p.Wait()
	if got := f.count("dead:1"); got != 1 {
		t.Errorf("dead:1 applied %d times; want 1", got)
	}
}

// TestHardStopDoesNotAck: cancelling leaves an unfinished batch unacked,
// so JetStream delivers it again.
func TestHardStopDoesNotAck(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	f := newFake()
	f.setDown("k", true)
	p := newPurger(t, ctx, purge.Config{DC: "dc1", RetryMin: time.Millisecond, RetryMax: 2 * time.Millisecond}, f, nil)
	a := newAck()
	p.Handle(&bus.Batch{CommitLSN: 1, Keys: []string{"k"}}, a)
	cancel()
	p.Wait()
	if a.isAcked() {
		t.Error("batch acked after a hard stop with its key unapplied")
	}
}

func TestStaleMode(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f := newFake()
	p := newPurger(t, ctx, purge.Config{DC: "dc1", Mode: purge.ModeStale, StaleTTL: 7 * time.Second}, f, nil)
	a := newAck()
	p.Handle(&bus.Batch{CommitLSN: 1, Keys: []string{"x"}}, a)
	p.Wait()
	if !a.isAcked() {
		t.Fatal("not acked")
	}
	if got := f.stale["x"]; got != 7*time.Second {
		t.Errorf("stale ttl %s; want 7s", got)
	}
	if f.count("x") != 0 {
		t.Error("stale mode deleted the key")
	}
}

// gateFunc is a Waiter from a function.
type gateFunc func(ctx context.Context, commit, end uint64) error

func (g gateFunc) Wait(ctx context.Context, commit, end uint64) error { return g(ctx, commit, end) }

func TestGateHoldsPurge(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f := newFake()
	release := make(chan struct{})
	gate := gateFunc(func(ctx context.Context, _, _ uint64) error {
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	p := newPurger(t, ctx, purge.Config{DC: "dc2"}, f, gate)
	a := newAck()
	p.Handle(&bus.Batch{CommitLSN: 1, Keys: []string{"g"}}, a)
	// Nothing may be applied before the gate opens: check after giving
	// the purger every chance (it has nothing else to do).
	for i := 0; i < 50; i++ {
		if f.count("g") != 0 {
			t.Fatal("key purged before the gate opened")
		}
		time.Sleep(time.Millisecond)
	}
	close(release)
	p.Wait()
	if f.count("g") != 1 || !a.isAcked() {
		t.Error("key not purged and acked after the gate opened")
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
	p := newPurger(t, ctx, purge.Config{DC: dc.Name, RetryMin: 5 * time.Millisecond, RetryMax: 50 * time.Millisecond}, pool, gate)

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
	p.Handle(&bus.Batch{CommitLSN: lsn - 1, EndLSN: lsn, Keys: []string{"gated"}}, a)
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
	p.Handle(&bus.Batch{CommitLSN: curLSN - 1, Keys: onDead}, deadAck)
	p.Handle(&bus.Batch{CommitLSN: curLSN - 1, Keys: onLive}, liveAck)
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
	p.Wait()
}
