package bench

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgcache/pgcache/testenv"
)

// watcher records when each key of a prefix first reached one memcached,
// from memcached's own log ("watch fetchers": a delete looks the item up,
// found or not). The time is when the log line arrives here, an upper
// bound of when memcached applied the delete: the line's own ts= field
// cannot serve, as memcached 1.6.18 stamps some lines up to a second late.
type watcher struct {
	conn    net.Conn
	hb      net.Conn // the heartbeat's connection
	prefix  string
	mu      sync.Mutex // guards seen and skipped
	seen    map[int64]time.Time
	skipped int
	done    chan struct{}
}

func watch(addr, prefix string) (*watcher, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return nil, err
	}
	if _, err := c.Write([]byte("watch fetchers\r\n")); err != nil {
		c.Close()
		return nil, err
	}
	r := bufio.NewReaderSize(c, 1<<16)
	line, err := r.ReadString('\n')
	if err != nil || line != "OK\r\n" {
		c.Close()
		return nil, fmt.Errorf("watch %s: %q %v", addr, line, err)
	}
	hb, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		c.Close()
		return nil, err
	}
	w := &watcher{conn: c, hb: hb, prefix: prefix, seen: map[int64]time.Time{}, done: make(chan struct{})}
	// memcached's logger thread sleeps between polls of its workers'
	// buffers, 1/8 longer after each poll that finds nothing (up to a
	// second; logger.c), and a burst that comes while it sleeps long
	// overflows those buffers: lines are late, or lost.
	// A quiet get of a key outside the prefix every millisecond (logged,
	// and answered with nothing) keeps it awake.
	go func() {
		t := time.NewTicker(time.Millisecond)
		defer t.Stop()
		for range t.C {
			if _, err := hb.Write([]byte("mg bench-heartbeat q\r\n")); err != nil {
				return
			}
		}
	}()
	go func() {
		defer close(w.done)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			w.add(line, time.Now())
		}
	}()
	return w, nil
}

func (w *watcher) add(line string, at time.Time) {
	id, ok := parseWatch(line, w.prefix)
	w.mu.Lock()
	defer w.mu.Unlock()
	if strings.Contains(line, "skipped=") {
		w.skipped++
	}
	if ok {
		if _, dup := w.seen[id]; !dup {
			w.seen[id] = at
		}
	}
}

func (w *watcher) close() {
	w.hb.Close()
	w.conn.Close()
	<-w.done
}

// parseWatch reads "... key=<prefix><id> ..." (the key URI-encoded) and
// returns the id.
func parseWatch(line, prefix string) (int64, bool) {
	for _, f := range strings.Fields(line) {
		k, ok := strings.CutPrefix(f, "key=")
		if !ok {
			continue
		}
		key, err := url.PathUnescape(k) // memcached URI-encodes keys: lat%3A42
		if err != nil || !strings.HasPrefix(key, prefix) {
			return 0, false
		}
		id, err := strconv.ParseInt(key[len(prefix):], 10, 64)
		return id, err == nil
	}
	return 0, false
}

func TestParseWatch(t *testing.T) {
	for _, c := range []struct {
		line string
		id   int64
		ok   bool
	}{
		{"ts=1795229724.588621 gid=8 type=item_get key=lat%3A42 status=not_found clsid=0 cfd=26 size=0\r\n", 42, true},
		{"ts=1795229724.5 gid=8 type=item_get key=lat:7 status=found\n", 7, true},
		{"ts=1795229724.588621 gid=8 type=item_get key=item%3A42 status=found\n", 0, false},
		{"ts=1795229724.588621 gid=8 type=item_get key=lat%3Ax status=found\n", 0, false},
		{"ts=1795229724.588621 gid=8 type=item_get key=lat%ZZ1 status=found\n", 0, false},
		{"ts=1795229724.588621 gid=8 type=item_get status=found\n", 0, false},
	} {
		id, ok := parseWatch(c.line, "lat:")
		if id != c.id || ok != c.ok {
			t.Errorf("parseWatch(%q) = %d, %t; want %d, %t", c.line, id, ok, c.id, c.ok)
		}
	}
}

// BenchmarkCommitToPurge commits single-row transactions at a steady rate
// (BENCH_RATE, default 5000/s) for BENCH_SECONDS (default 10) after a 1 s
// warm-up, and reports per DC the p50, p99 and max from a commit's return
// to the client to its key's delete reaching memcached.
//
// Every key is set in both DCs' memcached before the run and must be gone
// from both after it: one left fails the benchmark (a lost invalidation).
// The times come from memcached's watch log, which may drop lines under a
// burst (counted in its stats as log_worker_dropped and
// log_watcher_skipped); a key gone without a line is counted as untimed
// and given the time its DC finished (every batch acked), an upper bound,
// so a dropped line never makes the figures look better.
// BENCH_LAT_DUMP names a file for every key's commit time and latency per
// DC (and the reference's), to see when the slow ones happened.
//
// The same run measures a reference (see refReader; BENCH_LAT_REF=0
// leaves it out): pg_recvlogical on its own slot, each row read by this
// process. Its p99/p50 (ref-p99/p50) is what the host's scheduling does
// to any consumer of these commits; each DC's latency over it, key by
// key, is what the pipeline adds.
func BenchmarkCommitToPurge(b *testing.B) {
	e := env(b)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	rate := envInt("BENCH_RATE", 5000)
	secs := envInt("BENCH_SECONDS", 10)
	for i := 0; i < b.N; i++ {
		slot, stream := nextName("lat"), nextName("BENCH_LAT")
		createSlots(ctx, b, e, slot)
		ps := pipeline(ctx, b, e, slot, stream)
		for _, p := range ps {
			p.ready(ctx)
		}
		base := int64(runID.Add(1)) * 100_000_000
		warm := rate
		total := warm + rate*secs
		keys := make([]string, total)
		for k := range keys {
			keys[k] = fmt.Sprintf("lat:%d", base+int64(k))
		}
		watchers := map[string][]*watcher{}
		drops := map[string]int64{}
		for _, dc := range e.DCs {
			preload(ctx, b, dc, keys)
			drops[dc.Name] = dcDrops(ctx, b, dc)
			for _, addr := range dc.MemcachedAddrs() {
				w, err := watch(addr, "lat:")
				if err != nil {
					b.Fatal(err)
				}
				defer w.close()
				watchers[dc.Name] = append(watchers[dc.Name], w)
			}
		}
		var ref *refReader
		if os.Getenv("BENCH_LAT_REF") != "0" {
			ref = startRef(ctx, b, e, base, total)
		}
		traced := traceDuring(b, ps, 3, 6)
		commits, elapsed := steadyWriter(ctx, b, e, base, total, rate)
		traced()
		b.Logf("%d commits in %v: %.0f commits/s (asked %d/s)", total, elapsed, float64(total)/elapsed.Seconds(), rate)
		done := drained(ctx, b, stream, ps)
		var refLat []time.Duration
		if ref != nil {
			lat, missing := refLatencies(commits, ref.wait(done.Add(2*time.Second)))
			if missing > 0 {
				b.Fatalf("reference: pg_recvlogical delivered %d of %d rows", total-missing, total)
			}
			refLat = lat
			sorted := slices.Clone(lat[warm:])
			slices.Sort(sorted)
			p50, p99, worst := sorted[len(sorted)/2], sorted[len(sorted)*99/100], sorted[len(sorted)-1]
			b.Logf("reference (pg_recvlogical, test_decoding, read by this process): commit to row read p50 %s p99 %s max %s (p99/p50 %.2f)",
				fmtMs(p50), fmtMs(p99), fmtMs(worst), float64(p99)/float64(p50))
			b.ReportMetric(float64(p50.Microseconds())/1000, "ref-p50-ms")
			b.ReportMetric(float64(p99.Microseconds())/1000, "ref-p99-ms")
			b.ReportMetric(float64(p99)/float64(p50), "ref-p99/p50")
		}
		lats := map[string][]time.Duration{}
		for _, dc := range e.DCs {
			seen := waitSeen(watchers[dc.Name], base, total, done.Add(2*time.Second))
			for _, w := range watchers[dc.Name] {
				w.close()
			}
			if left := present(ctx, b, dc, keys); len(left) > 0 {
				b.Fatalf("%s: %d of %d keys still in memcached after every batch was acked (a lost invalidation), e.g. %q", dc.Name, len(left), total, left[0])
			}
			dropped := dcDrops(ctx, b, dc) - drops[dc.Name]
			untimed := 0
			lat := make([]time.Duration, total)
			for k := range lat {
				at, ok := seen[base+int64(k)]
				if !ok {
					at = done
					if k >= warm {
						untimed++
					}
				}
				lat[k] = max(at.Sub(commits[k]), 0)
			}
			lats[dc.Name] = lat
			sorted := slices.Clone(lat[warm:])
			slices.Sort(sorted)
			p50, p99, worst := sorted[len(sorted)/2], sorted[len(sorted)*99/100], sorted[len(sorted)-1]
			b.Logf("%s: %d keys, all gone; commit to purge p50 %v p99 %v max %v (p99/p50 %.2f); %d untimed (memcached's log dropped %d lines)",
				dc.Name, len(sorted), p50, p99, worst, float64(p99)/float64(p50), untimed, dropped)
			b.ReportMetric(float64(p50.Microseconds())/1000, dc.Name+"-p50-ms")
			b.ReportMetric(float64(p99.Microseconds())/1000, dc.Name+"-p99-ms")
			b.ReportMetric(float64(worst.Microseconds())/1000, dc.Name+"-max-ms")
			b.ReportMetric(float64(p99)/float64(p50), dc.Name+"-p99/p50")
			b.ReportMetric(float64(untimed), dc.Name+"-untimed")
			if refLat != nil {
				// What the pipeline adds to the reference, key by key:
				// a stall of the host delays both alike and cancels out.
				over := make([]time.Duration, 0, total-warm)
				for k := warm; k < total; k++ {
					over = append(over, lat[k]-refLat[k])
				}
				slices.Sort(over)
				b.Logf("%s: over the reference, key by key: p50 %s p99 %s", dc.Name, fmtMs(over[len(over)/2]), fmtMs(over[len(over)*99/100]))
			}
		}
		b.ReportMetric(float64(total)/elapsed.Seconds(), "commits/s")
		if f := os.Getenv("BENCH_LAT_DUMP"); f != "" {
			dumpLatencies(b, f, commits, e.DCs, lats, refLat)
		}
		for _, p := range ps {
			p.stop()
		}
	}
}

// dumpLatencies writes one line per key: its commit time (Unix µs), its
// latency in µs in each DC, and the reference's (when it ran).
func dumpLatencies(b *testing.B, file string, commits []time.Time, dcs []*testenv.DC, lats map[string][]time.Duration, ref []time.Duration) {
	var sb strings.Builder
	for k, at := range commits {
		sb.WriteString(strconv.FormatInt(at.UnixMicro(), 10))
		for _, dc := range dcs {
			sb.WriteByte(' ')
			sb.WriteString(strconv.FormatInt(lats[dc.Name][k].Microseconds(), 10))
		}
		if ref != nil {
			sb.WriteByte(' ')
			sb.WriteString(strconv.FormatInt(ref[k].Microseconds(), 10))
		}
		sb.WriteByte('\n')
	}
	if err := os.WriteFile(file, []byte(sb.String()), 0o644); err != nil {
		b.Error(err)
	}
}

// steadyWriter inserts ids base..base+total-1 into bench_lat, one
// transaction each, released at rate a second to 16 connections, and
// returns when each commit returned to the client.
func steadyWriter(ctx context.Context, b *testing.B, e *testenv.Env, base int64, total, rate int) ([]time.Time, time.Duration) {
	b.Helper()
	const workers = 16
	commits := make([]time.Time, total)
	jobs := make(chan int, total)
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		conn, err := pgx.Connect(ctx, e.Primary.DSN(""))
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close(context.Background())
		if _, err := conn.Prepare(ctx, "ins", "INSERT INTO bench_lat (id) VALUES ($1)"); err != nil {
			b.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range jobs {
				if _, err := conn.Exec(ctx, "ins", base+int64(k)); err != nil {
					errs <- err
					return
				}
				commits[k] = time.Now()
			}
		}()
	}
	start := time.Now()
	interval := time.Second / time.Duration(rate)
	for k := 0; k < total; k++ {
		if d := time.Until(start.Add(time.Duration(k) * interval)); d > 0 {
			time.Sleep(d)
		}
		jobs <- k
	}
	close(jobs)
	wg.Wait()
	elapsed := time.Since(start)
	select {
	case err := <-errs:
		b.Fatal(err)
	default:
	}
	return commits, elapsed
}

// waitSeen waits until every id's key reached one of the watchers, or
// until deadline, and returns when each was first seen.
func waitSeen(ws []*watcher, base int64, total int, deadline time.Time) map[int64]time.Time {
	for {
		seen := map[int64]time.Time{}
		for _, w := range ws {
			w.mu.Lock()
			for id, at := range w.seen {
				if old, ok := seen[id]; !ok || at.Before(old) {
					seen[id] = at
				}
			}
			w.mu.Unlock()
		}
		missing := 0
		for k := 0; k < total; k++ {
			if _, ok := seen[base+int64(k)]; !ok {
				missing++
			}
		}
		if missing == 0 || time.Now().After(deadline) {
			return seen
		}
		time.Sleep(50 * time.Millisecond)
	}
}
