package lease

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pgcache/pgcache/mcpool"
)

// herdResult is what one client of a herd saw.
type herdResult struct {
	value  string
	filled bool // it got a miss and filled
	err    error
}

// runHerd makes n clients, spread over the proxies, read key at once. A
// client that misses calls fill (the database), then sets the value.
func runHerd(t *testing.T, proxies []*proxy, n int, key string, fill func() string) []herdResult {
	t.Helper()
	clients := make([]*client, n)
	for i := range clients {
		clients[i] = dial(t, proxies[i%len(proxies)].Addr)
	}
	results := make([]herdResult, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			vs, err := c.get("get " + key)
			if err != nil {
				results[i].err = err
				return
			}
			if len(vs) == 1 {
				results[i].value = vs[0].data
				return
			}
			v := fill()
			results[i].filled = true
			results[i].value = v
			c.send(fmt.Sprintf("set %s 0 0 %d\r\n%s\r\n", key, len(v), v))
			l, err := c.br.ReadString('\n')
			if err != nil || l != "STORED\r\n" {
				results[i].err = fmt.Errorf("set after fill: %q, %v", l, err)
			}
		}()
	}
	close(start)
	wg.Wait()
	return results
}

// TestHerd: 1000 clients on 2 proxies miss one key at once. Exactly one
// fills from the database; every other client gets the filled value.
func TestHerd(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 2)
	cfg := testConfig()
	p1, p2 := startProxy(t, cfg, addrs), startProxy(t, cfg, addrs)
	var fills atomic.Int64
	fill := func() string {
		fills.Add(1)
		time.Sleep(20 * time.Millisecond) // the database query
		return "from-db"
	}
	res := runHerd(t, []*proxy{p1, p2}, 1000, "herd:post:1", fill)
	got := 0
	for i, r := range res {
		if r.err != nil {
			t.Fatalf("client %d: %v", i, r.err)
		}
		if r.value != "from-db" {
			t.Errorf("client %d: got %q; want %q", i, r.value, "from-db")
		}
		if !r.filled {
			got++
		}
	}
	if n := fills.Load(); n != 1 {
		t.Errorf("got %d fills; want 1", n)
	}
	if got != 999 {
		t.Errorf("got %d clients served the filled value; want 999", got)
	}
	s1, s2 := p1.Stats(), p2.Stats()
	if w := s1.LeaseWins + s2.LeaseWins; w != 1 {
		t.Errorf("got %d lease wins; want 1", w)
	}
	if f := s1.Fills + s2.Fills; f != 1 {
		t.Errorf("got %d lease fills; want 1", f)
	}
	// Waiters share one poller per key and proxy: far fewer polls than
	// waiters.
	if w, p := s1.LeaseWaits+s2.LeaseWaits, s1.LeasePolls+s2.LeasePolls; p >= w {
		t.Errorf("got %d polls for %d waits; want fewer polls than waits", p, w)
	}
}

// TestHerdWaitTimeout: the winner never fills; waiters get a miss after
// Lease.Wait, and no more than Lease.Wait's worth of polls is made.
func TestHerdWaitTimeout(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 1)
	cfg := testConfig()
	cfg.Lease.Wait = 300 * time.Millisecond
	p := startProxy(t, cfg, addrs)
	winner := dial(t, p.Addr)
	if _, ok := winner.get1("herd:abandoned"); ok {
		t.Fatal("got a hit on a fresh key; want a miss")
	}
	var wg sync.WaitGroup
	durations := make([]time.Duration, 50)
	found := make([]bool, 50)
	for i := range durations {
		c := dial(t, p.Addr)
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			vs, err := c.get("get herd:abandoned")
			if err != nil {
				t.Errorf("get: %v", err)
			}
			durations[i], found[i] = time.Since(start), len(vs) > 0
		}()
	}
	wg.Wait()
	for i := range durations {
		if found[i] {
			t.Errorf("waiter %d: got a value; want a miss", i)
		}
		if durations[i] < cfg.Lease.Wait {
			t.Errorf("waiter %d: got a miss after %s; want it after the wait of %s", i, durations[i], cfg.Lease.Wait)
		}
	}
	if s := p.Stats(); s.LeaseWaitTimeouts != 50 {
		t.Errorf("got %d wait timeouts; want 50", s.LeaseWaitTimeouts)
	}
}

// TestStaleHerd: with Lease.Stale, an item the purger marked stale is
// served stale to the whole herd at once while exactly one client
// refills it.
func TestStaleHerd(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 2)
	cfg := testConfig()
	p1, p2 := startProxy(t, cfg, addrs), startProxy(t, cfg, addrs)
	key := "herd:stale"
	if got := dial(t, p1.Addr).set(key, "old"); got != "STORED" {
		t.Fatalf("set: got %q; want STORED", got)
	}
	// The purger marks the key stale (md I), as on an invalidation.
	if err := p1.Pool.MarkStale(context.Background(), key, 0); err != nil {
		t.Fatalf("mark stale: %v", err)
	}
	var fills atomic.Int64
	refilled := make(chan struct{})
	fill := func() string {
		fills.Add(1)
		<-refilled // the refill is slow: everyone else is served meanwhile
		return "new"
	}
	var res []herdResult
	done := make(chan struct{})
	go func() {
		defer close(done)
		res = runHerd(t, []*proxy{p1, p2}, 1000, key, fill)
	}()
	// Everyone but the winner is answered with the stale value before the
	// refill completes.
	for p1.Stats().StaleServes+p2.Stats().StaleServes < 999 {
		select {
		case <-done:
			t.Fatalf("herd ended before the refill; stale serves %d", p1.Stats().StaleServes+p2.Stats().StaleServes)
		case <-time.After(5 * time.Millisecond):
		}
	}
	close(refilled)
	<-done
	stale := 0
	for i, r := range res {
		if r.err != nil {
			t.Fatalf("client %d: %v", i, r.err)
		}
		if !r.filled {
			if r.value != "old" {
				t.Errorf("client %d: got %q; want the stale %q", i, r.value, "old")
			}
			stale++
		}
	}
	if n := fills.Load(); n != 1 {
		t.Errorf("got %d refills; want 1", n)
	}
	if stale != 999 {
		t.Errorf("got %d stale serves; want 999", stale)
	}
	if v, ok := dial(t, p2.Addr).get1(key); !ok || v != "new" {
		t.Errorf("after the refill: got %q (found %v); want %q", v, ok, "new")
	}
}

// TestStaleOffWaits: without Lease.Stale, readers of a stale item wait for
// the refill instead.
func TestStaleOffWaits(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 1)
	cfg := testConfig()
	cfg.Lease.Stale = false
	p := startProxy(t, cfg, addrs)
	c := dial(t, p.Addr)
	c.set("k", "old")
	if err := p.Pool.MarkStale(context.Background(), "k", 0); err != nil {
		t.Fatal(err)
	}
	if _, ok := c.get1("k"); ok {
		t.Fatal("winner: got a value; want a miss (it refills)")
	}
	got := make(chan string, 1)
	go func() {
		v, _ := dial(t, p.Addr).get1("k")
		got <- v
	}()
	for p.Stats().LeaseWaits == 0 {
		time.Sleep(time.Millisecond)
	}
	if r := c.set("k", "new"); r != "STORED" {
		t.Fatalf("refill: got %q; want STORED", r)
	}
	if v := <-got; v != "new" {
		t.Errorf("waiter: got %q; want %q", v, "new")
	}
}

// invalidation is how the purger invalidates a key.
type invalidation struct {
	name string
	run  func(p *proxy, key string) error
}

var invalidations = []invalidation{
	{"delete", func(p *proxy, key string) error { return p.Pool.Delete(context.Background(), key) }},
	{"mdI", func(p *proxy, key string) error { return p.Pool.MarkStale(context.Background(), key, 0) }},
}

// TestRace: the winner fills slowly and an invalidation lands mid-fill.
// Its set is refused, and the next reader wins a new lease and stores the
// fresh value. Also when the set goes to another proxy than the get.
func TestRace(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 2)
	cfg := testConfig()
	p1, p2 := startProxy(t, cfg, addrs), startProxy(t, cfg, addrs)
	for _, inv := range invalidations {
		for _, setAt := range []*proxy{p1, p2} {
			name := inv.name + "/same-proxy"
			if setAt == p2 {
				name = inv.name + "/other-proxy"
			}
			t.Run(name, func(t *testing.T) {
				key := "race:" + name
				winner := dial(t, p1.Addr)
				if _, ok := winner.get1(key); ok {
					t.Fatal("got a hit; want a miss that wins the lease")
				}
				// The database is read (old row)... then the commit's
				// invalidation is applied before the fill is stored.
				if err := inv.run(p1, key); err != nil {
					t.Fatalf("invalidate: %v", err)
				}
				if got := dial(t, setAt.Addr).set(key, "old-row"); got != "NOT_STORED" {
					t.Fatalf("stale fill: got %q; want NOT_STORED", got)
				}
				next := dial(t, p2.Addr)
				if v, ok := next.get1(key); ok {
					t.Fatalf("next reader: got %q; want a miss that wins a new lease", v)
				}
				if got := next.set(key, "new-row"); got != "STORED" {
					t.Fatalf("fresh fill: got %q; want STORED", got)
				}
				if v, ok := dial(t, p1.Addr).get1(key); !ok || v != "new-row" {
					t.Errorf("got %q (found %v); want %q", v, ok, "new-row")
				}
			})
		}
	}
	if r := p1.Stats().RefusedFills + p2.Stats().RefusedFills; r != 4 {
		t.Errorf("got %d refused fills; want 4", r)
	}
}

// TestFillOtherConnection: the winner's set may come on another connection
// of the same proxy (clients pool connections) and is still the fill.
func TestFillOtherConnection(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 1)
	p := startProxy(t, testConfig(), addrs)
	if _, ok := dial(t, p.Addr).get1("k"); ok {
		t.Fatal("got a hit; want a miss")
	}
	if got := dial(t, p.Addr).set("k", "v"); got != "STORED" {
		t.Fatalf("got %q; want STORED", got)
	}
	if s := p.Stats(); s.Fills != 1 || s.ForeignFills != 0 {
		t.Errorf("got fills %d, foreign %d; want 1 and 0", s.Fills, s.ForeignFills)
	}
}

// TestForeignSet covers each Lease.ForeignSet policy for a fill whose get
// went through another proxy, and for a plain write with no lease.
func TestForeignSet(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 2)
	tests := []struct {
		policy      string
		fill, plain string // replies to the fill at B and to a plain write at B
	}{
		{ForeignCheck, "STORED", "STORED"},
		{ForeignPlain, "STORED", "STORED"},
		{ForeignRefuse, "NOT_STORED", "NOT_STORED"},
	}
	for _, tt := range tests {
		t.Run(tt.policy, func(t *testing.T) {
			cfg := testConfig()
			cfg.Lease.ForeignSet = tt.policy
			a, b := startProxy(t, cfg, addrs), startProxy(t, cfg, addrs)
			key := "foreign:" + tt.policy
			if _, ok := dial(t, a.Addr).get1(key); ok {
				t.Fatal("got a hit; want a miss")
			}
			if got := dial(t, b.Addr).set(key, "v"); got != tt.fill {
				t.Errorf("fill at the other proxy: got %q; want %q", got, tt.fill)
			}
			if got := dial(t, b.Addr).set(key+":plain", "v"); got != tt.plain {
				t.Errorf("plain write: got %q; want %q", got, tt.plain)
			}
		})
	}
}

// TestLeaseRecordPlacement: the lease record sits on its key's server,
// though its own name hashes to the other one, and a fill at another
// proxy is checked against it there: refused after an invalidation.
func TestLeaseRecordPlacement(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 2)
	cfg := testConfig()
	a, b := startProxy(t, cfg, addrs), startProxy(t, cfg, addrs)
	ring := a.Pool.Ring()
	var key string
	for i := 0; key == ""; i++ {
		if k := fmt.Sprintf("place:%d", i); ring.Pick(k) != ring.Pick(cfg.Lease.RecordPrefix+k) {
			key = k
		}
	}
	if _, ok := dial(t, a.Addr).get1(key); ok {
		t.Fatal("got a hit; want a miss that wins the lease")
	}
	// The record is written after the winner's reply: wait for it.
	own := ring.Pick(key)
	ctx := context.Background()
	for i, addr := range addrs {
		c, err := mcpool.Dial(ctx, addr, mcpool.DefaultConnConfig())
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			resp, err := c.MetaGet(ctx, cfg.Lease.RecordPrefix+key, "v")
			if err != nil {
				t.Fatal(err)
			}
			if found = resp.Status == mcpool.StatusVA; found || i != own {
				break
			}
		}
		c.Close()
		if found != (i == own) {
			t.Fatalf("lease record on server %d: %v; want it on the key's server (%d) only", i, found, own)
		}
	}
	if err := a.Pool.Delete(ctx, key); err != nil {
		t.Fatal(err)
	}
	if got := dial(t, b.Addr).set(key, "old-row"); got != "NOT_STORED" {
		t.Fatalf("stale fill at the other proxy: got %q; want NOT_STORED", got)
	}
}

// TestLeaseHandoff: the winner never fills and its lease expires; a
// waiter's poller wins the next lease and that waiter fills, while the
// others get its value.
func TestLeaseHandoff(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 1)
	cfg := testConfig()
	cfg.Lease.TTL = 2 * time.Second // memcached expires it after 1 to 2s
	p := startProxy(t, cfg, addrs)
	if _, ok := dial(t, p.Addr).get1("handoff"); ok {
		t.Fatal("got a hit; want a miss")
	}
	var fills atomic.Int64
	res := runHerd(t, []*proxy{p}, 20, "handoff", func() string {
		fills.Add(1)
		return "v"
	})
	for i, r := range res {
		if r.err != nil || r.value != "v" {
			t.Errorf("client %d: got %q, %v; want %q", i, r.value, r.err, "v")
		}
	}
	if n := fills.Load(); n != 1 {
		t.Errorf("got %d fills after the abandoned lease; want 1", n)
	}
	if w := p.Stats().LeaseWins; w != 2 {
		t.Errorf("got %d lease wins; want 2 (the abandoned one and its successor)", w)
	}
}

// TestFillWithAdd: cache-aside code that fills with add (so as not to
// overwrite a newer value) fills the lease too: add on the lease's empty
// item is checked against the lease like set.
func TestFillWithAdd(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 1)
	p := startProxy(t, testConfig(), addrs)
	c := dial(t, p.Addr)
	if _, ok := c.get1("k"); ok {
		t.Fatal("got a hit; want a miss")
	}
	if got := c.do("add k 0 0 1\r\nv"); got != "STORED" {
		t.Fatalf("add as fill: got %q; want STORED", got)
	}
	if got := c.do("add k 0 0 1\r\nw"); got != "NOT_STORED" {
		t.Errorf("second add: got %q; want NOT_STORED", got)
	}
	if v, ok := c.get1("k"); !ok || v != "v" {
		t.Errorf("got %q (found %v); want %q", v, ok, "v")
	}
}

// TestMultiGetLeases: a multi-key get through the pool (pipelined reads)
// answers hits, takes one lease per missed key even when the key is named
// twice (the second mention does not wait for the client's own lease),
// and a key leased by another client waits for its fill, whether the
// reader finds the lease in memcached or joins a wait already under way
// on this proxy.
func TestMultiGetLeases(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 2)
	p := startProxy(t, testConfig(), addrs)
	a, b, c := dial(t, p.Addr), dial(t, p.Addr), dial(t, p.Addr)
	line := "get"
	want := map[string]string{}
	for i := 0; i < 20; i++ {
		k := fmt.Sprintf("mget:hit:%d", i)
		if r := a.set(k, "v"+k); r != "STORED" {
			t.Fatalf("set %s: %q", k, r)
		}
		want[k] = "v" + k
		line += " " + k
		if i%5 == 0 {
			line += " mget:miss:1 mget:miss:2"
		}
	}
	vs, err := a.get(line)
	if err != nil {
		t.Fatal(err)
	}
	if len(vs) != 20 {
		t.Fatalf("got %d values; want the 20 hits", len(vs))
	}
	for i, v := range vs {
		if k := fmt.Sprintf("mget:hit:%d", i); v.key != k || v.data != want[k] {
			t.Fatalf("value %d: got %s=%q; want %s=%q (request order)", i, v.key, v.data, k, want[k])
		}
	}
	if st := p.Stats(); st.LeaseWins != 2 || st.LeaseWaits != 0 {
		t.Fatalf("got %d lease wins, %d waits; want 2 wins (one per missed key), 0 waits", st.LeaseWins, st.LeaseWaits)
	}

	// b finds a's lease in memcached and waits; c then joins b's wait.
	type reply struct {
		vs  []value
		err error
	}
	bDone, cDone := make(chan reply, 1), make(chan reply, 1)
	go func() {
		vs, err := b.get("get mget:hit:0 mget:miss:1")
		bDone <- reply{vs, err}
	}()
	for deadline := time.Now().Add(30 * time.Second); p.Stats().LeaseWaits == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("b never waited for mget:miss:1")
		}
	}
	go func() {
		vs, err := c.get("get mget:miss:1 mget:hit:1 mget:miss:1")
		cDone <- reply{vs, err}
	}()
	for deadline := time.Now().Add(30 * time.Second); p.Stats().LeaseWaits < 2; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("c never joined the wait: %+v", p.Stats())
		}
	}
	if r := a.set("mget:miss:1", "filled"); r != "STORED" {
		t.Fatalf("fill: %q", r)
	}
	rb, rc := <-bDone, <-cDone
	if rb.err != nil || len(rb.vs) != 2 || rb.vs[0].data != "vmget:hit:0" || rb.vs[1].key != "mget:miss:1" || rb.vs[1].data != "filled" {
		t.Fatalf("b got %+v, %v; want mget:hit:0 and the filled mget:miss:1", rb.vs, rb.err)
	}
	if rc.err != nil || len(rc.vs) != 3 || rc.vs[0].data != "filled" || rc.vs[1].data != "vmget:hit:1" || rc.vs[2].data != "filled" {
		t.Fatalf("c got %+v, %v; want filled, mget:hit:1, filled", rc.vs, rc.err)
	}
	if st := p.Stats(); st.LeaseWins != 2 || st.Fills != 1 {
		t.Fatalf("got %d wins, %d fills; want 2 wins, 1 fill", st.LeaseWins, st.Fills)
	}
}
