package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/trace"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pgcache/pgcache/testenv"
)

// refReader is the same-run reference of BenchmarkCommitToPurge: a
// pg_recvlogical process on its own slot (test_decoding, so that each
// row is a line of text with its id) whose output this process reads
// line by line, stamping when each id arrived. Its latency, commit
// returned to the client to the row read here, is what any consumer of
// the WAL on this host sees: the walsender's decoding, a process woken
// per transaction, a pipe, and a goroutine of this process, all on the
// same cores as the pipeline. Its p99/p50 is the share of the tail
// that is the host's, not the pipeline's.
type refReader struct {
	cmd  *exec.Cmd
	base int64
	mu   sync.Mutex // guards seen, n
	seen []time.Time
	n    int
	done chan struct{}
}

// startRef creates a test_decoding slot now (so it sees every commit
// after this call) and streams it through pg_recvlogical.
func startRef(ctx context.Context, b *testing.B, e *testenv.Env, base int64, total int) *refReader {
	b.Helper()
	slot := nextName("latref")
	if err := e.Primary.Exec(ctx, "SELECT pg_create_logical_replication_slot($1, 'test_decoding')", slot); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		_ = e.Primary.Exec(context.Background(), "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active", slot)
	})
	bins, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pg_recvlogical")
	if len(bins) == 0 {
		b.Fatal("pg_recvlogical not found (apt-get install postgresql-client; make setup does it)")
	}
	cmd := exec.CommandContext(ctx, bins[len(bins)-1], "-d", e.Primary.DSN(""), "-S", slot, "--start",
		"-o", "skip-empty-xacts=1", "-o", "include-xids=0", "-f", "-", "-F", "0")
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	r := &refReader{cmd: cmd, base: base, seen: make([]time.Time, total), done: make(chan struct{})}
	go func() {
		defer close(r.done)
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			at := time.Now()
			id, ok := parseRef(sc.Text())
			if !ok || id < base || id >= base+int64(total) {
				continue
			}
			r.mu.Lock()
			if r.seen[id-base].IsZero() {
				r.seen[id-base] = at
				r.n++
			}
			r.mu.Unlock()
		}
	}()
	b.Cleanup(r.stop)
	return r
}

// parseRef reads the id of "table public.bench_lat: INSERT: id[bigint]:42 at[...]".
func parseRef(line string) (int64, bool) {
	rest, ok := strings.CutPrefix(line, "table public.bench_lat: INSERT: id[bigint]:")
	if !ok {
		return 0, false
	}
	if i := strings.IndexByte(rest, ' '); i >= 0 {
		rest = rest[:i]
	}
	id, err := strconv.ParseInt(rest, 10, 64)
	return id, err == nil
}

// wait waits until every id arrived or until deadline, stops the
// process, and returns when each id arrived (zero: never).
func (r *refReader) wait(deadline time.Time) []time.Time {
	for {
		r.mu.Lock()
		n := r.n
		r.mu.Unlock()
		if n == len(r.seen) || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	r.stop()
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.seen
}

func (r *refReader) stop() {
	if r.cmd.Process != nil && r.cmd.ProcessState == nil {
		_ = r.cmd.Process.Kill()
		_ = r.cmd.Wait()
	}
	<-r.done
}

func TestParseRef(t *testing.T) {
	for _, c := range []struct {
		line string
		id   int64
		ok   bool
	}{
		{"table public.bench_lat: INSERT: id[bigint]:42 at[timestamp with time zone]:'2026-12-02 04:36:18.1+00'", 42, true},
		{"table public.bench_lat: INSERT: id[bigint]:7", 7, true},
		{"table public.bench_items: INSERT: id[bigint]:42 owner[bigint]:1", 0, false},
		{"BEGIN", 0, false},
		{"table public.bench_lat: INSERT: id[bigint]:x", 0, false},
	} {
		id, ok := parseRef(c.line)
		if id != c.id || ok != c.ok {
			t.Errorf("parseRef(%q) = %d, %t; want %d, %t", c.line, id, ok, c.id, c.ok)
		}
	}
}

// refLatencies is each key's reference latency (0 for one never seen,
// counted in missing).
func refLatencies(commits, seen []time.Time) (lat []time.Duration, missing int) {
	lat = make([]time.Duration, len(commits))
	for k := range commits {
		if seen[k].IsZero() {
			missing++
			continue
		}
		lat[k] = max(seen[k].Sub(commits[k]), 0)
	}
	return lat, missing
}

func fmtMs(d time.Duration) string { return fmt.Sprintf("%.1fms", float64(d.Microseconds())/1000) }

// traceDuring saves an execution trace (runtime/trace, through
// /debug/pprof/trace) of each process, of secs seconds from after
// seconds in, under BENCH_TRACE_DIR; it returns at once, and the
// returned func waits for the traces. Read one with go tool trace.
func traceDuring(b *testing.B, ps []*invalidator, after, secs int) func() {
	dir := os.Getenv("BENCH_TRACE_DIR")
	if dir == "" {
		return func() {}
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // this process: the NATS servers, the writer, the watchers
		defer wg.Done()
		time.Sleep(time.Duration(after) * time.Second)
		f, err := os.Create(filepath.Join(dir, "bench.trace"))
		if err != nil {
			return
		}
		defer f.Close()
		if trace.Start(f) == nil {
			time.Sleep(time.Duration(secs) * time.Second)
			trace.Stop()
		}
	}()
	for _, p := range ps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(after) * time.Second)
			c := &http.Client{Timeout: time.Duration(secs+10) * time.Second}
			resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/trace?seconds=%d", p.port, secs))
			if err != nil {
				b.Logf("%s: trace: %v", p.name, err)
				return
			}
			defer resp.Body.Close()
			data, _ := io.ReadAll(resp.Body)
			_ = os.WriteFile(filepath.Join(dir, p.name+".trace"), data, 0o644)
		}()
	}
	return wg.Wait
}
