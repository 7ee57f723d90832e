package tail

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/pgcache/pgcache/backoff"
	"github.com/pgcache/pgcache/batcher"
	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/counters"
	"github.com/pgcache/pgcache/wal"
)

// ErrIncrementsReset: the increments stream ends before the checkpoint,
// so it was deleted and created again and its sequences start over.
var ErrIncrementsReset = errors.New("tail: increments stream was recreated below the counters' checkpoint")

// IncrementStream is the increments stream's config: every subject under
// counters.IncrementSubjectPrefix, kept a week.
func IncrementStream(name, placement string) bus.StreamConfig {
	return bus.StreamConfig{
		Name: name, Subject: counters.IncrementSubjectPrefix + ">", Placement: placement,
		Description: "pgcache counter increments: {counter, key, delta} on counters.incr.<counter>",
		MaxAge:      7 * 24 * time.Hour,
	}
}

// hasIncrements reports whether a counter takes increments over NATS.
func hasIncrements(set *counters.Set) bool {
	for _, n := range set.Names() {
		if set.Counter(n).Table == "" {
			return true
		}
	}
	return false
}

// superviseIncrements runs the increments consumer until ctx ends. A
// fault of the increments (the stream deleted or recreated, a consumer
// that cannot be made) is a counters fault, never an invalidation one:
// it is logged with the repair step, counted, shown by
// invalidator_increments_up, and the consumer is tried again every
// incrementsRetry, while the WAL stream and the purges go on.
func (r *Role) superviseIncrements(ctx context.Context) {
	for {
		err := r.runIncrements(ctx)
		if ctx.Err() != nil {
			return
		}
		r.incUp.Set(0)
		if err != nil {
			r.ctrm.errors.WithLabelValues("increments_unavailable").Inc()
			r.log.Error("counter increments stopped; invalidation goes on. Counters without a table do not move until this is fixed "+
				"(RUNBOOK: counter increments stopped)", zap.Error(err), zap.Duration("retry_in", incrementsRetry))
		}
		if backoff.Wait(ctx, incrementsRetry) != nil {
			return
		}
	}
}

// incrementsRetry is how often a failed increments consumer is tried
// again.
const incrementsRetry = 30 * time.Second

// runIncrements applies increments from the stream until ctx ends. It
// starts once this process streams the slot (the active tail process), so
// a hot standby does not consume them too; two writers would anyway be
// stopped by the checkpoint check (batcher.ErrCheckpointMoved). The
// increments' checkpoint in the batcher is their acknowledgement: an
// ordered consumer starts after it, and a message at or below it is
// skipped.
func (r *Role) runIncrements(ctx context.Context) error {
	log := r.log.Named("increments")
	for r.stream.Stats().State != wal.StateStreaming {
		if err := backoff.Wait(ctx, 200*time.Millisecond); err != nil {
			return nil
		}
	}
	sc := IncrementStream(r.cfg.Increments.Name, r.cfg.Increments.Placement)
	src := NATSSource(sc.Name)
	retry := backoff.Policy{Min: 200 * time.Millisecond, Max: 5 * time.Second}
	// NATS may be restarting or cut off: wait for it rather than exit.
	var st jetstream.Stream
	for attempt := 0; ; attempt++ {
		var err error
		if st, err = bus.EnsureStream(ctx, r.js, sc); err == nil {
			break
		}
		if ctx.Err() != nil {
			return nil
		}
		d := retry.Delay(attempt)
		if attempt == 0 || attempt%10 == 9 {
			log.Warn("increments stream unavailable; retrying", zap.String("stream", sc.Name), zap.Int("attempt", attempt+1), zap.Duration("retry_in", d), zap.Error(err))
		}
		if backoff.Wait(ctx, d) != nil {
			return nil
		}
	}
	// Read the checkpoint now, not at start: a hot standby that took
	// over has an old one.
	if err := loadCheckpoints(ctx, r.batcher, r.log.Named("counters"), src); err != nil {
		return nil // ctx ended
	}
	from := r.batcher.Checkpoint(src).Major
	if info, err := st.Info(ctx); err == nil && from > 0 {
		switch {
		case info.State.LastSeq < from:
			// The stream was deleted and created again: its sequences
			// start over, below the checkpoint, and would all be skipped.
			r.ctrm.errors.WithLabelValues("increments_stream_reset").Inc()
			return fmt.Errorf("%w: stream %s ends at sequence %d, before the checkpoint %d; "+
				"delete the row %q of the checkpoint table once its counters are repaired or reset", ErrIncrementsReset, sc.Name, info.State.LastSeq, from, src)
		case info.State.FirstSeq > from+1:
			r.ctrm.errors.WithLabelValues("increments_expired").Inc()
			log.Error("increments were removed from the stream before they were counted (stream max age or limits); counters without a table may be low",
				zap.Uint64("checkpoint", from), zap.Uint64("first_seq", info.State.FirstSeq))
		}
	}
	occ := jetstream.OrderedConsumerConfig{FilterSubjects: []string{sc.Subject}, DeliverPolicy: jetstream.DeliverAllPolicy}
	if from > 0 {
		occ.DeliverPolicy, occ.OptStartSeq = jetstream.DeliverByStartSequencePolicy, from+1
	}
	cons, err := r.js.OrderedConsumer(ctx, sc.Name, occ)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("increments consumer: %w", err)
	}
	it, err := cons.Messages()
	if err != nil {
		return fmt.Errorf("increments consumer: %w", err)
	}
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	defer it.Stop()
	log.Info("consuming increments", zap.String("stream", sc.Name), zap.Uint64("from_seq", from+1))
	r.incUp.Set(1)
	for {
		msg, err := it.Next()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, jetstream.ErrMsgIteratorClosed) {
				return nil
			}
			log.Warn("increments: next message", zap.Error(err))
			continue
		}
		md, err := msg.Metadata()
		if err != nil {
			log.Warn("increments: message without metadata", zap.Error(err))
			continue
		}
		in := batcher.Input{Source: src, Pos: batcher.Pos{Major: md.Sequence.Stream}, Time: md.Timestamp}
		dl, err := r.cfg.Counters.ParseIncrement(msg.Data())
		if err != nil {
			r.ctrm.errors.WithLabelValues(CounterReason(err)).Inc()
			log.Warn("increment not applied", zap.Uint64("seq", md.Sequence.Stream), zap.String("subject", msg.Subject()), zap.Error(err))
		} else if want := counters.IncrementSubjectPrefix + dl.Counter; msg.Subject() != want {
			r.ctrm.errors.WithLabelValues("bad_subject").Inc()
			log.Warn("increment not applied: subject does not match its counter", zap.String("subject", msg.Subject()), zap.String("want", want))
		} else {
			in.Deltas = []batcher.Delta{batcher.Delta(dl)}
		}
		if _, err := r.batcher.Add(ctx, in); err != nil {
			if ctx.Err() != nil || errors.Is(err, batcher.ErrClosed) {
				return nil
			}
			return fmt.Errorf("increments: %w", err)
		}
	}
}
