package tail

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/pgcache/pgcache/backoff"
	"github.com/pgcache/pgcache/batcher"
	"github.com/pgcache/pgcache/counters"
	"github.com/pgcache/pgcache/row"
	"github.com/pgcache/pgcache/wal"
)

// WALSource is the batcher source of WAL-derived deltas.
const WALSource = "wal"

// NATSSource is the batcher source of the increments stream name.
func NATSSource(stream string) string { return "nats:" + stream }

// counterMetrics count counter inputs that could not be applied.
type counterMetrics struct {
	errors *prometheus.CounterVec
}

func newCounterMetrics(reg prometheus.Registerer) *counterMetrics {
	m := &counterMetrics{errors: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "invalidator_counter_errors_total", Help: "Counter inputs that could not be applied, by reason."}, []string{"reason"})}
	if reg != nil {
		reg.MustRegister(m.errors)
	}
	return m
}

// CounterReason names a counter error for the metric label.
func CounterReason(err error) string {
	switch {
	case errors.Is(err, counters.ErrOldValueMissing):
		return "old_value_missing"
	case errors.Is(err, counters.ErrColumnMissing):
		return "column_missing"
	case errors.Is(err, counters.ErrUnchangedToast):
		return "unchanged_toast"
	case errors.Is(err, counters.ErrKey):
		return "bad_key"
	case errors.Is(err, counters.ErrBadIncrement):
		return "bad_increment"
	case errors.Is(err, counters.ErrUnknownCounter):
		return "unknown_counter"
	case errors.Is(err, counters.ErrNotIncrementable):
		return "not_incrementable"
	case errors.Is(err, counters.ErrBadRepair):
		return "bad_repair"
	}
	return "other"
}

// handlerWait bounds how long the counter handler waits on the primary
// (a checkpoint read, a flush to make room) inside the WAL stream. Past
// it, the handler returns wal.ErrRetry: the stream lets go of the
// replication connection and delivers the transaction again later. A
// primary shutting down waits for its walsenders' readers, so a handler
// that waited for the primary with the connection open would wait
// forever (seen in the chaos test's primary restart).
const handlerWait = 5 * time.Second

// counterHandler turns the WAL into batcher inputs. It is used from wal's
// goroutine only.
type counterHandler struct {
	set *counters.Set
	b   *batcher.Batcher
	m   *counterMetrics
	log *zap.Logger
	// repairs is the table of repair requests ("schema.table"): an INSERT
	// into it is a repair, written by `invalidator repair` or a first
	// count with the invalidator's role.
	repairs string

	commit uint64 // the open transaction's commit LSN
	ord    uint64 // ordinal of the last counted input in it
	buf    []counters.Delta
	// reloaded: the checkpoints were read again after this process
	// started to stream (a hot standby that took over has older ones).
	reloaded bool
	// wait bounds a wait on the primary (handlerWait).
	wait time.Duration
}

func (h *counterHandler) Begin(ctx context.Context, tx wal.TxInfo) error {
	if !h.reloaded {
		lctx, cancel := context.WithTimeout(ctx, h.wait)
		err := loadCheckpoints(lctx, h.b, h.log, WALSource)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return err
			}
			return fmt.Errorf("%w: counter checkpoints unreadable for %s", wal.ErrRetry, h.wait)
		}
		h.reloaded = true
	}
	h.commit, h.ord = uint64(tx.CommitLSN), 0
	return nil
}

func (h *counterHandler) Change(ctx context.Context, tx wal.TxInfo, c row.Change) error {
	if c.Table == h.repairs {
		if c.Op != row.Insert {
			return nil
		}
		return h.repair(ctx, tx, c)
	}
	if !h.set.HasTable(c.Table) {
		return nil
	}
	// Every change of a source table has an ordinal, counted or not, so
	// that a redelivered transaction numbers its changes the same way.
	h.ord++
	ds, resets, errs := h.set.Deltas(h.buf[:0], c)
	h.buf = ds
	for _, err := range errs {
		h.m.errors.WithLabelValues(CounterReason(err)).Inc()
		h.log.Warn("change not counted", zap.String("table", c.Table), zap.Stringer("op", c.Op), zap.Error(err))
	}
	if len(ds) == 0 && len(resets) == 0 {
		return nil
	}
	if len(resets) > 0 {
		h.log.Info("source table truncated: counters reset to zero", zap.String("table", c.Table), zap.Strings("counters", resets))
	}
	in := batcher.Input{Source: WALSource, Pos: batcher.Pos{Major: h.commit, Minor: h.ord}, Time: tx.CommitTime,
		Resets: resets, Deltas: toBatcher(ds)}
	return h.add(ctx, in)
}

// add gives in to the batcher, waiting at most h.wait for room.
// Inputs added before a retry are skipped when their transaction comes
// again (the batcher's high-water mark).
func (h *counterHandler) add(ctx context.Context, in batcher.Input) error {
	_, err := h.b.AddWithin(ctx, in, h.wait)
	if errors.Is(err, batcher.ErrBusy) {
		return fmt.Errorf("%w: %w", wal.ErrRetry, err)
	}
	return err
}

// Message refuses a repair marker sent as a logical message: any
// database role may call pg_logical_emit_message, so such a marker could
// be forged. Repairs come as rows of the repair table (repair).
func (h *counterHandler) Message(_ context.Context, _ wal.TxInfo, m wal.Message) error {
	if m.Prefix != counters.RepairPrefix {
		return nil
	}
	h.m.errors.WithLabelValues("forged_repair").Inc()
	h.log.Error("refused a counter repair sent as a logical message: repairs are only taken from the repair table, which only the invalidator's role may write; "+
		"find who calls pg_logical_emit_message with this prefix", zap.Stringer("lsn", m.LSN), zap.String("prefix", m.Prefix), zap.Int("bytes", len(m.Content)))
	return nil
}

// repair applies a repair request, a row of the repair table, at its
// place in the WAL.
func (h *counterHandler) repair(ctx context.Context, tx wal.TxInfo, c row.Change) error {
	h.ord++
	var payload []byte
	for _, col := range c.New {
		if col.Name == "payload" && !col.Value.Null {
			payload = []byte(col.Value.Text)
		}
	}
	resets, sets, err := h.set.ParseRepair(payload)
	if err != nil {
		h.m.errors.WithLabelValues(CounterReason(err)).Inc()
		h.log.Error("repair request not applied", zap.Uint64("lsn", c.LSN), zap.Error(err))
		return nil
	}
	h.log.Info("applying a repair", zap.Stringer("commit_lsn", tx.CommitLSN), zap.Strings("reset", resets), zap.Int("groups", len(sets)))
	return h.add(ctx, batcher.Input{Source: WALSource, Pos: batcher.Pos{Major: h.commit, Minor: h.ord}, Time: tx.CommitTime,
		Resets: resets, Sets: toBatcher(sets)})
}

// Commit adds the transaction's end, which carries its Ack: the batcher
// does it once every delta of the transaction is committed.
func (h *counterHandler) Commit(ctx context.Context, tx wal.TxInfo, ack *wal.Ack) error {
	return h.add(ctx, batcher.Input{Source: WALSource, Pos: batcher.Pos{Major: uint64(tx.EndLSN)}, Time: tx.CommitTime, Ack: ack})
}

func toBatcher(ds []counters.Delta) []batcher.Delta {
	if len(ds) == 0 {
		return nil
	}
	out := make([]batcher.Delta, len(ds))
	for i, d := range ds {
		out[i] = batcher.Delta(d)
	}
	return out
}

// fanout feeds one WAL stream to the invalidation keys and the counters,
// and splits each transaction's Ack between them. Repair markers go to
// the counters only: they hold no cache keys.
type fanout struct {
	keys *Handler
	ctr  *counterHandler
}

func (f fanout) Begin(ctx context.Context, tx wal.TxInfo) error {
	if err := f.keys.Begin(ctx, tx); err != nil {
		return err
	}
	return f.ctr.Begin(ctx, tx)
}

func (f fanout) Change(ctx context.Context, tx wal.TxInfo, c row.Change) error {
	if err := f.keys.Change(ctx, tx, c); err != nil {
		return err
	}
	return f.ctr.Change(ctx, tx, c)
}

func (f fanout) Message(ctx context.Context, tx wal.TxInfo, m wal.Message) error {
	if m.Prefix != counters.RepairPrefix {
		if err := f.keys.Message(ctx, tx, m); err != nil {
			return err
		}
	}
	return f.ctr.Message(ctx, tx, m)
}

// Commit gives the publisher one part of the Ack and the batcher another:
// the slot moves past the transaction once both are durable.
func (f fanout) Commit(ctx context.Context, tx wal.TxInfo, ack *wal.Ack) error {
	second := ack.Split()
	if err := f.keys.Commit(ctx, tx, ack); err != nil {
		return err
	}
	return f.ctr.Commit(ctx, tx, second)
}

// loadCheckpoints reads the checkpoints of sources again, retrying with
// backoff while the primary cannot answer (a restart, a failover): only
// ctx ends the wait, so a restarting primary does not stop the process.
func loadCheckpoints(ctx context.Context, b *batcher.Batcher, log *zap.Logger, sources ...string) error {
	retry := backoff.Policy{Min: 100 * time.Millisecond, Max: 5 * time.Second}
	for attempt := 0; ; attempt++ {
		err := b.Load(ctx, sources...)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		d := retry.Delay(attempt)
		if attempt == 0 || attempt%10 == 9 {
			log.Warn("cannot read the counter checkpoints; retrying", zap.Strings("sources", sources), zap.Int("attempt", attempt+1), zap.Duration("retry_in", d), zap.Error(err))
		}
		if err := backoff.Wait(ctx, d); err != nil {
			return err
		}
	}
}
