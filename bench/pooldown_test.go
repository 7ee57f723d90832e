package bench

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// BenchmarkPoolDownRSS: the purge role's peak RSS while its DC's whole
// memcached pool is down (every server SIGSTOPped: connections hang, as
// with a dead host) for BENCH_DOWN_SECONDS (default 60) under
// BENCH_DOWN_RATE single-row commits a second (default 2,000). The purger
// records the down servers' keys in its backlog stream and acks their
// batches, so its memory must stay flat; when the pool returns, the
// backlog is applied. Every key was set in both DCs' memcached before the
// run and must be gone from both at the end: one left fails the
// benchmark. Reported: the down DC's purge-only process and the other
// DC's tail+purge process, peak RSS.
func BenchmarkPoolDownRSS(b *testing.B) {
	e := env(b)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	rate := envInt("BENCH_DOWN_RATE", 2000)
	secs := envInt("BENCH_DOWN_SECONDS", 60)
	down := e.DCs[len(e.DCs)-1]
	for i := 0; i < b.N; i++ {
		slot, stream := nextName("down"), nextName("BENCH_DOWN")
		createSlots(ctx, b, e, slot)
		ps := pipeline(ctx, b, e, slot, stream)
		for _, p := range ps {
			p.ready(ctx)
		}
		base := int64(runID.Add(1)) * 100_000_000
		total := rate * secs
		keys := make([]string, total)
		for k := range keys {
			keys[k] = fmt.Sprintf("lat:%d", base+int64(k))
		}
		for _, dc := range e.DCs {
			preload(ctx, b, dc, keys)
		}
		for _, m := range down.Memcached {
			if err := m.Pause(); err != nil {
				b.Fatal(err)
			}
		}
		resumed := false
		resume := func() {
			if resumed {
				return
			}
			resumed = true
			for _, m := range down.Memcached {
				if err := m.Resume(); err != nil {
					b.Error(err)
				}
			}
		}
		defer resume()
		_, elapsed := steadyWriter(ctx, b, e, base, total, rate)
		resume()
		t0 := time.Now()
		drained(ctx, b, stream, ps)
		// The backlog is applied once the servers answer a probe: wait
		// until the down DC's purger holds nothing.
		for {
			v, err := ps[len(ps)-1].metric("invalidator_server_pending_keys")
			if err == nil && v == 0 {
				break
			}
			if time.Since(t0) > 2*time.Minute {
				b.Fatalf("%s: keys still pending 2 minutes after the pool returned", down.Name)
			}
			time.Sleep(100 * time.Millisecond)
		}
		applied := time.Since(t0)
		for _, dc := range e.DCs {
			if left := present(ctx, b, dc, keys); len(left) > 0 {
				b.Fatalf("%s: %d of %d keys still in memcached after the pool of %s was down and back: lost invalidations, e.g. %q",
					dc.Name, len(left), total, down.Name, left[0])
			}
		}
		var rss []int64
		for _, p := range ps {
			rss = append(rss, p.stop())
		}
		b.Logf("%s's pool down for %v under %.0f commits/s (%d keys): every key gone in both DCs %v after it returned; peak RSS %s purge-only %d MB, %s tail+purge %d MB",
			down.Name, elapsed.Round(time.Second), float64(total)/elapsed.Seconds(), total, applied.Round(time.Millisecond), down.Name, rss[len(rss)-1]>>20, e.DCs[0].Name, rss[0]>>20)
		b.ReportMetric(float64(rss[len(rss)-1])/(1<<20), "down-purge-peak-MB")
		b.ReportMetric(float64(rss[0])/(1<<20), "tail-peak-MB")
	}
}
