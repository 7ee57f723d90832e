package bench

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgcache/pgcache/testenv"
)

// BenchmarkPurgeScaleOut: purge processes of one DC share the DC's
// durable consumer (purge-<dc>), so a DC that outgrows one purger runs a
// second with the same config. The stream is filled once (the
// end-to-end workload, BENCH_SCALE_TXS transactions, default 100,000,
// published by a tail-only process); then, in each round, the DC's
// consumer is deleted (the next one starts from the stream's first
// message), every key is set in the DC's memcached, and N purge-only
// processes drain the stream. The rate is the stream's messages acked
// from when all N were ready to the end, as keys/s (the stream's keys,
// one per change), for N = 1 and 2. The
// purgers run with purge.max_bytes 1 MiB, so that one does not take the
// whole stream into its in-flight window before the other has started.
//
// A third round runs two and kills one with kill -9 (its process group,
// as systemd would see it die) once a quarter of the stream is acked and
// it holds keys it has not applied: the messages it held are redelivered
// to the other after the consumer's ack wait (30 s). In every round each
// key must be gone from memcached at the end; one left fails the
// benchmark.
func BenchmarkPurgeScaleOut(b *testing.B) {
	e := env(b)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	dc := e.DCs[0]
	txs := envInt("BENCH_SCALE_TXS", 100000)
	for i := 0; i < b.N; i++ {
		f := fillStream(ctx, b, e, txs)
		for _, n := range []int{1, 2} {
			r := purgeRound(ctx, b, e, dc, f, n, false)
			b.Logf("%d purge process(es) in %s: %d messages (%d keys, %d distinct, each checked gone) drained in %v after all were ready: %.0f keys/s",
				n, dc.Name, f.msgs, f.published, len(f.keys), r.took, r.rate)
			b.ReportMetric(r.rate, fmt.Sprintf("keys/s-%dproc", n))
		}
		r := purgeRound(ctx, b, e, dc, f, 2, true)
		b.Logf("2 purge processes, one killed (kill -9) holding %d keys: %d messages (%d keys, %d distinct) drained in %v, up to %d redelivered at once, every key gone",
			r.killedHeld, f.msgs, f.published, len(f.keys), r.took, r.redelivered)
		b.ReportMetric(float64(r.redelivered), "redelivered-after-kill")
	}
}

// filled is a stream holding a workload.
type filled struct {
	slot, stream string
	keys         []string // every key the workload invalidates
	published    int      // keys in the stream (a key comes once per change)
	msgs         uint64   // the stream's last sequence
}

// fillStream publishes the workload of txs transactions to a fresh
// stream with a tail-only process.
func fillStream(ctx context.Context, b *testing.B, e *testenv.Env, txs int) filled {
	b.Helper()
	f := filled{slot: nextName("scale"), stream: nextName("BENCH_SCALE")}
	createSlots(ctx, b, e, f.slot)
	freshStream(ctx, b, f.stream)
	var base int64
	if err := e.Primary.QueryRow(ctx, "SELECT coalesce(max(id), 0) FROM bench_items", &base); err != nil {
		b.Fatal(err)
	}
	_, end := workload(ctx, b, e, txs)
	// The workload's keys: every item it inserted, every owner's list.
	for id := base + 1; id <= base+3*int64(txs); id++ {
		f.keys = append(f.keys, fmt.Sprintf("item:%d", id))
	}
	for o := 0; o <= min(txs, 1000); o++ {
		f.keys = append(f.keys, fmt.Sprintf("owner_items:%d", o))
	}
	tail := startInvalidator(b, "tail", invalidatorConfig(e, e.DCs[0], f.slot, f.stream, true, false))
	tail.confirmedAt(ctx, end)
	published, err := tail.metric("invalidator_keys_published_total")
	if err != nil {
		b.Fatal(err)
	}
	f.published = int(published)
	tail.stop()
	s, err := shared.js.Stream(ctx, f.stream)
	if err != nil {
		b.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		b.Fatal(err)
	}
	f.msgs = info.State.LastSeq
	return f
}

type scaleResult struct {
	took        time.Duration
	rate        float64 // keys/s
	redelivered int     // the most messages seen redelivered at once
	killedHeld  int     // keys the killed process had not applied
}

// purgeRound deletes dc's consumer of f's stream, sets every key of f
// in dc's memcached, then runs n purge-only processes of dc until the
// new consumer has acked the whole stream, and fails if a key is left.
// With kill, one of them is killed (kill -9) once a quarter of the stream
// is acked and it holds keys it has not applied.
func purgeRound(ctx context.Context, b *testing.B, e *testenv.Env, dc *testenv.DC, f filled, n int, kill bool) scaleResult {
	b.Helper()
	s, err := shared.js.Stream(ctx, f.stream)
	if err != nil {
		b.Fatal(err)
	}
	if err := s.DeleteConsumer(ctx, "purge-"+dc.Name); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
		b.Fatal(err)
	}
	preload(ctx, b, dc, f.keys)
	cfg := invalidatorConfig(e, dc, f.slot, f.stream, false, true)
	cfg = strings.Replace(cfg, "purge:\n", "purge:\n  max_bytes: 1048576\n", 1)
	var ps []*invalidator
	for j := 0; j < n; j++ {
		ps = append(ps, startInvalidator(b, fmt.Sprintf("%s-purge%d", dc.Name, j), cfg))
	}
	for _, p := range ps {
		p.ready(ctx)
	}
	t0 := time.Now()
	floor0 := ackFloor(ctx, b, s, dc)
	var r scaleResult
	live := ps
	for {
		ci := consumerInfo(ctx, b, s, dc)
		if ci != nil && ci.AckFloor.Stream >= f.msgs && ci.NumAckPending == 0 {
			break
		}
		if ci != nil {
			r.redelivered = max(r.redelivered, ci.NumRedelivered)
		}
		if kill && len(live) == n && ci != nil && ci.AckFloor.Stream >= f.msgs/4 {
			// Kill it while it holds keys it has not applied, so that
			// their messages must come again to the other.
			if held, err := ps[0].metric("invalidator_pending_keys"); err == nil && held > 0 {
				if err := ps[0].Kill(); err != nil {
					b.Fatal(err)
				}
				live, r.killedHeld = ps[1:], int(held)
				b.Logf("killed %s (kill -9) holding %.0f keys, at stream sequence %d of %d acked, %d messages pending", ps[0].name, held, ci.AckFloor.Stream, f.msgs, ci.NumAckPending)
			}
		}
		for _, p := range live {
			if err := p.exited(); err != nil {
				b.Fatal(err)
			}
		}
		select {
		case <-ctx.Done():
			b.Fatalf("%s's consumer of %s not drained: %v", dc.Name, f.stream, ctx.Err())
		case <-time.After(2 * time.Millisecond):
		}
	}
	r.took = time.Since(t0)
	if kill && len(live) == n {
		b.Fatalf("the stream drained before a purger could be killed while holding keys")
	}
	for _, p := range live {
		p.stop()
	}
	if left := present(ctx, b, dc, f.keys); len(left) > 0 {
		b.Fatalf("%s: %d of %d keys still in memcached after the stream was drained by %d purge processes (kill: %t): lost invalidations, e.g. %q",
			dc.Name, len(left), len(f.keys), n, kill, left[0])
	}
	r.rate = float64(f.published) * float64(f.msgs-floor0) / float64(f.msgs) / r.took.Seconds()
	return r
}

func consumerInfo(ctx context.Context, b *testing.B, s jetstream.Stream, dc *testenv.DC) *jetstream.ConsumerInfo {
	b.Helper()
	// A JetStream API request can go unanswered (seen once while the
	// consumer was being made): each read gets its own deadline.
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	c, err := s.Consumer(ctx, "purge-"+dc.Name)
	if err != nil {
		return nil
	}
	ci, err := c.Info(ctx)
	if err != nil {
		return nil
	}
	return ci
}

func ackFloor(ctx context.Context, b *testing.B, s jetstream.Stream, dc *testenv.DC) uint64 {
	b.Helper()
	if ci := consumerInfo(ctx, b, s, dc); ci != nil {
		return ci.AckFloor.Stream
	}
	return 0
}
