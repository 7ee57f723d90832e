package bench

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/testenv"
)

// The benchmarks' own view of a DC's memcached: keys are set before the
// transactions that invalidate them commit, and checked gone afterwards,
// so a lost invalidation fails the benchmark whatever memcached's watch
// log showed. Keys are placed as the invalidator places them (ketama over
// the DC's servers) and sent as pipelined quiet meta commands on a plain
// connection per server.

// placement splits keys by the server of dc that holds them.
func placement(b *testing.B, dc *testenv.DC, keys []string) map[string][]string {
	b.Helper()
	cfg := mcpool.DefaultConfig()
	cfg.Servers = dc.MemcachedAddrs()
	pool, err := mcpool.New(cfg, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	defer pool.Close()
	out := map[string][]string{}
	for _, k := range keys {
		i := pool.Pick(k)
		out[pool.Addr(i)] = append(out[pool.Addr(i)], k)
	}
	return out
}

// chain sends one quiet command per key (line(key), then the optional
// payload) to addr, then mn, and returns every answer line before MN:
// quiet commands answer only what is not routine (a failed set, a hit of
// mg ... q).
func chain(ctx context.Context, addr string, keys []string, line func(string) string) ([]string, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	werr := make(chan error, 1)
	go func() {
		w := bufio.NewWriterSize(c, 1<<16)
		for _, k := range keys {
			if _, err := w.WriteString(line(k)); err != nil {
				werr <- err
				return
			}
		}
		_, _ = w.WriteString("mn\r\n")
		werr <- w.Flush()
	}()
	r := bufio.NewReaderSize(c, 1<<16)
	var out []string
	for {
		l, err := r.ReadString('\n')
		if err != nil {
			return out, fmt.Errorf("%s: %w", addr, err)
		}
		if l == "MN\r\n" {
			break
		}
		out = append(out, strings.TrimSpace(l))
	}
	return out, <-werr
}

// preload sets every key (a 1-byte value, no expiry) in dc's pool.
func preload(ctx context.Context, b *testing.B, dc *testenv.DC, keys []string) {
	b.Helper()
	for addr, ks := range placement(b, dc, keys) {
		bad, err := chain(ctx, addr, ks, func(k string) string { return "ms " + k + " 1 q\r\nx\r\n" })
		if err != nil || len(bad) > 0 {
			b.Fatalf("%s: preload %d keys on %s: %v %q", dc.Name, len(ks), addr, err, bad)
		}
	}
}

// present returns the keys still in dc's pool.
func present(ctx context.Context, b *testing.B, dc *testenv.DC, keys []string) []string {
	b.Helper()
	var left []string
	for addr, ks := range placement(b, dc, keys) {
		hits, err := chain(ctx, addr, ks, func(k string) string { return "mg " + k + " k q\r\n" })
		if err != nil {
			b.Fatalf("%s: check %d keys on %s: %v", dc.Name, len(ks), addr, err)
		}
		for _, h := range hits {
			// "HD k<key>" for a key that is still there.
			f := strings.Fields(h)
			if len(f) < 2 || f[0] != "HD" || !strings.HasPrefix(f[1], "k") {
				b.Fatalf("%s: check on %s: unexpected answer %q", dc.Name, addr, h)
			}
			left = append(left, f[1][1:])
		}
	}
	return left
}

// logDrops is what memcached's logger dropped so far on addr: lines
// its worker threads could not buffer (log_worker_dropped) and lines a
// watcher was too slow for (log_watcher_skipped). Either makes a watch
// log incomplete.
func logDrops(ctx context.Context, addr string) (int64, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("stats\r\n")); err != nil {
		return 0, err
	}
	r := bufio.NewReader(c)
	var n int64
	for {
		l, err := r.ReadString('\n')
		if err != nil {
			return 0, err
		}
		if l == "END\r\n" {
			return n, nil
		}
		f := strings.Fields(l)
		if len(f) == 3 && (f[1] == "log_worker_dropped" || f[1] == "log_watcher_skipped") {
			v, _ := strconv.ParseInt(f[2], 10, 64)
			n += v
		}
	}
}

// dcDrops sums logDrops over dc's servers.
func dcDrops(ctx context.Context, b *testing.B, dc *testenv.DC) int64 {
	b.Helper()
	var n int64
	for _, addr := range dc.MemcachedAddrs() {
		v, err := logDrops(ctx, addr)
		if err != nil {
			b.Fatalf("%s: stats of %s: %v", dc.Name, addr, err)
		}
		n += v
	}
	return n
}
