package purge_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/purge"
	"github.com/pgcache/pgcache/testenv"
)

// TestLaggingReplica: the replica's replay is paused past the gate's
// MaxWait. The purge goes ahead, a reader then refills the key from the
// paused replica (the old row), and once replay resumes the key must be
// purged again, so the stale refill does not outlive the lag. Meanwhile
// the batches that arrive during the pause share the first batch's
// MaxWait instead of each waiting its own in turn: with 4 batches in
// flight and a 1 s MaxWait, 200 batches would take 50 s one wait after
// another.
func TestLaggingReplica(t *testing.T) {
	const (
		maxWait = time.Second
		batches = 200
	)
	env := testenv.New(t, testenv.Options{DCs: 1, NoNATS: true, MemcachedPerDC: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	log := zaptest.NewLogger(t)
	dc := env.DCs[0]
	pcfg := mcpool.DefaultConfig()
	pcfg.Servers = dc.MemcachedAddrs()
	pool, err := mcpool.New(pcfg, log.Named("pool"))
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	gate, err := purge.NewGate(purge.GateConfig{DSN: dc.Replica.DSN(""), MaxWait: maxWait}, log.Named("gate"))
	if err != nil {
		t.Fatal(err)
	}
	gctx, stopGate := context.WithCancel(ctx)
	gateDone := make(chan struct{})
	go func() {
		defer close(gateDone)
		_ = gate.Run(gctx)
	}()
	defer func() {
		stopGate()
		<-gateDone
	}()
	m := purge.NewMetrics(nil, dc.Name)
	p, err := purge.New(purge.Config{DC: dc.Name, MaxBatches: 4}, pool, gate, m, log)
	if err != nil {
		t.Fatal(err)
	}
	run(t, ctx, p)

	if err := env.Primary.Exec(ctx, "CREATE TABLE lag (id int PRIMARY KEY, v text); INSERT INTO lag VALUES (1, 'old')"); err != nil {
		t.Fatal(err)
	}
	lsn, err := env.Primary.CurrentLSN(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := dc.Replica.WaitReplayed(ctx, lsn); err != nil {
		t.Fatal(err)
	}
	// read is a reader's cache-aside refill from the DC's replica.
	read := func() string {
		t.Helper()
		var v string
		if err := dc.Replica.QueryRow(ctx, "SELECT v FROM lag WHERE id = 1", &v); err != nil {
			t.Fatal(err)
		}
		if _, err := pool.MetaSet(ctx, "lag:1", []byte(v), mcpool.SetOptions{}); err != nil {
			t.Fatal(err)
		}
		return v
	}
	cached := func(key string) (string, bool) {
		t.Helper()
		r, err := pool.MetaGet(ctx, key, "v")
		if err != nil {
			t.Fatal(err)
		}
		return string(r.Value), r.Status == mcpool.StatusVA
	}
	read()

	if err := dc.Replica.PauseReplay(ctx); err != nil {
		t.Fatal(err)
	}
	resumed := false
	defer func() {
		if !resumed {
			_ = dc.Replica.ResumeReplay(context.Background())
		}
	}()
	if err := env.Primary.Exec(ctx, "UPDATE lag SET v = 'new' WHERE id = 1"); err != nil {
		t.Fatal(err)
	}
	text, _ := env.Primary.CurrentLSN(ctx)
	end, _ := purge.ParseLSN(text)

	// The first batch waits MaxWait, then goes ahead.
	a := newAck()
	begin := time.Now()
	handle(t, ctx, p, &bus.Batch{CommitLSN: end - 1, EndLSN: end, Keys: []string{"lag:1"}}, a)
	waitAck(t, ctx, a, "batch past the gate's max wait")
	if waited := time.Since(begin); waited < maxWait {
		t.Fatalf("purged after %s with replay paused; want at least the gate's %s", waited, maxWait)
	}
	if _, ok := cached("lag:1"); ok {
		t.Fatal("key still cached after the early purge")
	}
	// A reader refills from the paused replica: the old row.
	if v := read(); v != "old" {
		t.Fatalf("replica read %q while paused; want old", v)
	}

	// More batches during the pause share that wait.
	begin = time.Now()
	var acks []*fakeAck
	for i := 0; i < batches; i++ {
		k := fmt.Sprintf("lag:b%d", i)
		if _, err := pool.MetaSet(ctx, k, []byte("old"), mcpool.SetOptions{}); err != nil {
			t.Fatal(err)
		}
		a := newAck()
		acks = append(acks, a)
		handle(t, ctx, p, &bus.Batch{CommitLSN: end - 1, EndLSN: end, Keys: []string{k}}, a)
	}
	for i, a := range acks {
		waitAck(t, ctx, a, fmt.Sprintf("batch %d during the pause", i))
	}
	took := time.Since(begin)
	t.Logf("%d batches through a paused replica in %s: %.0f batches/s (one at a time each waiting %s: %.0f s)",
		batches, took.Round(time.Millisecond), float64(batches)/took.Seconds(), maxWait, float64(batches)/4*maxWait.Seconds())
	if took > 10*maxWait {
		t.Errorf("%d batches took %s with replay paused; want them to share one max wait (well under %s)", batches, took, 10*maxWait)
	}
	if v, ok := cached("lag:1"); !ok || v != "old" {
		t.Fatalf("cache holds %q (%v) before resume; want the stale refill", v, ok)
	}

	if err := dc.Replica.ResumeReplay(ctx); err != nil {
		t.Fatal(err)
	}
	resumed = true
	eventually(t, ctx, "the stale refill purged again after replay resumed", func() bool {
		_, ok := cached("lag:1")
		return !ok
	})
	if v := read(); v != "new" {
		t.Errorf("replica read %q after resume; want new", v)
	}
	eventually(t, ctx, "every early batch purged again", func() bool { return counterValue(t, m.RePurged) == batches+1 })
	if gate.Lagging() {
		t.Error("gate still lagging after the replica caught up")
	}
}
