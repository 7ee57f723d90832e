package lease

import (
	"bufio"
	"context"
	"errors"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pgcache/pgcache/mcpool"
)

// gatedGets makes the fake's reads of key block until release is
// closed, and reports each one on entered.
func gatedGets(be *fakeBackend, key string) (entered chan struct{}, release chan struct{}) {
	entered, release = make(chan struct{}, 100), make(chan struct{})
	be.getHook = func(k string) {
		if k == key {
			entered <- struct{}{}
			<-release
		}
	}
	return entered, release
}

// waitFor polls cond every millisecond for up to a minute.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// TestJoinReadInFlight: reads of a key whose read is in flight on this
// proxy send nothing and get that read's answer, whatever it is: a hit,
// a stale value (with Lease.Stale, served at once as to Z readers, while
// the first reader refills), or a wait for another client's fill.
func TestJoinReadInFlight(t *testing.T) {
	tests := []struct {
		name  string
		setup func(be *fakeBackend)
		// first: what the reader whose mg went out gets; others: the
		// readers that joined it.
		first, others getResult
		waits         uint64 // LeaseWaits after the reads, before any fill
	}{
		{
			name: "hit",
			setup: func(be *fakeBackend) {
				_, _ = be.MetaSet(context.Background(), "k", []byte("v"), mcpool.SetOptions{})
			},
			first:  getResult{found: true, item: item{value: []byte("v")}},
			others: getResult{found: true, item: item{value: []byte("v")}},
			waits:  3,
		},
		{
			name: "stale",
			setup: func(be *fakeBackend) {
				_, _ = be.MetaSet(context.Background(), "k", []byte("old"), mcpool.SetOptions{})
				be.markStale("k")
			},
			first:  getResult{}, // X W: it refills
			others: getResult{found: true, item: item{value: []byte("old")}, stale: true},
			waits:  3,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, be := newFakeServer(t, fakeConfig())
			tt.setup(be)
			entered, release := gatedGets(be, "k")
			ctx := context.Background()
			results := make([]getResult, 4)
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				results[0], _ = s.l.get(ctx, "k")
			}()
			<-entered // the first read is in flight
			calls := be.getCount("k")
			for i := 1; i < 4; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					results[i], _ = s.l.get(ctx, "k")
				}()
			}
			waitFor(t, "3 joins", func() bool { return s.Stats().LeaseJoins == 3 })
			close(release)
			wg.Wait()
			if got := be.getCount("k") - calls; got != 1 {
				t.Errorf("got %d reads at the backend for 4 reads; want 1 (the first read's)", got)
			}
			if got := results[0]; got.found != tt.first.found || string(got.item.value) != string(tt.first.item.value) {
				t.Errorf("first reader: got %+v; want %+v", got, tt.first)
			}
			for i, got := range results[1:] {
				if got.found != tt.others.found || got.stale != tt.others.stale || string(got.item.value) != string(tt.others.item.value) {
					t.Errorf("joined reader %d: got %+v; want %+v", i, got, tt.others)
				}
			}
			if st := s.Stats(); st.LeaseWaits != tt.waits || st.LeasePolls != 0 {
				t.Errorf("got %d waits, %d polls; want %d waits, 0 polls", st.LeaseWaits, st.LeasePolls, tt.waits)
			}
		})
	}
}

// TestJoinLease: once this proxy handed a lease to a client, reads of
// the key wait for its fill without asking memcached: one poller reads
// for them all. After the fill the key is read as usual.
func TestJoinLease(t *testing.T) {
	s, be := newFakeServer(t, fakeConfig())
	ctx := context.Background()
	first, _ := s.l.get(ctx, "k")
	if first.found || first.lease == 0 {
		t.Fatalf("first reader: got %+v; want a miss that wins the lease", first)
	}
	results := make(chan getResult, 50)
	for range 50 {
		go func() {
			r, _ := s.l.get(ctx, "k")
			results <- r
		}()
	}
	waitFor(t, "50 joins", func() bool { return s.Stats().LeaseJoins == 50 })
	// The winner fills on its connection: the fill is tied to its lease.
	if res, err := s.l.fill(ctx, "k", boundLease{cas: first.lease}, false, []byte("v"), 0, 0); err != nil || res != fillStored {
		t.Fatalf("fill: got %v, %v; want stored", res, err)
	}
	for range 50 {
		if r := <-results; !r.found || string(r.item.value) != "v" {
			t.Errorf("waiter: got %+v; want the filled %q", r, "v")
		}
	}
	st := s.Stats()
	// The first read and the polls: no read per waiter.
	if got, want := be.getCount("k"), 1+int(st.LeasePolls); got != want {
		t.Errorf("got %d reads at the backend; want %d (the first and %d polls)", got, want, st.LeasePolls)
	}
	if r, _ := s.l.get(ctx, "k"); !r.found || string(r.item.value) != "v" {
		t.Errorf("after the fill: got %+v; want %q", r, "v")
	}
	if j := s.Stats().LeaseJoins; j != 50 {
		t.Errorf("after the fill: got %d joins; want 50 (a read after the fill asks memcached)", j)
	}
}

// TestJoinedReadFailure: readers that joined a read that fails get its
// error, as their own read would have.
func TestJoinedReadFailure(t *testing.T) {
	s, be := newFakeServer(t, fakeConfig())
	entered, release := gatedGets(be, "k")
	ctx := context.Background()
	errs := make(chan error, 3)
	for i := range 3 {
		go func() {
			_, err := s.l.get(ctx, "k")
			errs <- err
		}()
		if i == 0 {
			<-entered
		}
	}
	waitFor(t, "2 joins", func() bool { return s.Stats().LeaseJoins == 2 })
	be.setErr(mcpool.ErrServerDown)
	close(release)
	for range 3 {
		if err := <-errs; !errors.Is(err, mcpool.ErrServerDown) {
			t.Errorf("got %v; want %v", err, mcpool.ErrServerDown)
		}
	}
}

// countingBackend counts the reads of one key that reach the pool.
type countingBackend struct {
	Backend
	key   string
	reads atomic.Int64
}

func (b *countingBackend) MetaGet(ctx context.Context, key string, flags ...string) (mcpool.Response, error) {
	if key == b.key {
		b.reads.Add(1)
	}
	return b.Backend.MetaGet(ctx, key, flags...)
}

// memcachedGets sums memcached's own cmd_get over servers.
func memcachedGets(t *testing.T, servers []string) uint64 {
	t.Helper()
	var sum uint64
	for _, addr := range servers {
		nc, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatalf("stats %s: %v", addr, err)
		}
		_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := nc.Write([]byte("stats\r\n")); err != nil {
			t.Fatalf("stats %s: %v", addr, err)
		}
		br := bufio.NewReader(nc)
		for {
			l, err := br.ReadString('\n')
			if err != nil {
				t.Fatalf("stats %s: %v", addr, err)
			}
			l = strings.TrimSpace(l)
			if l == "END" {
				break
			}
			if v, ok := strings.CutPrefix(l, "STAT cmd_get "); ok {
				n, _ := strconv.ParseUint(v, 10, 64)
				sum += n
			}
		}
		_ = nc.Close()
	}
	return sum
}

// TestHerdReadsPerProxy: 1000 clients of one proxy miss one key at once.
// The reads memcached gets for the key do not grow with the clients: the
// first read wins the lease, the rest join it on the proxy, and one
// poller reads for them all. Counted both at the Backend and by
// memcached itself (cmd_get).
func TestHerdReadsPerProxy(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 2)
	cfg := testConfig()
	pcfg := mcpool.DefaultConfig()
	pcfg.Servers = addrs
	pcfg.Timeout = 5 * time.Second
	pool, err := mcpool.New(pcfg, nil)
	if err != nil {
		t.Fatalf("mcpool.New: %v", err)
	}
	t.Cleanup(func() { _ = pool.Close() })
	key := "herd:reads"
	be := &countingBackend{Backend: NewPoolBackend(pool), key: key}
	p := startProxyOn(t, cfg, be)
	const n = 1000
	var fills atomic.Int64
	before := memcachedGets(t, addrs)
	start := time.Now()
	res := runHerd(t, []*proxy{p}, n, key, func() string {
		fills.Add(1)
		// The database query lasts until every other client waits, so
		// that the whole herd misses.
		waitFor(t, "the herd to wait", func() bool { return p.Stats().LeaseWaits >= n-1 })
		return "from-db"
	})
	elapsed := time.Since(start)
	mcGets := memcachedGets(t, addrs) - before
	for i, r := range res {
		if r.err != nil {
			t.Fatalf("client %d: %v", i, r.err)
		}
		if r.value != "from-db" {
			t.Errorf("client %d: got %q; want %q", i, r.value, "from-db")
		}
	}
	if f := fills.Load(); f != 1 {
		t.Errorf("got %d fills; want 1", f)
	}
	st := p.Stats()
	reads := uint64(be.reads.Load())
	clientReads := reads - st.LeasePolls
	t.Logf("%d clients: %d reads of the key reach the pool (%d polls over %s), %d joins; memcached counted %d gets",
		n, reads, st.LeasePolls, elapsed.Round(time.Millisecond), st.LeaseJoins, mcGets)
	if clientReads > 20 {
		t.Errorf("got %d client reads of the key at the pool for %d clients; want at most 20", clientReads, n)
	}
	// Polls back off to PollMax; they depend on how long the fill took,
	// not on the clients.
	if maxPolls := uint64(elapsed/cfg.Lease.PollMax) + 8; st.LeasePolls > maxPolls {
		t.Errorf("got %d polls in %s; want at most %d", st.LeasePolls, elapsed, maxPolls)
	}
	// memcached saw those reads plus the lease record's cleanup read.
	if mcGets < reads || mcGets > reads+2 {
		t.Errorf("memcached counted %d gets; want %d to %d (the key's reads and the lease record's)", mcGets, reads, reads+2)
	}
	if st.LeaseJoins < n-1-clientReads {
		t.Errorf("got %d joins; want at least %d", st.LeaseJoins, n-1-clientReads)
	}
}

// TestReadYourWrite: a client that writes a key through the proxy and
// then reads it does not join a read of the key sent before its write:
// it gets its own value, while the readers that joined the older read
// get that read's answer.
func TestReadYourWrite(t *testing.T) {
	for _, write := range []string{"set", "delete"} {
		t.Run(write, func(t *testing.T) {
			be := newFakeBackend()
			_, _ = be.MetaSet(context.Background(), "k", []byte("old"), mcpool.SetOptions{})
			entered, release := make(chan struct{}, 1), make(chan struct{})
			var first atomic.Bool
			be.getHook = func(k string) {
				if k == "k" && first.CompareAndSwap(false, true) {
					entered <- struct{}{}
					<-release
				}
			}
			p := startProxyOn(t, fakeConfig(), be)
			a, b, c := dial(t, p.Addr), dial(t, p.Addr), dial(t, p.Addr)
			type reply struct {
				v  string
				ok bool
			}
			aDone, bDone := make(chan reply, 1), make(chan reply, 1)
			go func() { v, ok := a.get1("k"); aDone <- reply{v, ok} }()
			<-entered // a's read is in flight, held before memcached answers
			go func() { v, ok := b.get1("k"); bDone <- reply{v, ok} }()
			waitFor(t, "b to join", func() bool { return p.Stats().LeaseJoins == 1 })
			want := reply{"new", true}
			if write == "set" {
				if r := c.set("k", "new"); r != "STORED" {
					t.Fatalf("set: got %q; want STORED", r)
				}
			} else {
				if r := c.do("delete k"); r != "DELETED" {
					t.Fatalf("delete: got %q; want DELETED", r)
				}
				want = reply{"", false} // a miss that wins the lease
			}
			v, ok := c.get1("k")
			if got := (reply{v, ok}); got != want {
				t.Errorf("writer's read: got %+v; want %+v", got, want)
			}
			if j := p.Stats().LeaseJoins; j != 1 {
				t.Errorf("got %d joins; want 1 (b's): the writer's read must not join", j)
			}
			close(release)
			if write == "delete" {
				// c won the lease with its read: it fills, and a and b,
				// whose read comes after it, wait for that fill.
				if r := c.set("k", "filled"); r != "STORED" {
					t.Fatalf("fill: got %q; want STORED", r)
				}
			}
			ra, rb := <-aDone, <-bDone
			if ra != rb {
				t.Errorf("a got %+v, b (joined a's read) got %+v; want the same", ra, rb)
			}
		})
	}
}

// TestFillHandsValue: a fill stored through this proxy goes to the
// readers waiting for it at once, without a poll, with the CAS memcached
// gave it.
func TestFillHandsValue(t *testing.T) {
	cfg := fakeConfig()
	cfg.Lease.PollMin, cfg.Lease.PollMax = time.Hour, time.Hour // no poll comes in time
	s, be := newFakeServer(t, cfg)
	ctx := context.Background()
	if r, _ := s.l.get(ctx, "k"); r.found {
		t.Fatalf("first reader: got %+v; want a miss that wins the lease", r)
	}
	results := make(chan getResult, 10)
	for range 10 {
		go func() {
			r, _ := s.l.get(ctx, "k")
			results <- r
		}()
	}
	waitFor(t, "10 joins", func() bool { return s.Stats().LeaseJoins == 10 })
	if res, err := s.l.fill(ctx, "k", boundLease{}, false, []byte("v"), 7, 0); err != nil || res != fillStored {
		t.Fatalf("fill: got %v, %v; want stored", res, err)
	}
	resp, _ := be.MetaGet(ctx, "k", "v", "f", "c")
	for range 10 {
		r := <-results
		if !r.found || string(r.item.value) != "v" || r.item.flags != 7 || r.item.cas != resp.CAS {
			t.Errorf("waiter: got %+v; want value %q, flags 7, cas %d", r, "v", resp.CAS)
		}
	}
	if p := s.Stats().LeasePolls; p != 0 {
		t.Errorf("got %d polls; want 0", p)
	}
}
