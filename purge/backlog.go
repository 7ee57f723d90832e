package purge

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/pgcache/pgcache/backoff"
)

// Backlog durably records the keys of a memcached server that is down,
// per server (named by its address), so that their stream messages can
// be acked while the server is away and the keys still reach it when it
// returns, across purger restarts. JetStreamBacklog implements it.
// Calls for one server come from one goroutine at a time.
type Backlog interface {
	// Load returns what is recorded for server.
	Load(ctx context.Context, server string) (BacklogState, error)
	// Append records keys for server; they are durable once it returns
	// nil.
	Append(ctx context.Context, server string, keys []string) error
	// MarkFlush records that server must be flushed before it is used
	// again (its backlog overflowed); nothing is appended after it.
	MarkFlush(ctx context.Context, server string) error
	// Replay calls fn with the recorded keys of server, oldest first, a
	// chunk at a time, and returns the position to Trim up to. It stops
	// before a flush mark (which the caller acts on instead).
	Replay(ctx context.Context, server string, fn func(keys []string) error) (upTo uint64, err error)
	// Trim removes what is recorded for server up to upTo (from Replay,
	// or BacklogState.Last).
	Trim(ctx context.Context, server string, upTo uint64) error
}

// BacklogState is what a backlog holds for one server.
type BacklogState struct {
	Keys   int64     // keys recorded
	Bytes  int64     // bytes of those keys
	Oldest time.Time // when the first was recorded; zero: none
	Flush  bool      // overflowed: flush the server when it returns
	Last   uint64    // position of the last record; 0: none
}

// WithBacklog makes p record the keys of down servers in b (see Config's
// RecordAfter and MaxBacklogBytes). Call it before Run.
func (p *Purger) WithBacklog(b Backlog) *Purger {
	p.backlog = b
	return p
}

// loadRetry is the backoff between attempts to read a server's backlog
// state at start.
var loadRetry = backoff.Policy{Min: time.Second, Max: 30 * time.Second}

// loadBacklog reads the server's backlog state, retrying until it can
// or ctx ends, and hands it to the worker. It runs beside the worker, so
// a slow or unreachable backlog never holds up the purge: until the
// state arrives the worker applies keys directly and retries a failing
// server's keys instead of recording them.
func (w *worker) loadBacklog(ctx context.Context) {
	for attempt := 0; ; attempt++ {
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		st, err := w.p.backlog.Load(lctx, w.addr)
		cancel()
		if err == nil {
			if st.Keys > 0 || st.Flush {
				w.p.log.Info("memcached server has a backlog from before; it is applied once the server answers",
					zap.String("server", w.addr), zap.Int64("keys", st.Keys), zap.Bool("flush", st.Flush))
			}
			w.loadedCh <- st
			return
		}
		if ctx.Err() != nil {
			return
		}
		if attempt%10 == 0 {
			w.p.log.Warn("cannot read the backlog yet; applying keys directly (a down server's keys are retried, not recorded) and trying again",
				zap.String("server", w.addr), zap.Int("attempt", attempt+1), zap.Error(err))
		}
		if loadRetry.Sleep(ctx, attempt) != nil {
			return
		}
	}
}

// record puts the parts' keys in the backlog (or, past the bound, marks
// the server for a flush, which covers them) and finishes the parts.
func (w *worker) record(ctx context.Context, parts []*part) error {
	p := w.p
	var keys []string
	var size int64
	oldest := time.Now()
	for _, pt := range parts {
		keys = append(keys, pt.keys...)
		for _, k := range pt.keys {
			size += int64(len(k))
		}
		if pt.since.Before(oldest) {
			oldest = pt.since
		}
	}
	w.mu.Lock()
	st := w.bl
	w.mu.Unlock()
	switch {
	case st.Flush:
		// Covered by the flush to come.
	case st.Bytes+size > p.cfg.MaxBacklogBytes:
		if err := p.backlog.MarkFlush(ctx, w.addr); err != nil {
			return fmt.Errorf("mark flush: %w", err)
		}
		p.log.Error("backlog of a down memcached server is full: the server will be flushed (flush_all) when it returns",
			zap.String("server", w.addr), zap.Int64("backlog_bytes", st.Bytes), zap.Int64("max_backlog_bytes", p.cfg.MaxBacklogBytes))
		st.Flush = true
	default:
		if err := p.backlog.Append(ctx, w.addr, keys); err != nil {
			return fmt.Errorf("append: %w", err)
		}
		st.Keys += int64(len(keys))
		st.Bytes += size
		if st.Oldest.IsZero() {
			st.Oldest = oldest
		}
		p.m.Recorded.WithLabelValues(w.addr).Add(float64(len(keys)))
	}
	w.mu.Lock()
	// A flush mark set meanwhile (markFlush, from a flush batch) stays.
	st.Flush = st.Flush || w.bl.Flush
	w.bl = st
	w.mu.Unlock()
	w.release(len(keys))
	for _, pt := range parts {
		pt.finish()
	}
	return nil
}

// recover brings a returning server up to date: it flushes it if its
// backlog overflowed, else applies every recorded key; then it trims the
// backlog.
func (w *worker) recover(ctx context.Context) error {
	p := w.p
	w.mu.Lock()
	st := w.bl
	w.mu.Unlock()
	if p.backlog == nil || (st.Keys == 0 && !st.Flush) {
		return nil
	}
	var upTo uint64
	if st.Flush {
		fctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
		err := p.del.FlushAll(fctx, w.idx)
		cancel()
		if err != nil {
			return fmt.Errorf("flush_all: %w", err)
		}
		p.m.Flushes.WithLabelValues(w.addr).Inc()
		p.log.Warn("flushed a returning memcached server whose backlog had overflowed", zap.String("server", w.addr))
		// Everything recorded is covered; trim all of it.
		cur, err := p.backlog.Load(ctx, w.addr)
		if err != nil {
			return fmt.Errorf("load backlog: %w", err)
		}
		upTo = cur.Last
	} else {
		var err error
		applied := 0
		upTo, err = p.backlog.Replay(ctx, w.addr, func(keys []string) error {
			for len(keys) > 0 {
				n := min(len(keys), p.cfg.MaxChunk)
				for _, err := range p.send(ctx, w.idx, keys[:n]) {
					if err != nil {
						return err
					}
				}
				applied += n
				keys = keys[n:]
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("replay backlog: %w", err)
		}
		p.m.Replayed.WithLabelValues(w.addr).Add(float64(applied))
		p.m.Keys.Add(float64(applied))
		p.log.Info("applied the backlog of a returning memcached server", zap.String("server", w.addr), zap.Int("keys", applied))
	}
	if err := p.backlog.Trim(ctx, w.addr, upTo); err != nil {
		return fmt.Errorf("trim backlog: %w", err)
	}
	w.mu.Lock()
	// A flush mark set meanwhile (markFlush) is kept: Replay stops before
	// a flush record, so the trim left it, and the worker flushes next.
	w.bl = BacklogState{Flush: w.bl.Flush && !st.Flush}
	w.mu.Unlock()
	return nil
}
