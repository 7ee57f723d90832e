package bench

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bradfitz/gomemcache/memcache"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/zap"

	"github.com/pgcache/pgcache/testenv"
)

// BenchmarkFlushRefill measures what a flush of a datacenter's whole pool
// (after a slot loss with on_slot_loss: flush) costs the database: readers
// read a hot set cache-aside, filling from the DC's replica on a miss, and
// the pool is flushed under them. Reported per reader path: database
// fills in the first second after the flush, and per second over the 5 s
// after it, straight to memcached (every concurrent miss queries) and
// through leaseproxy (one fill per key and lease). In make bench; the
// figures are in BENCHMARKS.md.
func BenchmarkFlushRefill(b *testing.B) {
	e := env(b)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// A hot set of 100 keys read by 128 readers, and a fill query of about
	// 10 ms (pg_sleep): the herd that a flush makes of every hot key.
	const keys, readers = 100, 128
	if err := e.Primary.Exec(ctx, `CREATE TABLE IF NOT EXISTS bench_hot (id bigint PRIMARY KEY, v text NOT NULL);
		INSERT INTO bench_hot SELECT g, md5(g::text) FROM generate_series(1, 2000) g ON CONFLICT DO NOTHING`); err != nil {
		b.Fatal(err)
	}
	dc := e.DCs[0]
	lsn, err := e.Primary.CurrentLSN(ctx)
	if err != nil {
		b.Fatal(err)
	}
	if err := dc.Replica.WaitReplayed(ctx, lsn); err != nil {
		b.Fatal(err)
	}
	port, err := testenv.FreePort()
	if err != nil {
		b.Fatal(err)
	}
	hport, err := testenv.FreePort()
	if err != nil {
		b.Fatal(err)
	}
	cfg := fmt.Sprintf("listen: 127.0.0.1:%d\nservers: [%s]\nflush_all: forward\nhttp: {listen: \"127.0.0.1:%d\"}\n",
		port, strings.Join(dc.MemcachedAddrs(), ", "), hport)
	proxy, err := testenv.NewDaemon("leaseproxy", shared.bins.Leaseproxy, b.TempDir(), cfg, hport, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	if err := proxy.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = proxy.Stop() }()
	proxyAddr := fmt.Sprintf("127.0.0.1:%d", port)
	testenv.Eventually(b, 30*time.Second, "leaseproxy up", func() bool { return memcache.New(proxyAddr).Ping() == nil })

	for _, path := range []struct {
		name  string
		addrs []string
	}{{"direct", dc.MemcachedAddrs()}, {"leaseproxy", []string{proxyAddr}}} {
		first, perSec := refill(ctx, b, dc.Replica.DSN(""), path.addrs, keys, readers)
		b.Logf("%s: %d database fills in the first second after the flush, %.0f/s over 5 s (%d hot keys, %d readers, 10 ms fills)", path.name, first, perSec, keys, readers)
		b.ReportMetric(float64(first), path.name+"-fills-1st-s")
		b.ReportMetric(perSec, path.name+"-fills/s")
	}
}

// refill runs readers over keys hot keys (Zipf) through addrs, lets the
// cache warm up, flushes every server, and counts the database reads.
func refill(ctx context.Context, b *testing.B, replicaDSN string, addrs []string, keys, readers int) (first int64, perSec float64) {
	b.Helper()
	db, err := pgxpool.New(ctx, replicaDSN+"&pool_max_conns=128")
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	mc := memcache.New(addrs...)
	mc.Timeout = 2 * time.Second
	mc.MaxIdleConns = readers
	var fills atomic.Int64
	rctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for r := 0; r < readers; r++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			z := rand.NewZipf(rand.New(rand.NewPCG(seed, 7)), 1.1, 1, uint64(keys-1))
			for rctx.Err() == nil {
				id := int64(z.Uint64()) + 1
				key := "hot:" + strconv.FormatInt(id, 10)
				if _, err := mc.Get(key); err == nil {
					continue
				}
				var v string
				if err := db.QueryRow(rctx, `SELECT v FROM bench_hot, pg_sleep(0.01) WHERE id = $1`, id).Scan(&v); err != nil {
					continue
				}
				fills.Add(1)
				_ = mc.Set(&memcache.Item{Key: key, Value: []byte(v)})
			}
		}(uint64(r))
	}
	time.Sleep(5 * time.Second) // warm up: the hot set is cached
	for _, a := range addrs {
		if err := memcache.New(a).FlushAll(); err != nil {
			b.Fatal(err)
		}
	}
	before := fills.Load()
	time.Sleep(time.Second)
	first = fills.Load() - before
	time.Sleep(4 * time.Second)
	perSec = float64(fills.Load()-before) / 5
	stop()
	wg.Wait()
	return first, perSec
}
