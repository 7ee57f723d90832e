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

// TestHerdSetsAfterWait: a herd whose fill comes later than Lease.Wait.
// Every waiter gets a miss at the end of its wait, fills from the
// database and sends a set. Those sets must cost the proxy nothing in
// memcached: they are not the lease's fill, and the lease's winner is
// filling. (Before, each such set read the key's lease record through the
// one connection to its server, and then stored or compared and swapped:
// about three requests per client. A herd of thousands queued them past
// the pool's timeout, and the timeouts opened the breaker of a healthy
// server, failing every key on it.)
//
// The memcached link has 250ms of latency each way, so that the lease
// (one read, then the record's read and write) is handed out after every
// waiter's wait is over, and the pool's connection (1024 requests in
// flight, 1s timeout: leaseproxy's defaults) carries about 2,000
// requests per second: the herd's sets on the old code took longer than
// the pool's timeout.
func TestHerdSetsAfterWait(t *testing.T) {
	const (
		n       = 2500
		latency = 250 * time.Millisecond
		fill    = 50 * time.Millisecond // the database query
	)
	mcs := testenv.NewMemcacheds(t, 1)
	link, err := testenv.StartLink("memcached", mcs[0].Addr)
	if err != nil {
		t.Fatalf("link: %v", err)
	}
	t.Cleanup(func() { _ = link.Close() })
	link.SetLatency(latency)

	pcfg := mcpool.DefaultConfig()
	pcfg.Servers = []string{link.Addr}
	pcfg.ConnsPerServer = 1 // leaseproxy's default; Timeout 1s, MaxInFlight 1024
	pool, err := mcpool.New(pcfg, zaptest.NewLogger(t).Named("mcpool"))
	if err != nil {
		t.Fatalf("mcpool.New: %v", err)
	}
	t.Cleanup(func() { _ = pool.Close() })
	testenv.Eventually(t, 10*time.Second, "the pool's connection", func() bool { return pool.Stats()[0].Conns == 1 })
	cfg := DefaultConfig() // Lease.Wait 250ms
	cfg.Lease.TTL = 5 * time.Second
	p := startProxyOn(t, cfg, NewPoolBackend(pool))

	clients := make([]*client, n)
	for i := range clients {
		clients[i] = dial(t, p.Addr)
	}
	key := "herd:slowfill"
	var stored, notStored, misses atomic.Int64
	errs := make([]error, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			vs, err := c.get("get " + key)
			if err != nil {
				errs[i] = fmt.Errorf("get: %w", err)
				return
			}
			if len(vs) > 0 {
				return
			}
			misses.Add(1)
			time.Sleep(fill)
			v := fmt.Sprintf("from-db-%d", i)
			c.send(fmt.Sprintf("set %s 0 0 %d\r\n%s\r\n", key, len(v), v))
			l, err := c.br.ReadString('\n')
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
		t.Errorf("%d of %d clients failed", failed, n)
	}
	st, ps := p.Stats(), pool.Stats()[0]
	t.Logf("misses %d, stored %d, not stored %d; proxy: wins %d, wait timeouts %d, fills %d, refused %d; pool: requests %d, failures %d, rejected %d, breaker opens %d",
		misses.Load(), stored.Load(), notStored.Load(), st.LeaseWins, st.LeaseWaitTimeouts, st.Fills, st.RefusedFills,
		ps.Requests, ps.Failures, ps.Rejected, ps.Opens)
	if st.LeaseWaitTimeouts < n/2 {
		t.Fatalf("got %d wait timeouts; want most of the %d clients' waits over before the fill (the test's premise)", st.LeaseWaitTimeouts, n)
	}
	if got := stored.Load(); got != 1 {
		t.Errorf("got %d sets stored; want 1 (the lease's fill)", got)
	}
	if st.LeaseWins != 1 || st.Fills != 1 {
		t.Errorf("got %d lease wins and %d fills; want 1 and 1", st.LeaseWins, st.Fills)
	}
	if ps.Opens != 0 || ps.Failures != 0 || ps.Rejected != 0 {
		t.Errorf("got %d breaker opens, %d failed and %d rejected requests; want none (the server is healthy)", ps.Opens, ps.Failures, ps.Rejected)
	}
	// The herd cost the proxy a handful of requests, not a few per client.
	if ps.Requests > 50 {
		t.Errorf("got %d requests to memcached for a herd of %d; want at most 50", ps.Requests, n)
	}
	if v, ok := dial(t, p.Addr).get1(key); !ok || !strings.HasPrefix(v, "from-db-") {
		t.Errorf("after the herd: got %q, %v; want the fill's value", v, ok)
	}
}
