package bus_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/testenv"
)

func TestLayoutStreams(t *testing.T) {
	single := bus.Layout{Base: bus.StreamConfig{Name: "INV", Placement: "dc1"}}
	if s := single.Stream("dc2"); s.Name != "INV" || s.Subject != "pgcache.invalidations" || s.Placement != "dc1" || len(s.Sources) != 0 {
		t.Errorf("single layout: got %+v; want the base stream", s)
	}
	if r, need := single.Remotes("dc1"); len(r) != 0 || need != 0 {
		t.Errorf("single layout remotes: got %d, need %d; want none", len(r), need)
	}
	if st := single.State("dc2"); len(st.Locations) != 1 || st.Locations[0].Bucket != bus.StateBucket || st.Pipeline != "INV" {
		t.Errorf("single layout state: got %+v", st)
	}

	geo := bus.Layout{Base: bus.StreamConfig{Name: "INV", Replicas: 3}, DCs: []string{"dc1", "dc2", "dc3"}}
	s := geo.Stream("dc2")
	if s.Name != "INV_dc2" || s.Subject != "pgcache.invalidations.dc2" || s.Placement != "dc2" || s.Replicas != 3 {
		t.Errorf("geo stream: got %+v", s)
	}
	want := []bus.Source{{Stream: "INV_dc1", Subject: "pgcache.invalidations.dc1"}, {Stream: "INV_dc3", Subject: "pgcache.invalidations.dc3"}}
	if fmt.Sprint(s.Sources) != fmt.Sprint(want) {
		t.Errorf("geo sources: got %v; want %v", s.Sources, want)
	}
	r, need := geo.Remotes("dc2")
	if len(r) != 2 || r[0].Name != "INV_dc1" || r[1].Name != "INV_dc3" || need != 1 {
		t.Errorf("geo remotes: got %v need %d; want INV_dc1, INV_dc3, need 1", r, need)
	}
	st := geo.State("dc2")
	if len(st.Locations) != 3 || st.Locations[0] != (bus.StateLocation{Bucket: bus.StateBucket + "_dc2", Placement: "dc2", Replicas: 3}) || st.Pipeline != "INV" {
		t.Errorf("geo state: got %+v; want dc2's bucket first", st)
	}
	for _, tc := range []struct {
		l    bus.Layout
		dc   string
		fail bool
	}{
		{geo, "dc1", false},
		{geo, "dc4", true},
		{bus.Layout{DCs: []string{"dc1", "dc1"}}, "dc1", true},
		{bus.Layout{DCs: []string{"dc1", "d.c"}}, "dc1", true},
		{bus.Layout{DCs: []string{"dc1", "dc2"}, DurableDCs: 3}, "dc1", true},
		{bus.Layout{DCs: []string{"dc1"}}, "dc1", false},
		{single, "anything", false},
	} {
		if err := tc.l.Validate(tc.dc); (err != nil) != tc.fail {
			t.Errorf("Validate(%v, %s): got %v; want failure %t", tc.l.DCs, tc.dc, err, tc.fail)
		}
	}
}

// TestLayoutDurableOutsideWriter runs the per-datacenter layout on two
// datacenters: dc1's publisher is confirmed only once dc2's stream holds
// its batches. With dc2 cut off, dc1's purger still gets every batch from
// its local stream while no transaction is confirmed; once dc2 is back,
// its stream copies them and every transaction is confirmed, in order.
// Batches published in dc2 reach dc1 the same way.
func TestLayoutDurableOutsideWriter(t *testing.T) {
	env := testenv.New(t, testenv.Options{NoPostgres: true, MemcachedPerDC: -1})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	log := zaptest.NewLogger(t)
	js := map[string]jetstream.JetStream{"dc1": connect(t, env.DC("dc1").NATS.URL()), "dc2": connect(t, env.DC("dc2").NATS.URL())}
	l := bus.Layout{Base: bus.StreamConfig{Name: "GEO"}, DCs: []string{"dc1", "dc2"}}
	for dc, j := range js {
		if _, err := bus.EnsureStream(ctx, j, l.Stream(dc)); err != nil {
			t.Fatal(err)
		}
	}

	// One server per cluster here: three replicas cannot be placed, and
	// the error says so by name.
	if _, err := bus.EnsureStream(ctx, js["dc1"], bus.StreamConfig{Name: "R3", Subject: "r3", Placement: "dc1", Replicas: 3}); !errors.Is(err, bus.ErrReplicas) {
		t.Errorf("3 replicas on a one-server cluster: got %v; want ErrReplicas", err)
	}

	var mu sync.Mutex
	var confirmed []uint64
	newPub := func(dc string, copyTimeout time.Duration) *bus.Publisher {
		cfg := bus.DefaultPublisherConfig()
		cfg.CopyTimeout = copyTimeout
		cfg.Origin = dc
		cfg.Stream = l.Stream(dc)
		cfg.Remotes, cfg.RemoteNeed = l.Remotes(dc)
		pub, err := bus.NewPublisher(js[dc], cfg, log)
		if err != nil {
			t.Fatal(err)
		}
		go func() { _ = pub.Run(ctx) }()
		return pub
	}
	publish := func(pub *bus.Publisher, from, n int, prefix string, ack func(uint64) bus.Ack) []string {
		var keys []string
		for i := from; i < from+n; i++ {
			lsn := uint64(1000 + 100*i)
			k := fmt.Sprintf("%s:%d", prefix, i)
			keys = append(keys, k)
			pub.BeginTx(lsn, time.Now())
			if err := pub.Add(ctx, k); err != nil {
				t.Fatal(err)
			}
			var a bus.Ack
			if ack != nil {
				a = ack(lsn + 10)
			}
			if err := pub.EndTx(ctx, lsn+10, a); err != nil {
				t.Fatal(err)
			}
		}
		if err := pub.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		return keys
	}
	ack := func(lsn uint64) bus.Ack {
		return ackFunc(func() {
			mu.Lock()
			confirmed = append(confirmed, lsn)
			mu.Unlock()
		})
	}
	nConfirmed := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(confirmed)
	}
	consume := func(dc string) *collector {
		col := &collector{keys: map[string]int{}}
		cons, err := bus.NewConsumer(js[dc], bus.ConsumerConfig{Stream: l.Stream(dc).Name, DC: dc}, log, nil)
		if err != nil {
			t.Fatal(err)
		}
		go func() { _ = cons.Run(ctx, col.handle) }()
		return col
	}
	pub1 := newPub("dc1", 0)
	col1 := consume("dc1")

	// Confirmed with dc2 reachable.
	keys := publish(pub1, 0, 20, "a", ack)
	testenv.Eventually(t, time.Minute, "20 transactions confirmed with dc2 up", func() bool { return nConfirmed() == 20 })

	// dc2 cut off: dc1 purges, nothing is confirmed.
	if err := env.Cut("dc2"); err != nil {
		t.Fatal(err)
	}
	keys = append(keys, publish(pub1, 20, 30, "b", ack)...)
	testenv.Eventually(t, time.Minute, "dc1's purger to get its local batches while dc2 is cut off", func() bool { return col1.has(keys) })
	if n := nConfirmed(); n != 20 {
		t.Fatalf("with dc2 cut off: %d transactions confirmed; want 20 (the 30 new ones are in dc1 only)", n)
	}
	if st := pub1.Stats(); st.CopiesBehind == 0 {
		t.Errorf("copies behind: got 0 with dc2 cut off; want > 0")
	}
	// With copy_timeout, a publisher confirms without the copies once it
	// passes, and counts it.
	pubT := newPub("dc1", time.Second)
	var nT sync.WaitGroup
	nT.Add(3)
	publish(pubT, 100, 3, "t", func(uint64) bus.Ack { return ackFunc(nT.Done) })
	nT.Wait()
	if st := pubT.Stats(); st.CopyTimeouts == 0 {
		t.Errorf("copy timeouts: got 0 after confirming with dc2 cut off; want > 0")
	}
	if n := nConfirmed(); n != 20 {
		t.Fatalf("the strict publisher confirmed %d transactions with dc2 cut off; want 20", n)
	}

	// dc2 back: its stream copies the batches, and they are confirmed.
	if err := env.Heal("dc2"); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, time.Minute, "all 50 transactions confirmed after the heal", func() bool { return nConfirmed() == 50 })
	mu.Lock()
	for i := 1; i < len(confirmed); i++ {
		if confirmed[i] <= confirmed[i-1] {
			t.Errorf("confirmations out of order: %v", confirmed)
			break
		}
	}
	mu.Unlock()
	col2 := consume("dc2")
	testenv.Eventually(t, time.Minute, "dc2's purger to get dc1's batches", func() bool { return col2.has(keys) })

	// The other way: dc2's tail publishes, dc1 gets it.
	pub2 := newPub("dc2", 0)
	var n2 sync.WaitGroup
	n2.Add(5)
	keys2 := publish(pub2, 0, 5, "c", func(uint64) bus.Ack { return ackFunc(n2.Done) })
	done := make(chan struct{})
	go func() { n2.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		t.Fatal("dc2's transactions were not confirmed")
	}
	testenv.Eventually(t, time.Minute, "dc2's batches to reach both datacenters", func() bool { return col1.has(keys2) && col2.has(keys2) })
	if err := pub1.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	if err := pub2.Drain(ctx); err != nil {
		t.Fatal(err)
	}
}
