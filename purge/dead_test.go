package purge_test

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/purge"
	"github.com/pgcache/pgcache/testenv"
)

// TestDeadServerUnderLoad: one of two real memcached servers is stopped
// (SIGSTOP: it keeps its data, as a server behind a partition or a hung
// host does) for 45 s while batches come at 150/s, each with keys on
// both servers. The live server's keys must keep being purged all along
// (p99 within 1 s, none later than 5 s, checked every 200 ms): the
// dead server's keys do not hold the live server's. The dead server's keys are recorded in the
// JetStream backlog, so every batch gets acked; the purger is then
// restarted, the server resumed, and every one of its keys must be
// deleted from the backlog by the new purger.
func TestDeadServerUnderLoad(t *testing.T) {
	const (
		outage   = 45 * time.Second
		round    = 200 * time.Millisecond
		perRound = 30 // 150 batches/s
		// Live keys are checked every round (a check that fails, on a
		// machine too busy to answer in time, is retried next round).
		// These bounds tell a stall from a busy machine, not a speed:
		// the old purger held live keys for the whole outage (37 to
		// 46 s in issue 13); the latency itself is logged (p99 about
		// 0.3 s on a quiet machine, 1 to 2 s with other tests running).
		maxLiveP99 = 5 * time.Second
		maxLive    = 15 * time.Second
	)
	env := testenv.New(t, testenv.Options{NoPostgres: true}) // two DCs: JetStream wants its gateway peer
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	log := zaptest.NewLogger(t)
	dc := env.DCs[0]
	nc, err := nats.Connect(dc.NATS.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	pcfg := mcpool.DefaultConfig()
	pcfg.Servers = dc.MemcachedAddrs()
	pcfg.Timeout = 500 * time.Millisecond
	pool, err := mcpool.New(pcfg, log.Named("pool"))
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	const dead = 0
	live := 1

	// Keys by server: batch i has one key on the dead server and two on
	// the live one.
	keysOn := func(server, n int, prefix string) []string {
		var out []string
		for i := 0; len(out) < n; i++ {
			if k := fmt.Sprintf("%s%d", prefix, i); pool.Pick(k) == server {
				out = append(out, k)
			}
		}
		return out
	}
	batches := int(outage/round) * perRound
	deadKeys := keysOn(dead, batches, "d")
	liveKeys := keysOn(live, 2*batches, "l")
	setAll := func(keys []string) {
		t.Helper()
		for _, k := range keys {
			if _, err := pool.MetaSet(ctx, k, []byte("stale"), mcpool.SetOptions{}); err != nil {
				t.Fatalf("set %s: %v", k, err)
			}
		}
	}
	setAll(deadKeys)

	newBacklog := func() purge.Backlog {
		b, err := purge.NewJetStreamBacklog(js, purge.BacklogConfig{DC: dc.Name})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	cfg := purge.Config{DC: dc.Name, RetryMin: 10 * time.Millisecond, RetryMax: 200 * time.Millisecond, RecordAfter: time.Second}
	p := newPurger(t, cfg, pool, nil)
	p.WithBacklog(newBacklog())
	run(t, ctx, p)

	if err := dc.Memcached[dead].Pause(); err != nil {
		t.Fatal(err)
	}
	resumed := false
	defer func() {
		if !resumed {
			_ = dc.Memcached[dead].Resume()
		}
	}()
	begin := time.Now()

	// Live keys handed to the purger and not yet seen gone, and the time
	// from hand-over to seen gone of the others (to a round's precision).
	type handed struct {
		key string
		at  time.Time
	}
	var outstanding []handed
	var lat []time.Duration
	check := func() {
		t.Helper()
		if len(outstanding) == 0 {
			return
		}
		keys := make([]string, len(outstanding))
		for i, h := range outstanding {
			keys[i] = h.key
		}
		resps, errs := pool.MetaGetMulti(ctx, keys)
		now := time.Now()
		left := outstanding[:0]
		for i, resp := range resps {
			if errs[i] == nil && resp.Status == mcpool.StatusEN {
				lat = append(lat, now.Sub(outstanding[i].at))
				continue
			}
			if age := now.Sub(outstanding[i].at); age > maxLive {
				t.Fatalf("%s into the outage: live-server key %s still cached %s after its batch: the dead server holds up the live one",
					now.Sub(begin).Round(time.Millisecond), keys[i], age.Round(time.Millisecond))
			}
			left = append(left, outstanding[i])
		}
		outstanding = left
	}
	var acks []*fakeAck
	var maxPending float64
	begin = time.Now()
	tick := time.NewTicker(round)
	defer tick.Stop()
	for r := 0; r*perRound < batches; r++ {
		check()
		lk := liveKeys[2*r*perRound : 2*(r+1)*perRound]
		setAll(lk)
		for i := 0; i < perRound; i++ {
			n := r*perRound + i
			a := newAck()
			acks = append(acks, a)
			now := time.Now()
			handle(t, ctx, p, &bus.Batch{CommitLSN: uint64(n + 1), CommitTime: now, Keys: []string{lk[2*i], deadKeys[n], lk[2*i+1]}}, a)
			outstanding = append(outstanding, handed{lk[2*i], now}, handed{lk[2*i+1], now})
		}
		if st := p.Stats()[dead]; float64(st.Pending) > maxPending {
			maxPending = float64(st.Pending)
		}
		<-tick.C
	}
	for deadline := time.Now().Add(maxLive); len(outstanding) > 0 && time.Now().Before(deadline); <-tick.C {
		check()
	}
	check()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	p50, p99, worst := lat[len(lat)/2], lat[len(lat)*99/100], lat[len(lat)-1]
	t.Logf("live-server keys seen gone after (checked every %s): p50 %s, p99 %s, max %s", round,
		p50.Round(time.Millisecond), p99.Round(time.Millisecond), worst.Round(time.Millisecond))
	if p99 > maxLiveP99 {
		t.Errorf("p99 of live-server keys' purge %s; want at most %s", p99, maxLiveP99)
	}
	t.Logf("%d batches in %s with server %s stopped; its pending keys peaked at %.0f", batches, time.Since(begin).Round(time.Millisecond), pool.Addr(dead), maxPending)

	// Every batch is acked: its dead key is recorded in the backlog.
	for i, a := range acks {
		waitAck(t, ctx, a, fmt.Sprintf("batch %d", i))
	}
	st := p.Stats()
	if st[dead].Pending != int64(batches) || !st[dead].Down || st[dead].OldestAge < outage/2 {
		t.Errorf("stopped server's stats %+v; want %d pending, down, oldest at least %s", st[dead], batches, outage/2)
	}
	if st[live].Pending != 0 || st[live].Down {
		t.Errorf("live server's stats %+v; want nothing pending", st[live])
	}

	// Restart the purger, then bring the server back: the new purger
	// finds the backlog and applies it.
	p.Close()
	p2 := newPurger(t, cfg, pool, nil)
	p2.WithBacklog(newBacklog())
	run(t, ctx, p2)
	eventually(t, ctx, "the new purger loads the backlog", func() bool { return p2.Stats()[dead].Pending == int64(batches) })
	if err := dc.Memcached[dead].Resume(); err != nil {
		t.Fatal(err)
	}
	resumed = true
	back := time.Now()
	eventually(t, ctx, "the backlog applied", func() bool { s := p2.Stats()[dead]; return s.Pending == 0 && !s.Down })
	t.Logf("backlog of %d keys applied %s after the server resumed", batches, time.Since(back).Round(time.Millisecond))
	resps, errs := pool.MetaGetMulti(ctx, deadKeys)
	var left []string
	for i, resp := range resps {
		if errs[i] != nil {
			t.Fatalf("get %s: %v", deadKeys[i], errs[i])
		}
		if resp.Status != mcpool.StatusEN {
			left = append(left, deadKeys[i])
		}
	}
	sort.Strings(left)
	if len(left) > 0 {
		t.Fatalf("%d of %d keys of the stopped server still cached after it returned (e.g. %s)", len(left), len(deadKeys), left[0])
	}
}

// TestJetStreamBacklog: records, totals, the flush mark, replay in order
// and trim, read back by a second instance (a restarted purger).
func TestJetStreamBacklog(t *testing.T) {
	env := testenv.New(t, testenv.Options{NoPostgres: true, MemcachedPerDC: -1})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	nc, err := nats.Connect(env.DCs[0].NATS.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	b1, err := purge.NewJetStreamBacklog(js, purge.BacklogConfig{DC: "dc1"})
	if err != nil {
		t.Fatal(err)
	}
	const srv = "127.0.0.1:11211"
	if st, err := b1.Load(ctx, srv); err != nil || st.Keys != 0 || st.Last != 0 {
		t.Fatalf("empty backlog: got %+v, %v; want nothing", st, err)
	}
	big := make([]string, 3000) // more than one record of 256 KiB
	for i := range big {
		big[i] = fmt.Sprintf("key:%0100d", i)
	}
	if err := b1.Append(ctx, srv, []string{"a", "b\tc"}); err != nil {
		t.Fatal(err)
	}
	if err := b1.Append(ctx, srv, big); err != nil {
		t.Fatal(err)
	}
	if err := b1.Append(ctx, "other:1", []string{"x"}); err != nil {
		t.Fatal(err)
	}
	b2, _ := purge.NewJetStreamBacklog(js, purge.BacklogConfig{DC: "dc1"})
	st, err := b2.Load(ctx, srv)
	if err != nil {
		t.Fatal(err)
	}
	wantBytes := int64(1 + 3 + 3000*104)
	if st.Keys != 3002 || st.Bytes != wantBytes || st.Oldest.IsZero() || st.Flush {
		t.Fatalf("state %+v; want 3002 keys, %d bytes, an oldest time, no flush", st, wantBytes)
	}
	var got []string
	upTo, err := b1.Replay(ctx, srv, func(keys []string) error { got = append(got, keys...); return nil })
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3002 || got[0] != "a" || got[1] != "b\tc" || got[3001] != big[2999] {
		t.Fatalf("replayed %d keys (first %q); want the 3002 in order", len(got), got[:2])
	}
	// A flush mark appended after the replay began stays past the trim.
	if err := b2.MarkFlush(ctx, srv); err != nil {
		t.Fatal(err)
	}
	if err := b1.Trim(ctx, srv, upTo); err != nil {
		t.Fatal(err)
	}
	st, err = b1.Load(ctx, srv)
	if err != nil || !st.Flush {
		t.Fatalf("after MarkFlush and a trim of the keys: %+v, %v; want the flush mark", st, err)
	}
	// A replay stops before the mark: the flush replaces the keys after it.
	if err := b1.Append(ctx, srv, []string{"after"}); err != nil {
		t.Fatal(err)
	}
	got = nil
	if _, err := b1.Replay(ctx, srv, func(keys []string) error { got = append(got, keys...); return nil }); err != nil || len(got) != 0 {
		t.Fatalf("replay with a flush mark first: %v, %v; want nothing", got, err)
	}
	if err := b1.Trim(ctx, srv, st.Last+1); err != nil {
		t.Fatal(err)
	}
	if st, err := b2.Load(ctx, srv); err != nil || st.Keys != 0 || st.Flush {
		t.Fatalf("after Trim: %+v, %v; want empty", st, err)
	}
	if st, _ := b2.Load(ctx, "other:1"); st.Keys != 1 {
		t.Errorf("another server's backlog after the trim: %+v; want its 1 key", st)
	}
}

// lagGate is a gate whose replica lags until set moves it: Wait gives up
// at once, WaitReplay waits for the position.
type lagGate struct {
	mu       sync.Mutex
	replayed uint64
	moved    chan struct{}
}

func newLagGate() *lagGate { return &lagGate{moved: make(chan struct{})} }

func (g *lagGate) Wait(context.Context, uint64, uint64) error { return purge.ErrGateTimeout }

func (g *lagGate) WaitReplay(ctx context.Context, commit, end uint64) error {
	need := commit + 1
	if end > commit {
		need = end
	}
	for {
		g.mu.Lock()
		ok, ch := g.replayed >= need, g.moved
		g.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (g *lagGate) set(lsn uint64) {
	g.mu.Lock()
	g.replayed = lsn
	close(g.moved)
	g.moved = make(chan struct{})
	g.mu.Unlock()
}

// TestRePurgeSurvivesRestart: a batch purged early (gate timed out) is
// recorded for its second purge before it is acked; a purger restarted
// while the replica still lags finds it and purges it again once the
// replica replays the commit, then trims the record.
func TestRePurgeSurvivesRestart(t *testing.T) {
	env := testenv.New(t, testenv.Options{NoPostgres: true, MemcachedPerDC: -1})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	nc, err := nats.Connect(env.DCs[0].NATS.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	newBacklog := func() *purge.JetStreamBacklog {
		b, err := purge.NewJetStreamBacklog(js, purge.BacklogConfig{DC: "dc1"})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	f := newFake(2)
	gate := newLagGate()
	m := purge.NewMetrics(nil, "dc1")
	p, err := purge.New(purge.Config{DC: "dc1"}, f, gate, m, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	p.WithBacklog(newBacklog())
	run(t, ctx, p)
	a := newAck()
	handle(t, ctx, p, &bus.Batch{CommitLSN: 100, EndLSN: 120, Keys: []string{"k1", "s1:k2"}}, a)
	waitAck(t, ctx, a, "batch past the gate")
	if f.count("k1") != 1 || f.count("s1:k2") != 1 {
		t.Fatalf("early purge applied k1 %d and s1:k2 %d times; want 1 each", f.count("k1"), f.count("s1:k2"))
	}
	p.Close()

	m2 := purge.NewMetrics(nil, "dc1")
	p2, err := purge.New(purge.Config{DC: "dc1"}, f, gate, m2, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	p2.WithBacklog(newBacklog())
	run(t, ctx, p2)
	gate.set(119)
	gate.set(120)
	eventually(t, ctx, "second purge after the restart", func() bool { return f.count("k1") == 2 && f.count("s1:k2") == 2 })
	eventually(t, ctx, "the record trimmed", func() bool {
		n := 0
		if err := newBacklog().LoadRePurge(ctx, func(uint64, uint64, uint64, []string) { n++ }); err != nil {
			t.Fatal(err)
		}
		return n == 0
	})
	if got := counterValue(t, m2.RePurged); got != 2 {
		t.Errorf("re-purged %v keys; want 2", got)
	}
}
