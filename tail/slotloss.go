package tail

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"go.uber.org/zap"

	"github.com/jackc/pglogrepl"
	"github.com/pgcache/pgcache/backoff"
	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/wal"
)

// What the tail does when it finds its slot lost (Config.OnSlotLoss).
const (
	// SlotLossExit stops with wal.ErrSlotGone (the daemon exits 3): an
	// operator flushes the pools, then clears the pipeline's state.
	SlotLossExit = "exit"
	// SlotLossFlush creates a new slot, announces on the stream that
	// every datacenter flushes its pool once, recounts the counters with
	// a source table, and streams from the new slot.
	SlotLossFlush = "flush"
)

// ErrSlotLost: this pipeline ran before (its state is in JetStream), and
// its slot is now missing or invalidated: the changes since its last
// confirmed position can never be decoded, so caches may be stale.
var ErrSlotLost = fmt.Errorf("%w: this pipeline ran before and its slot was lost", wal.ErrSlotGone)

// slotLossAdvice is the operator's way out with on_slot_loss: exit.
const slotLossAdvice = "flush every datacenter's memcached pool (or set on_slot_loss: flush and restart, which does it once, announced on the stream), " +
	"then delete the pipeline's state so that the next start creates a new slot: nats kv del " + bus.StateBucket + " <stream>.<slot> " +
	"(with nats.datacenters, from " + bus.StateBucket + "_<dc> of every datacenter) (RUNBOOK: slot lost)"

// checkSlot decides, before the slot is set up, whether it was lost:
// missing while this pipeline's state says it ran before, or invalidated.
// It returns whether a recovery is due.
func (r *Role) checkSlot(ctx context.Context) (lost bool, err error) {
	c := r.cfg
	sys, err := r.stream.IdentifySystem(ctx)
	if err != nil {
		return false, fmt.Errorf("identify the primary: %w", err)
	}
	r.system = sys
	r.pub.SetTimeline(sys.Timeline)
	st, ran, err := bus.LoadTailState(ctx, r.js, c.state(), c.WAL.Slot)
	if err != nil {
		return false, err
	}
	r.stateMu.Lock()
	r.state = st
	r.stateMu.Unlock()
	info, err := wal.SlotStatus(ctx, c.WAL.DSN, c.WAL.Slot)
	if err != nil {
		return false, err
	}
	switch {
	case info.Exists && info.WALStatus == "lost":
	case ran && !info.Exists:
	default:
		return false, nil
	}
	r.slotLost.Inc()
	r.log.Error("the replication slot was lost: changes committed since its last confirmed position can never be invalidated from the WAL",
		zap.String("slot", c.WAL.Slot), zap.Bool("exists", info.Exists), zap.String("wal_status", info.WALStatus),
		zap.Stringer("last_confirmed", pglogrepl.LSN(st.ConfirmedLSN)), zap.String("on_slot_loss", c.OnSlotLoss))
	if c.OnSlotLoss != SlotLossFlush {
		return true, fmt.Errorf("%w: slot %q (last confirmed %s); %s", ErrSlotLost, c.WAL.Slot, pglogrepl.LSN(st.ConfirmedLSN), slotLossAdvice)
	}
	if info.Exists {
		if err := r.stream.DropSlot(ctx); err != nil {
			return true, err
		}
	}
	return true, nil
}

// recover follows a slot loss with on_slot_loss: flush, once the new slot
// is set up: it announces the flush on the stream (every datacenter's
// purger flushes its pool once, after its replica has replayed to where
// the new slot starts) and recounts every counter with a source table.
func (r *Role) recover(ctx context.Context) error {
	info, err := wal.SlotStatus(ctx, r.cfg.WAL.DSN, r.cfg.WAL.Slot)
	if err != nil {
		return err
	}
	from := uint64(info.ConfirmedFlush)
	if err := r.pub.Announce(ctx, &bus.Batch{CommitLSN: max(from, 1), CommitTime: time.Now(), Flush: true}); err != nil {
		return err
	}
	r.stateMu.Lock()
	r.state.Flushes++
	r.stateMu.Unlock()
	r.log.Warn("announced a flush of every datacenter's pool after the slot loss", zap.Stringer("new_slot_from", pglogrepl.LSN(from)))
	if r.batcher != nil {
		for _, name := range r.cfg.Counters.Names() {
			c := r.cfg.Counters.Counter(name)
			if c.Table == "" {
				r.log.Warn("counter without a source table cannot be recounted after the slot loss; its increments are not affected", zap.String("counter", name))
				continue
			}
			if err := r.store.Repair(ctx, c, nil, 0, io.Discard); err != nil {
				return fmt.Errorf("recount %s after the slot loss: %w", name, err)
			}
			r.log.Info("recounted after the slot loss", zap.String("counter", name))
		}
	}
	return r.saveState(ctx)
}

// state is where the pipeline's state is kept.
func (c Config) state() bus.StateConfig {
	if len(c.State.Locations) > 0 {
		return c.State
	}
	s := c.Publisher.Stream
	return bus.Layout{Base: s}.State("")
}

// saveState records the pipeline's state in JetStream: that it ran, on
// which cluster, and its slot's confirmed position.
func (r *Role) saveState(ctx context.Context) error {
	r.stateMu.Lock()
	defer r.stateMu.Unlock()
	st := r.state
	st.Slot, st.SystemID, st.Timeline = r.cfg.WAL.Slot, r.system.ID, r.system.Timeline
	if c := uint64(r.stream.Stats().ConfirmedLSN); c > st.ConfirmedLSN {
		st.ConfirmedLSN = c
	}
	if err := bus.SaveTailState(ctx, r.js, r.cfg.state(), st); err != nil {
		return err
	}
	r.state = st
	return nil
}

// keepState saves the state every interval while the role runs (owned
// by one goroutine: the setup's save happens before it starts).
func (r *Role) keepState(ctx context.Context, interval time.Duration) {
	for backoff.Wait(ctx, interval) == nil {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		if err := r.saveState(sctx); err != nil && !errors.Is(err, context.Canceled) {
			r.log.Debug("tail state not saved", zap.Error(err))
		}
		cancel()
	}
}
