package purge

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"

	"github.com/pgcache/pgcache/backoff"
)

// ErrTimelineTimeout: the replica did not reach a batch's timeline within
// MaxWait (it still follows a primary that was replaced, or is cut off).
var ErrTimelineTimeout = errors.New("purge: replica not on the batch's timeline in time")

// timelineWaiter is a gate that can wait for a timeline; Gate implements
// it.
type timelineWaiter interface {
	WaitTimeline(ctx context.Context, tli uint32) error
}

// WaitTimeline blocks until the replica follows timeline tli or a later
// one, up to MaxWait (then ErrTimelineTimeout). A batch published after a
// promotion (a purge again of what the old primary may have leaked)
// carries the new timeline: a replica still on the old one may hold those
// rows at any position, so positions are only compared once it follows
// the new primary.
func (g *Gate) WaitTimeline(ctx context.Context, tli uint32) error {
	if tli == 0 || g.tli.Load() >= tli {
		return nil // the hot path: the replica is known to follow it
	}
	if until := g.tliGaveUp.Load(); until != 0 && time.Now().UnixNano() < until {
		// A wait timed out a moment ago: the batches behind it do not
		// each wait their own MaxWait in turn.
		return fmt.Errorf("%w: want %d (a wait just timed out)", ErrTimelineTimeout, tli)
	}
	ctx, cancel := context.WithTimeout(ctx, g.cfg.MaxWait)
	defer cancel()
	var last uint32
	for attempt := 0; ; attempt++ {
		cur, err := g.timeline(ctx)
		if err == nil && cur >= tli {
			return nil
		}
		last = cur
		if backoff.Wait(ctx, 100*time.Millisecond) != nil {
			g.tliGaveUp.Store(time.Now().Add(g.cfg.MaxWait).UnixNano())
			g.log.Warn("the replica does not follow the new primary's timeline yet; purging anyway: until it is repointed, a refill from it may cache a row the new primary lacks",
				zap.Uint32("want", tli), zap.Uint32("replica", last), zap.Error(err))
			return fmt.Errorf("%w: want %d, replica on %d", ErrTimelineTimeout, tli, last)
		}
	}
}

// timeline reads the timeline the replica follows (a primary's own).
func (g *Gate) timeline(ctx context.Context) (_ uint32, err error) {
	qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	conn, err := pgx.Connect(qctx, g.cfg.DSN)
	if err != nil {
		return 0, err
	}
	defer conn.Close(context.Background())
	var tli int64
	defer func() {
		if err == nil {
			g.tli.Store(uint32(tli))
		}
	}()
	err = conn.QueryRow(qctx, `SELECT CASE WHEN pg_is_in_recovery()
			THEN coalesce((SELECT received_tli FROM pg_stat_wal_receiver), (SELECT timeline_id FROM pg_control_checkpoint()))
			ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END`).Scan(&tli)
	return uint32(tli), err
}
