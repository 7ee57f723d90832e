package wal

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"
)

// ErrTimeline: the primary's timeline history does not say where an
// earlier timeline ended (the server is not a descendant of the one the
// stream ran on).
var ErrTimeline = errors.New("wal: timeline history does not contain the earlier timeline")

// TimelineSwitch is a change of the primary's timeline seen by the
// stream: a replica was promoted. The old primary may have committed, and
// the stream may have delivered, transactions past SwitchLSN that the new
// primary never received: their rows do not exist there (phantoms).
type TimelineSwitch struct {
	From, To uint32
	// SwitchLSN is where timeline From ended and the next began, from
	// timeline To's history.
	SwitchLSN pglogrepl.LSN
}

// timelineEnd reads, on a replication connection to a server on timeline
// to, where timeline from ended.
func timelineEnd(ctx context.Context, conn *pgconn.PgConn, from, to uint32) (pglogrepl.LSN, error) {
	if to <= 1 || from >= to {
		return 0, fmt.Errorf("%w: %d is not before %d", ErrTimeline, from, to)
	}
	h, err := pglogrepl.TimelineHistory(ctx, conn, int32(to))
	if err != nil {
		return 0, classify("timeline history", err)
	}
	return parseTimelineEnd(string(h.Content), from)
}

// parseTimelineEnd finds in a timeline history file ("tli<TAB>lsn<TAB>
// reason" per line) where timeline from ended.
func parseTimelineEnd(history string, from uint32) (pglogrepl.LSN, error) {
	for _, line := range strings.Split(history, "\n") {
		f := strings.Fields(line)
		if len(f) < 2 || strings.HasPrefix(f[0], "#") {
			continue
		}
		tli, err := strconv.ParseUint(f[0], 10, 32)
		if err != nil || uint32(tli) != from {
			continue
		}
		lsn, err := pglogrepl.ParseLSN(f[1])
		if err != nil {
			return 0, fmt.Errorf("%w: line %q: %v", ErrTimeline, line, err)
		}
		return lsn, nil
	}
	return 0, fmt.Errorf("%w: timeline %d", ErrTimeline, from)
}

// TimelineEnd asks the primary where timeline from ended (for a process
// that starts after a promotion it did not see).
func (s *Stream) TimelineEnd(ctx context.Context, from, to uint32) (pglogrepl.LSN, error) {
	ctx, cancel := withTimeout(ctx, queryTimeout)
	defer cancel()
	conn, err := s.connectRepl(ctx)
	if err != nil {
		return 0, err
	}
	defer conn.Close(context.Background())
	return timelineEnd(ctx, conn, from, to)
}

// checkTimeline identifies the server on a new session's connection and,
// when its timeline differs from the last session's, reports the switch
// to Config.OnTimeline before streaming.
func (s *Stream) checkTimeline(ctx context.Context, conn *pgconn.PgConn) error {
	r, err := pglogrepl.IdentifySystem(ctx, conn)
	if err != nil {
		return classify("identify system", err)
	}
	tli := uint32(r.Timeline)
	prev := s.timeline.Swap(tli)
	if prev == 0 || prev == tli {
		return nil
	}
	sw := TimelineSwitch{From: prev, To: tli}
	if sw.SwitchLSN, err = timelineEnd(ctx, conn, prev, tli); err != nil {
		s.log.Error("the primary's timeline changed, and its history does not say where the old one ended", zap.Uint32("from", prev), zap.Uint32("to", tli), zap.Error(err))
		return err
	}
	s.log.Warn("the primary's timeline changed: a replica was promoted", zap.Uint32("from", prev), zap.Uint32("to", tli), zap.Stringer("switch_lsn", sw.SwitchLSN))
	if s.cfg.OnTimeline != nil {
		if err := s.cfg.OnTimeline(ctx, sw); err != nil {
			s.timeline.Store(prev) // reported again on the next session
			return &handlerError{"OnTimeline", sw.SwitchLSN, err}
		}
	}
	return nil
}
