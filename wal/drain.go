package wal

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/pgcache/pgcache/backoff"
	"go.uber.org/zap"
)

// Drain is the soft stop: Run stops reading the WAL (it returns nil once
// the transaction it is delivering, if any, has been handed over or cut
// off), then Drain waits until every part of every delivered
// transaction's Ack is done, and moves the slot to the last confirmed
// position with SQL, since the replication connection is closed by then.
// The consumers must go on resolving their parts meanwhile (a publisher
// awaiting its acks, a batcher flushing). When ctx ends first, Drain
// confirms what is resolved and returns ctx's error: the rest is
// delivered again after a restart. Drain may be called before, during or
// after Run, and more than once.
func (s *Stream) Drain(ctx context.Context) error {
	s.stopOnce.Do(func() { close(s.stopc) })
	s.waitRun()
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	var werr error
	for s.acks.pending() > 0 && werr == nil {
		select {
		case <-ctx.Done():
			werr = fmt.Errorf("wal: drain: %d transaction(s) not acknowledged: %w", s.acks.pending(), ctx.Err())
		case <-t.C:
		}
	}
	s.finalConfirm(ctx)
	return werr
}

// finalConfirm moves the slot to the confirmed position with
// pg_replication_slot_advance, never backwards. The walsender may hold
// the slot for a moment after the connection closed, so it retries for a
// few seconds; a failure only means the last transactions are delivered
// again after a restart.
func (s *Stream) finalConfirm(ctx context.Context) {
	lsn := pglogrepl.LSN(s.confirmed.Load())
	if lsn == 0 {
		return
	}
	// The final advance is worth a little time even after ctx ended.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	var err error
	for {
		if err = s.advanceSlot(ctx, lsn); err == nil {
			s.log.Info("drained; slot confirmed", zap.Stringer("lsn", lsn))
			return
		}
		if backoff.Wait(ctx, 100*time.Millisecond) != nil {
			break
		}
	}
	s.log.Warn("could not confirm the last position after the drain; it will be delivered again", zap.Stringer("lsn", lsn), zap.Error(err))
}

func (s *Stream) advanceSlot(ctx context.Context, lsn pglogrepl.LSN) error {
	return withConn(ctx, s.cfg.DSN, func(ctx context.Context, conn *pgx.Conn) error {
		_, err := conn.Exec(ctx, `SELECT pg_replication_slot_advance($1, $2::pg_lsn)
			FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn < $2::pg_lsn`, s.cfg.Slot, lsn.String())
		if err != nil {
			return fmt.Errorf("wal: advance slot: %w", err)
		}
		return nil
	})
}

// waitRun waits until no Run is active: Run holds runMu while it runs.
func (s *Stream) waitRun() {
	s.runMu.Lock()
	defer s.runMu.Unlock()
}
