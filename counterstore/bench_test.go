package counterstore

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pgcache/pgcache/batcher"
)

// lagProbe measures, for a sample of inputs, the time from Add to the
// moment its position is reported durable (committed).
type lagProbe struct {
	mu      sync.Mutex // guards pending, lags
	pending []probe
	lags    []time.Duration
}

type probe struct {
	pos uint64
	at  time.Time
}

func (l *lagProbe) sent(pos uint64) {
	l.mu.Lock()
	l.pending = append(l.pending, probe{pos, time.Now()})
	l.mu.Unlock()
}

func (l *lagProbe) durable(_ string, p batcher.Pos) {
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	i := 0
	for ; i < len(l.pending) && l.pending[i].pos <= p.Major; i++ {
		l.lags = append(l.lags, now.Sub(l.pending[i].at))
	}
	l.pending = l.pending[i:]
}

func (l *lagProbe) p99() time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.lags) == 0 {
		return 0
	}
	s := slices.Clone(l.lags)
	slices.Sort(s)
	return s[len(s)*99/100]
}

// absorb feeds n deltas over groups hot groups through a batcher on pg,
// paced to rate events/s (0: as fast as Add takes them), and drains.
func absorb(tb testing.TB, ctx context.Context, pg *Store, source string, n, groups int, rate float64) (elapsed time.Duration, lag *lagProbe, st batcher.Stats) {
	lag = &lagProbe{}
	b, err := batcher.New(batcher.Config{MaxPending: 10000, Interval: 100 * time.Millisecond}, pg, nil)
	if err != nil {
		tb.Fatal(err)
	}
	if err := b.Load(ctx, source); err != nil {
		tb.Fatal(err)
	}
	from := b.Checkpoint(source).Major
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- b.Run(rctx) }()
	keys := make([]batcher.Delta, groups)
	for g := range keys {
		keys[g] = batcher.Delta{Counter: "bench", Group: fmt.Sprintf(`["%d"]`, g), Key: fmt.Sprintf("bench:%d", g), N: 1}
	}
	start := time.Now()
	for i := 0; i < n; i++ {
		if rate > 0 && i%64 == 0 {
			if ahead := time.Duration(float64(i)/rate*float64(time.Second)) - time.Since(start); ahead > 0 {
				time.Sleep(ahead)
			}
		}
		pos := from + uint64(i) + 1
		in := batcher.Input{Source: source, Pos: batcher.Pos{Major: pos, Minor: 0}, Deltas: keys[i%groups : i%groups+1]}
		if i%100 == 0 {
			lag.sent(pos)
			in.Ack = ackFunc(func() { lag.durable(source, batcher.Pos{Major: pos, Minor: 0}) })
		}
		if _, err := b.Add(ctx, in); err != nil {
			tb.Fatal(err)
		}
	}
	if err := b.Drain(ctx); err != nil {
		tb.Fatal(err)
	}
	elapsed = time.Since(start)
	if err := <-done; err != nil {
		tb.Fatal(err)
	}
	return elapsed, lag, b.Stats()
}

// BenchmarkAbsorb measures how many deltas per second the batcher takes,
// with the real Postgres flusher, 1000 hot groups, and a drain at the end
// (every delta committed when the clock stops).
func BenchmarkAbsorb(b *testing.B) {
	env, ctx := pgEnv(b)
	pg := newPG(b, ctx, env.Primary.DSN(""), "invalidate")
	b.ResetTimer()
	elapsed, lag, st := absorb(b, ctx, pg, "absorb", b.N, 1000, 0)
	b.StopTimer()
	ps := pg.Stats()
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "deltas/s")
	b.ReportMetric(float64(ps.Statements)/elapsed.Seconds(), "stmts/s")
	b.ReportMetric(float64(st.Flushes), "flushes")
	b.ReportMetric(float64(lag.p99().Microseconds())/1000, "lag-p99-ms")
}

// BenchmarkVersusNaive runs the same b.N events on 100 hot rows twice in
// one run: first the naive way (one UPDATE ... SET n = n + 1 per event,
// from 8 connections, as fast as Postgres takes them), then through the
// batcher paced at the rate the naive path reached. It reports both
// statement rates and their ratio. Use -benchtime=Nx for a fixed count.
func BenchmarkVersusNaive(b *testing.B) {
	env, ctx := pgEnv(b)
	dsn := env.Primary.DSN("")
	pg := newPG(b, ctx, dsn, "invalidate")
	if err := env.Primary.Exec(ctx, `CREATE TABLE naive (id int PRIMARY KEY, n bigint NOT NULL);
		INSERT INTO naive SELECT g, 0 FROM generate_series(0, 99) g`); err != nil {
		b.Fatal(err)
	}
	const conns, groups = 8, 100
	b.ResetTimer()
	var next atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for c := 0; c < conns; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := pgx.Connect(ctx, dsn)
			if err != nil {
				b.Error(err)
				return
			}
			defer conn.Close(context.Background())
			for {
				i := next.Add(1) - 1
				if i >= int64(b.N) {
					return
				}
				if _, err := conn.Exec(ctx, `UPDATE naive SET n = n + 1 WHERE id = $1`, int(i%groups)); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	naiveElapsed := time.Since(start)
	naiveRate := float64(b.N) / naiveElapsed.Seconds()

	before := pg.Stats()
	elapsed, lag, st := absorb(b, ctx, pg, "versus", b.N, groups, naiveRate)
	b.StopTimer()
	stmts := pg.Stats().Statements - before.Statements
	var sum int64
	if err := env.Primary.QueryRow(ctx, `SELECT sum(n) FROM naive`, &sum); err != nil {
		b.Fatal(err)
	}
	var batched int64
	if err := env.Primary.QueryRow(ctx, `SELECT coalesce(sum(n), 0) FROM pgcache_counters WHERE counter = 'bench'`, &batched); err != nil {
		b.Fatal(err)
	}
	if sum != int64(b.N) {
		b.Fatalf("naive path counted %d; want %d", sum, b.N)
	}
	b.ReportMetric(naiveRate, "events/s")
	b.ReportMetric(float64(b.N)/naiveElapsed.Seconds(), "naive-stmts/s")
	b.ReportMetric(float64(stmts)/elapsed.Seconds(), "batched-stmts/s")
	b.ReportMetric(float64(b.N)/float64(max(stmts, 1)), "stmt-ratio")
	b.ReportMetric(float64(st.Flushes), "flushes")
	b.ReportMetric(float64(lag.p99().Microseconds())/1000, "lag-p99-ms")
	b.Logf("N=%d: naive %d statements in %s; batched %d statements in %d flushes over %s (paced); stored total %d",
		b.N, b.N, naiveElapsed.Round(time.Millisecond), stmts, st.Flushes, elapsed.Round(time.Millisecond), batched)
}

// ackFunc is a batcher.Ack that calls itself.
type ackFunc func()

func (f ackFunc) Done() { f() }
