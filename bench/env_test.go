package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/pgcache/pgcache/testenv"
)

// shared is the environment every benchmark of a run uses: starting it
// takes about 9 s, so it is started once, on first use, and closed by
// TestMain.
var shared struct {
	once sync.Once
	env  *testenv.Env
	bin  string // the invalidator binary
	bins testenv.Binaries
	dir  string
	js   jetstream.JetStream
	nc   *nats.Conn
	err  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.nc != nil {
		shared.nc.Close()
	}
	if shared.env != nil {
		_ = shared.env.Close()
	}
	if shared.dir != "" {
		_ = os.RemoveAll(shared.dir)
	}
	os.Exit(code)
}

// schema holds the benchmark tables. REPLICA IDENTITY FULL gives every
// old-value key its column, as `invalidator check` asks of such rules.
const schema = `
CREATE TABLE IF NOT EXISTS bench_items (id bigint PRIMARY KEY, owner bigint NOT NULL, v int NOT NULL, payload text NOT NULL);
ALTER TABLE bench_items REPLICA IDENTITY FULL;
CREATE TABLE IF NOT EXISTS bench_lat (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS bench_big (id bigint PRIMARY KEY, v int NOT NULL);
DROP PUBLICATION IF EXISTS bench;
CREATE PUBLICATION bench FOR TABLE bench_items, bench_lat, bench_big;
`

// rules are the invalidator's rules for the benchmark tables: an item has
// its own key and its owner's list key, so a moved item touches three.
const rules = `rules:
  - table: public.bench_items
    keys: ["item:{id}", "owner_items:{owner}"]
  - table: public.bench_lat
    keys: ["lat:{id}"]
  - table: public.bench_big
    keys: ["big:{id}"]
`

// env returns the shared environment, starting it on first use.
func env(b *testing.B) *testenv.Env {
	b.Helper()
	shared.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		shared.dir, shared.err = os.MkdirTemp("", "pgcache-bench-")
		if shared.err != nil {
			return
		}
		bins, err := testenv.BuildBinaries(ctx, shared.dir)
		if err != nil {
			shared.err = err
			return
		}
		shared.bin, shared.bins = bins.Invalidator, bins
		// BENCH_INVALIDATOR_BIN runs another build of the invalidator (an
		// A/B against older code with these benchmarks).
		if alt := os.Getenv("BENCH_INVALIDATOR_BIN"); alt != "" {
			shared.bin, shared.bins.Invalidator = alt, alt
		}
		// Other test packages may take a picked port first: retry once,
		// as testenv.New does.
		for attempt := 0; attempt < 2; attempt++ {
			if shared.env, shared.err = testenv.Start(ctx, testenv.Options{}); shared.err == nil {
				break
			}
		}
		if shared.err != nil {
			return
		}
		if shared.err = shared.env.Primary.Exec(ctx, schema); shared.err != nil {
			return
		}
		shared.nc, shared.err = nats.Connect(shared.env.DCs[0].NATS.URL())
		if shared.err != nil {
			return
		}
		shared.js, shared.err = jetstream.New(shared.nc)
	})
	if shared.err != nil {
		b.Fatalf("benchmark environment: %v", shared.err)
	}
	return shared.env
}

// invalidator is one invalidator process run by a benchmark, through
// testenv's process runner.
type invalidator struct {
	*testenv.Daemon
	b       *testing.B
	name    string
	port    int
	started time.Time
	rssFile int64 // RssFile when stopped (see procStatus)
}

// invalidatorConfig is a config for dc. tail makes it hold slot; purge
// makes it purge dc's memcached pool, gated on dc's replica.
func invalidatorConfig(e *testenv.Env, dc *testenv.DC, slot, stream string, tail, purge bool) string {
	// BENCH_TRACE_DIR turns on the daemons' /debug/pprof/ (http.pprof),
	// for the execution traces BenchmarkCommitToPurge takes there.
	pprof := ""
	if os.Getenv("BENCH_TRACE_DIR") != "" {
		pprof = ", pprof: true"
	}
	cfg := fmt.Sprintf("dc: %s\npostgres: {dsn: %q, slot: %s, publication: bench}\nnats: {url: %q, stream: %s, placement: %s}\ntail: %t\nhttp: {listen: \"127.0.0.1:0\"%s}\n",
		dc.Name, e.Primary.DSN(""), slot, dc.NATS.URL(), stream, e.DCs[0].Name, tail, pprof)
	if purge {
		cfg += fmt.Sprintf("purge:\n  servers: [%s]\n  replica_dsn: %q\n", strings.Join(dc.MemcachedAddrs(), ", "), dc.Replica.DSN(""))
		// BENCH_PURGE_YAML adds settings to the purge section, one
		// "key: value" per line, to try a setting without a rebuild.
		for _, l := range strings.Split(os.Getenv("BENCH_PURGE_YAML"), ";") {
			if l = strings.TrimSpace(l); l != "" {
				cfg += "  " + l + "\n"
			}
		}
	}
	return cfg + rules
}

// startInvalidator runs the invalidator binary with config.
func startInvalidator(b *testing.B, name, config string) *invalidator {
	b.Helper()
	port, err := testenv.FreePort()
	if err != nil {
		b.Fatal(err)
	}
	config = strings.Replace(config, "127.0.0.1:0\"", fmt.Sprintf("127.0.0.1:%d\"", port), 1)
	d, err := testenv.NewDaemon(name, shared.bin, b.TempDir(), config, port, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	// BENCH_INVALIDATOR_ENV adds variables to the processes' environment
	// (space-separated, e.g. GODEBUG=gctrace=1).
	d.Env = strings.Fields(os.Getenv("BENCH_INVALIDATOR_ENV"))
	p := &invalidator{Daemon: d, b: b, name: name, port: port, started: time.Now()}
	if err := d.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		p.stop()
		if b.Failed() {
			b.Logf("=== %s log (last 6 KB) ===\n%s", p.name, d.LogTail(6<<10))
		}
	})
	return p
}

// peakRSS is the process's peak resident set (VmHWM) in bytes, or 0 once
// it has exited. Rusage's Maxrss cannot serve here: Linux carries the
// parent's high-water mark across fork and exec into it.
func peakRSS(pid int) int64 { return procStatus(pid, "VmHWM") }

// procStatus is one "<field>: N kB" of /proc/<pid>/status in bytes (0:
// none). RssFile is the part of the resident set that maps files, for
// a Go daemon mostly its own binary's pages.
func procStatus(pid int, field string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}

// stop drains the process with SIGTERM and returns its peak RSS in bytes,
// read just before the signal.
func (p *invalidator) stop() int64 {
	pid := p.PID()
	if pid == 0 {
		return 0
	}
	rss := peakRSS(pid)
	p.rssFile = procStatus(pid, "RssFile")
	p.dumpMetrics()
	if err := p.Stop(); err != nil {
		p.b.Errorf("%s did not drain: %v", p.name, err)
	}
	if dir := os.Getenv("BENCH_METRICS_DIR"); dir != "" {
		if log, err := os.ReadFile(p.LogPath()); err == nil {
			_ = os.WriteFile(filepath.Join(dir, fmt.Sprintf("%s-%s.log", p.b.Name(), p.name)), log, 0o644)
		}
	}
	return rss
}

// exited reports the process's log when it exited early.
func (p *invalidator) exited() error {
	if p.Running() {
		return nil
	}
	return fmt.Errorf("%s exited early (code %d):\n%s", p.name, p.ExitCode(), p.LogTail(4096))
}

// dumpMetrics saves the process's /metrics page under BENCH_METRICS_DIR,
// when set, for a look at where the time went (stop saves its log there
// too).
func (p *invalidator) dumpMetrics() {
	dir := os.Getenv("BENCH_METRICS_DIR")
	if dir == "" {
		return
	}
	resp, err := httpc.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", p.port))
	if err != nil {
		return
	}
	defer resp.Body.Close()
	page, _ := io.ReadAll(resp.Body)
	_ = os.WriteFile(filepath.Join(dir, fmt.Sprintf("%s-%s.prom", p.b.Name(), p.name)), page, 0o644)
}

// httpc asks for /metrics uncompressed: Go's client asks for gzip by
// default, and a gzip writer per scrape (800 KB of buffers) every few
// milliseconds was the tailing process's largest allocation in the
// 1M-row benchmark, and CPU taken from what is measured.
var httpc = &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableCompression: true}}

// metric reads one metric (summed over its labels) from the process's
// /metrics.
func (p *invalidator) metric(name string) (float64, error) {
	resp, err := httpc.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", p.port))
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("%s /metrics: %s", p.name, resp.Status)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	found, sum := false, 0.0
	for sc.Scan() {
		line, ok := strings.CutPrefix(sc.Text(), name)
		if !ok || line == "" || (line[0] != ' ' && line[0] != '{') {
			continue
		}
		if i := strings.LastIndexByte(line, '}'); i >= 0 {
			line = line[i+1:]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			continue
		}
		found, sum = true, sum+v
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	if !found {
		return 0, fmt.Errorf("%w: %s", testenv.ErrNoMetric, name)
	}
	return sum, nil
}

// ready waits until /readyz answers 200.
func (p *invalidator) ready(ctx context.Context) {
	p.b.Helper()
	for {
		resp, err := httpc.Get(fmt.Sprintf("http://127.0.0.1:%d/readyz", p.port))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if err := p.exited(); err != nil {
			p.b.Fatal(err)
		}
		select {
		case <-ctx.Done():
			p.b.Fatalf("%s not ready: %v", p.name, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// confirmedAt waits until the process has confirmed lsn to the slot (every
// batch up to it acked by JetStream) and returns when it saw that.
func (p *invalidator) confirmedAt(ctx context.Context, lsn uint64) time.Time {
	p.b.Helper()
	for {
		v, err := p.metric("invalidator_slot_confirmed_lsn")
		if err == nil && uint64(v) >= lsn {
			return time.Now()
		}
		if err := p.exited(); err != nil {
			p.b.Fatal(err)
		}
		select {
		case <-ctx.Done():
			p.b.Fatalf("%s: confirmed LSN %x, want %x: %v", p.name, uint64(v), lsn, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}
