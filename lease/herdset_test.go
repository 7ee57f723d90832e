package lease

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/testenv"
)

// The herd tests below: a herd whose fill comes later than Lease.Wait.
// Every waiter gets a miss at the end of its wait, fills from the
// database and sends a set. Those sets must not cost the proxy a few
// memcached requests each: before, each read the key's lease record
// through the one connection to its server and then stored or compared
// and swapped, about three requests per client. A herd of thousands
// queued them past the pool's timeout, and the timeouts opened the
// breaker of a healthy server, failing every key on it.
//
// One client wins the lease first; the herd then reads the key (each
// waits for the winner's fill, which comes 700ms later) and, at the end
// of its wait, fills (50ms) and sets. The memcached link has 250ms of
// latency each way, so that the pool's connection (1,024 requests in
// flight: leaseproxy's default) carries about 2,000 requests per second:
// the herd's sets on the old code queued longer than the pool's timeout.
// The timeout is 2s (leaseproxy's default is 1s), so that a request the
// proxy sends alone does not time out on a loaded machine under -race.
const (
	herdN       = 2500
	herdSetters = 500 // connections of the pooled clients' set pool
	herdLatency = 250 * time.Millisecond
	herdFill    = 50 * time.Millisecond  // the waiters' database query
	winnerFill  = 700 * time.Millisecond // the winner's, from the herd's start
)

// herdOutcome is what a slow-fill herd did.
type herdOutcome struct {
	stored, notStored, misses int64
	st                        Stats
	pool                      mcpool.ServerStats
	final                     string
	found                     bool
}

// runSlowFillHerd runs herdN clients on one key through a proxy whose
// memcached link is slowed (see above). With pooled, the clients send
// their sets on another pool of herdSetters connections, each shared by
// several clients, as clients that pool connections do: no connection
// ties a set to its client's get.
func runSlowFillHerd(t *testing.T, pooled bool) herdOutcome {
	t.Helper()
	mcs := testenv.NewMemcacheds(t, 1)
	link, err := testenv.StartLink("memcached", mcs[0].Addr)
	if err != nil {
		t.Fatalf("link: %v", err)
	}
	t.Cleanup(func() { _ = link.Close() })
	link.SetLatency(herdLatency)

	pcfg := mcpool.DefaultConfig()
	pcfg.Servers = []string{link.Addr}
	pcfg.ConnsPerServer = 1 // leaseproxy's default; MaxInFlight 1024
	pcfg.Timeout = 2 * time.Second
	pool, err := mcpool.New(pcfg, zaptest.NewLogger(t).Named("mcpool"))
	if err != nil {
		t.Fatalf("mcpool.New: %v", err)
	}
	t.Cleanup(func() { _ = pool.Close() })
	testenv.Eventually(t, 10*time.Second, "the pool's connection", func() bool { return pool.Stats()[0].Conns == 1 })
	cfg := DefaultConfig() // Lease.Wait 250ms
	cfg.Lease.TTL = 5 * time.Second
	cfg.MaxConns = herdN + herdSetters + 10
	p := startProxyOn(t, cfg, NewPoolBackend(pool))

	getters := make([]*client, herdN)
	for i := range getters {
		getters[i] = dial(t, p.Addr)
	}
	setter := func(i int) (*client, func()) { return getters[i], func() {} }
	if pooled {
		setters := make([]*client, herdSetters)
		locks := make([]sync.Mutex, herdSetters)
		for i := range setters {
			setters[i] = dial(t, p.Addr)
		}
		setter = func(i int) (*client, func()) {
			j := i % herdSetters
			locks[j].Lock()
			return setters[j], locks[j].Unlock
		}
	}
	key := "herd:slowfill"
	winner := dial(t, p.Addr)
	if _, ok := winner.get1(key); ok {
		t.Fatal("winner: got a hit on a fresh key; want a miss")
	}
	var stored, notStored, misses atomic.Int64
	errs := make([]error, herdN)
	start := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		<-start
		time.Sleep(winnerFill)
		if got := winner.set(key, "from-db-winner"); got != "STORED" {
			t.Errorf("the winner's fill: got %q; want STORED", got)
		}
	}()
	for i := range getters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			vs, err := getters[i].get("get " + key)
			if err != nil {
				errs[i] = fmt.Errorf("get: %w", err)
				return
			}
			if len(vs) > 0 {
				return
			}
			misses.Add(1)
			time.Sleep(herdFill)
			c, done := setter(i)
			v := fmt.Sprintf("from-db-%d", i)
			c.send(fmt.Sprintf("set %s 0 0 %d\r\n%s\r\n", key, len(v), v))
			l, err := c.br.ReadString('\n')
			done()
			switch l {
			case "STORED\r\n":
				stored.Add(1)
			case "NOT_STORED\r\n":
				notStored.Add(1)
			default:
				errs[i] = fmt.Errorf("set after a miss: got %q (%v); want STORED or NOT_STORED", strings.TrimSpace(l), err)
			}
		}()
	}
	close(start)
	wg.Wait()
	failed := 0
	for i, err := range errs {
		if err != nil {
			if failed < 5 {
				t.Errorf("client %d: %v", i, err)
			}
			failed++
		}
	}
	if failed > 0 {
		t.Errorf("%d of %d clients failed", failed, herdN)
	}
	o := herdOutcome{stored: stored.Load(), notStored: notStored.Load(), misses: misses.Load(), st: p.Stats(), pool: pool.Stats()[0]}
	o.final, o.found = dial(t, p.Addr).get1(key)
	t.Logf("misses %d, stored %d, not stored %d; proxy: wins %d, wait timeouts %d, fills %d, refused %d (waited %d), grouped sets %d; pool: requests %d, failures %d, rejected %d, breaker opens %d",
		o.misses, o.stored, o.notStored, o.st.LeaseWins, o.st.LeaseWaitTimeouts, o.st.Fills, o.st.RefusedFills, o.st.RefusedWaited,
		o.st.GroupedSets, o.pool.Requests, o.pool.Failures, o.pool.Rejected, o.pool.Opens)
	if o.misses < herdN/2 {
		t.Fatalf("got %d misses; want most of the %d clients' waits over before the fill (the test's premise)", o.misses, herdN)
	}
	if o.pool.Opens != 0 || o.pool.Failures != 0 || o.pool.Rejected != 0 {
		t.Errorf("got %d breaker opens, %d failed and %d rejected requests; want none (the server is healthy)", o.pool.Opens, o.pool.Failures, o.pool.Rejected)
	}
	// The herd cost the proxy a handful of requests, not a few per client.
	if o.pool.Requests > 100 {
		t.Errorf("got %d requests to memcached for a herd of %d; want at most 100", o.pool.Requests, herdN)
	}
	if o.st.LeaseWins != 1 {
		t.Errorf("got %d lease wins; want 1", o.st.LeaseWins)
	}
	if !o.found || !strings.HasPrefix(o.final, "from-db-") {
		t.Errorf("after the herd: got %q, %v; want a value filled from the database", o.final, o.found)
	}
	return o
}

// TestHerdSetsAfterWait: each client sets on the connection of its get.
// The waiters' sets are refused at once: only the lease's fill is stored.
func TestHerdSetsAfterWait(t *testing.T) {
	o := runSlowFillHerd(t, false)
	if o.stored != 0 || o.st.Fills != 1 {
		t.Errorf("got %d waiters' sets stored and %d lease fills; want 0 and 1 (the winner's fill)", o.stored, o.st.Fills)
	}
	if o.st.RefusedWaited != herdN {
		t.Errorf("got %d sets refused after a wait; want %d", o.st.RefusedWaited, herdN)
	}
	if o.final != "from-db-winner" {
		t.Errorf("after the herd: got %q; want the winner's fill", o.final)
	}
}

// TestHerdSetsOtherConnection: each client sets on another connection
// than its get, so no connection ties its set to its wait. The sets are
// checked in groups: a few requests for the whole herd.
func TestHerdSetsOtherConnection(t *testing.T) {
	o := runSlowFillHerd(t, true)
	if o.st.GroupedSets < herdN/2 {
		t.Errorf("got %d grouped sets; want most of the %d", o.st.GroupedSets, herdN)
	}
}
