package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/testenv"
)

// envInt reads a positive integer knob from the environment.
func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// runID names one run's slots and stream apart from the others'.
var runID atomic.Int64

func nextName(prefix string) string {
	return fmt.Sprintf("%s_%d_%d", prefix, os.Getpid(), runID.Add(1))
}

// createSlots makes logical slots at the current WAL position, so each
// later consumer sees exactly the same WAL.
func createSlots(ctx context.Context, b *testing.B, e *testenv.Env, names ...string) {
	b.Helper()
	for _, n := range names {
		if err := e.Primary.Exec(ctx, "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", n); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() {
			_ = e.Primary.Exec(context.Background(), "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active", n)
		})
	}
}

// freshStream removes any earlier benchmark stream (they share the
// subject) and creates name in the first DC, as the tailer would.
func freshStream(ctx context.Context, b *testing.B, name string) {
	b.Helper()
	names := shared.js.StreamNames(ctx)
	var old []string
	for n := range names.Name() {
		old = append(old, n)
	}
	for _, n := range old {
		if err := shared.js.DeleteStream(ctx, n); err != nil && !errors.Is(err, jetstream.ErrStreamNotFound) {
			b.Fatal(err)
		}
	}
	if _, err := bus.EnsureStream(ctx, shared.js, bus.StreamConfig{Name: name, Placement: shared.env.DCs[0].Name}); err != nil {
		b.Fatal(err)
	}
}

// workload commits txs transactions on bench_items. Each inserts three
// rows, moves one of them to another owner, and four in five delete one:
// 4.8 row changes a transaction. It returns the row changes and the WAL
// position after the last commit, and then commits a marker row, so that
// a consumer that has seen the marker has seen everything before it.
func workload(ctx context.Context, b *testing.B, e *testenv.Env, txs int) (changes int, end uint64) {
	b.Helper()
	sql := fmt.Sprintf(`DO $$
DECLARE base bigint;
BEGIN
  SELECT coalesce(max(id), 0) INTO base FROM bench_items;
  FOR i IN 0..%d LOOP
    INSERT INTO bench_items VALUES
      (base+3*i+1, i %% 1000, 0, 'payload ' || i),
      (base+3*i+2, i %% 1000, 0, 'payload ' || i),
      (base+3*i+3, i %% 1000, 0, 'payload ' || i);
    UPDATE bench_items SET owner = owner + 1, v = v + 1 WHERE id = base+3*i+1;
    IF i %% 5 <> 0 THEN DELETE FROM bench_items WHERE id = base+3*i+2; END IF;
    COMMIT;
  END LOOP;
END $$`, txs-1)
	if err := e.Primary.Exec(ctx, sql); err != nil {
		b.Fatal(err)
	}
	changes = txs*4 + (txs - (txs+4)/5)
	return changes, marker(ctx, b, e)
}

// marker returns the current WAL position and then commits a row after it.
func marker(ctx context.Context, b *testing.B, e *testenv.Env) uint64 {
	b.Helper()
	var s string
	if err := e.Primary.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text", &s); err != nil {
		b.Fatal(err)
	}
	lsn, err := pglogrepl.ParseLSN(s)
	if err != nil {
		b.Fatal(err)
	}
	if err := e.Primary.Exec(ctx, "INSERT INTO bench_lat (id) VALUES ($1)", -runID.Add(1)); err != nil {
		b.Fatal(err)
	}
	return uint64(lsn)
}

// recvlogical drains slot up to end with pg_recvlogical (the reference)
// and returns how long the whole process took and its peak RSS.
func recvlogical(ctx context.Context, b *testing.B, e *testenv.Env, slot string, end uint64) (time.Duration, int64) {
	b.Helper()
	bins, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pg_recvlogical")
	if len(bins) == 0 {
		b.Fatal("pg_recvlogical not found (apt-get install postgresql-client; make setup does it)")
	}
	cmd := exec.CommandContext(ctx, bins[len(bins)-1], "-d", e.Primary.DSN(""), "-S", slot, "--start",
		"-E", pglogrepl.LSN(end).String(), "-o", "proto_version=1", "-o", "publication_names=bench",
		"-f", "/dev/null", "-F", "0", "--no-loop")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	// Its peak RSS is sampled while it runs (see peakRSS); the samples
	// cost it nothing.
	var rss atomic.Int64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			rss.Store(max(rss.Load(), peakRSS(cmd.Process.Pid)))
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}()
	err := cmd.Wait()
	d := time.Since(t0)
	close(stop)
	<-sampled
	if err != nil {
		b.Fatalf("pg_recvlogical: %v\n%s", err, out.Bytes())
	}
	return d, rss.Load()
}

// tailOnly runs a tail-only invalidator on slot until it has confirmed end,
// that is until JetStream acked every batch up to end, and returns how long
// that took from the process's start.
func tailOnly(ctx context.Context, b *testing.B, e *testenv.Env, slot string, end uint64) time.Duration {
	b.Helper()
	stream := nextName("BENCH_TAIL")
	freshStream(ctx, b, stream)
	p := startInvalidator(b, "tail", invalidatorConfig(e, e.DCs[0], slot, stream, true, false))
	d := p.confirmedAt(ctx, end).Sub(p.started)
	p.stop()
	return d
}

// BenchmarkTail measures WAL to acked in JetStream against pg_recvlogical
// on the same WAL, in the order reference, ours, ours, reference, so that
// neither side is favoured by what the other left in caches.
func BenchmarkTail(b *testing.B) {
	e := env(b)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	txs := envInt("BENCH_TXS", 52000)
	for i := 0; i < b.N; i++ {
		ref1, inv1, inv2, ref2 := nextName("ref"), nextName("inv"), nextName("inv"), nextName("ref")
		createSlots(ctx, b, e, ref1, inv1, inv2, ref2)
		changes, end := workload(ctx, b, e, txs)
		r1, _ := recvlogical(ctx, b, e, ref1, end)
		t1 := tailOnly(ctx, b, e, inv1, end)
		t2 := tailOnly(ctx, b, e, inv2, end)
		r2, _ := recvlogical(ctx, b, e, ref2, end)
		ref, ours := (r1+r2)/2, (t1+t2)/2
		b.Logf("%d changes in %d transactions: pg_recvlogical %v and %v, invalidator tail %v and %v", changes, txs, r1, r2, t1, t2)
		b.ReportMetric(float64(changes)/ours.Seconds(), "changes/s")
		b.ReportMetric(float64(changes)/ref.Seconds(), "ref-changes/s")
		b.ReportMetric(ref.Seconds()/ours.Seconds(), "x-recvlogical")
	}
}

// drained waits until every DC's purge consumer has acked the whole stream
// and returns when it saw that. Call it after the tailer has confirmed
// the end, when the stream holds everything.
func drained(ctx context.Context, b *testing.B, stream string, ps []*invalidator) time.Time {
	b.Helper()
	return drainedAll(ctx, b, shared.js, shared.env, stream, false, ps)
}

// pipeline starts the tailing and purging invalidator in the first DC and
// a purging one in every other DC.
func pipeline(ctx context.Context, b *testing.B, e *testenv.Env, slot, stream string) []*invalidator {
	b.Helper()
	freshStream(ctx, b, stream)
	var ps []*invalidator
	for i, dc := range e.DCs {
		ps = append(ps, startInvalidator(b, dc.Name, invalidatorConfig(e, dc, slot, stream, i == 0, true)))
	}
	return ps
}

// BenchmarkEndToEnd measures WAL to purged in both DCs' memcached (every
// batch acked by both DCs' purgers, each after its replica replayed the
// commit) against pg_recvlogical on the same WAL.
func BenchmarkEndToEnd(b *testing.B) {
	e := env(b)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	txs := envInt("BENCH_TXS", 52000)
	for i := 0; i < b.N; i++ {
		ref, inv := nextName("ref"), nextName("e2e")
		createSlots(ctx, b, e, ref, inv)
		changes, end := workload(ctx, b, e, txs)
		r, _ := recvlogical(ctx, b, e, ref, end)
		stream := nextName("BENCH_E2E")
		ps := pipeline(ctx, b, e, inv, stream)
		ps[0].confirmedAt(ctx, end)
		d := drained(ctx, b, stream, ps).Sub(ps[0].started)
		keys, _ := ps[0].metric("invalidator_keys_published_total")
		for _, p := range ps {
			p.stop()
		}
		b.Logf("%d changes (%.0f keys) in %d transactions: pg_recvlogical %v, purged in %d DCs %v", changes, keys, txs, r, len(e.DCs), d)
		b.ReportMetric(float64(changes)/d.Seconds(), "changes/s")
		b.ReportMetric(keys*float64(len(e.DCs))/d.Seconds(), "keys-purged/s")
		b.ReportMetric(float64(changes)/r.Seconds(), "ref-changes/s")
		b.ReportMetric(r.Seconds()/d.Seconds(), "x-recvlogical")
	}
}

// BenchmarkMillionRowRSS commits one transaction of 1,000,000 rows and
// reports the tailing invalidator's peak RSS until both DCs have purged
// its keys, with pg_recvlogical's on the same WAL as the reference.
func BenchmarkMillionRowRSS(b *testing.B) {
	e := env(b)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	rows := envInt("BENCH_BIG_ROWS", 1000000)
	for i := 0; i < b.N; i++ {
		ref, inv := nextName("ref"), nextName("big")
		createSlots(ctx, b, e, ref, inv)
		stream := nextName("BENCH_BIG")
		ps := pipeline(ctx, b, e, inv, stream)
		for _, p := range ps {
			p.ready(ctx)
		}
		t0 := time.Now()
		if err := e.Primary.Exec(ctx, `INSERT INTO bench_big SELECT g, 0
			FROM generate_series((SELECT coalesce(max(id), 0) FROM bench_big) + 1, (SELECT coalesce(max(id), 0) FROM bench_big) + $1) g`, rows); err != nil {
			b.Fatal(err)
		}
		committed := time.Since(t0)
		end := marker(ctx, b, e)
		ps[0].confirmedAt(ctx, end)
		d := drained(ctx, b, stream, ps).Sub(t0)
		var rss []int64
		for _, p := range ps {
			rss = append(rss, p.stop())
		}
		_, refRSS := recvlogical(ctx, b, e, ref, end)
		b.Logf("%d rows in one transaction (commit took %v): purged in %d DCs %v after the insert began; peak RSS tail+purge %d MB, purge only %d MB, pg_recvlogical %d MB (of the invalidators' resident sets at the end, %d and %d MB map files: the binary)",
			rows, committed, len(e.DCs), d, rss[0]>>20, rss[1]>>20, refRSS>>20, ps[0].rssFile>>20, ps[1].rssFile>>20)
		b.ReportMetric(float64(rss[0])/(1<<20), "tail-peak-MB")
		b.ReportMetric(float64(rss[1])/(1<<20), "purge-peak-MB")
		b.ReportMetric(float64(refRSS)/(1<<20), "ref-peak-MB")
	}
}
