package purge

import (
	"context"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/pgcache/pgcache/backoff"
)

// part is the keys of one batch that live on one server.
type part struct {
	t      *tracker // nil: no batch waits for it (a second purge)
	keys   []string
	since  time.Time // when it was queued
	server int
}

func (pt *part) finish() {
	if pt.t != nil {
		pt.t.finish()
	}
}

// ServerStats is one server's pending state.
type ServerStats struct {
	Addr         string
	Pending      int64         // keys queued, retrying or recorded
	OldestAge    time.Duration // age of the oldest of them; 0: none
	BacklogBytes int64         // bytes of keys recorded in the backlog
	FlushPending bool          // the backlog overflowed: flush_all when it returns
	Down         bool          // keys are being recorded instead of applied
}

// worker applies the keys of one server: it takes everything queued,
// sends it as one pipelined chain, and retries what failed; when the
// server keeps failing for RecordAfter it records the keys in the
// backlog (so their batches are acked) until the server answers again,
// then replays the backlog (or flushes the server, if the backlog
// overflowed) before it applies keys directly again.
type worker struct {
	p    *Purger
	idx  int
	addr string
	wake chan struct{}

	mu     sync.Mutex // guards queue, queued, retry, bl, down
	queue  []*part
	queued int64 // keys in queue
	retry  []*part
	held   int64 // keys taken from queue, being applied or in retry
	heldAt time.Time
	bl     BacklogState
	down   bool

	// loadedCh gets the backlog's state once loadBacklog has read it.
	loadedCh chan BacklogState
}

func newWorker(p *Purger, idx int, addr string) *worker {
	return &worker{p: p, idx: idx, addr: addr, wake: make(chan struct{}, 1), loadedCh: make(chan BacklogState, 1)}
}

func (w *worker) enqueue(pt *part) {
	w.mu.Lock()
	w.queue = append(w.queue, pt)
	w.queued += int64(len(pt.keys))
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// take moves up to max keys' worth of parts (at least one part) from the
// queue to held, after the parts already held for retry.
func (w *worker) take(max int) []*part {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := w.retry
	w.retry = nil
	n := 0
	for _, pt := range out {
		n += len(pt.keys)
	}
	i := 0
	for ; i < len(w.queue) && (i == 0 && len(out) == 0 || n+len(w.queue[i].keys) <= max); i++ {
		n += len(w.queue[i].keys)
		w.queued -= int64(len(w.queue[i].keys))
		w.held += int64(len(w.queue[i].keys))
		if w.heldAt.IsZero() || w.queue[i].since.Before(w.heldAt) {
			w.heldAt = w.queue[i].since
		}
		out = append(out, w.queue[i])
	}
	w.queue = append(w.queue[:0:0], w.queue[i:]...)
	return out
}

// release marks n held keys as done.
func (w *worker) release(n int) {
	w.mu.Lock()
	w.held -= int64(n)
	if w.held == 0 {
		w.heldAt = time.Time{}
	}
	w.mu.Unlock()
}

func (w *worker) stats(now time.Time) ServerStats {
	w.mu.Lock()
	defer w.mu.Unlock()
	s := ServerStats{Addr: w.addr, Pending: w.queued + w.held + w.bl.Keys, BacklogBytes: w.bl.Bytes, FlushPending: w.bl.Flush, Down: w.down}
	oldest := w.heldAt
	if len(w.queue) > 0 && (oldest.IsZero() || w.queue[0].since.Before(oldest)) {
		oldest = w.queue[0].since
	}
	if !w.bl.Oldest.IsZero() && (oldest.IsZero() || w.bl.Oldest.Before(oldest)) {
		oldest = w.bl.Oldest
	}
	if !oldest.IsZero() {
		s.OldestAge = now.Sub(oldest)
	}
	return s
}

func (w *worker) setDown(down bool) {
	w.mu.Lock()
	w.down = down
	w.mu.Unlock()
}

func (w *worker) run(ctx context.Context) {
	p := w.p
	retry := backoff.Policy{Min: p.cfg.RetryMin, Max: p.cfg.RetryMax}
	// Until the backlog has been read, keys are applied directly and a
	// failing server's keys are retried, not recorded: a backlog that
	// cannot be read never stalls the purge of live servers.
	loaded := p.backlog == nil
	down := false
	attempt := 0
	var failingSince time.Time
	var nextProbe time.Time
	onLoad := func(st BacklogState) {
		loaded = true
		w.mu.Lock()
		w.bl = st
		w.mu.Unlock()
		if st.Keys > 0 || st.Flush {
			// Recorded keys wait for a probe to replay them.
			down, nextProbe, attempt = true, time.Now(), 0
			w.setDown(true)
		}
	}
	for ctx.Err() == nil {
		if !loaded {
			select {
			case st := <-w.loadedCh:
				onLoad(st)
			default:
			}
		}
		if !down && loaded && w.flushDue() {
			// A flush was announced while the server did not answer.
			down, nextProbe, attempt = true, time.Now(), 0
			w.setDown(true)
		}
		if down {
			if !w.runDown(ctx, &nextProbe, &attempt) {
				continue
			}
			down, attempt, failingSince = false, 0, time.Time{}
			w.setDown(false)
			p.log.Info("memcached server usable again", zap.String("server", w.addr))
			continue
		}
		parts := w.take(p.cfg.MaxChunk)
		if len(parts) == 0 {
			var loadedCh <-chan BacklogState
			if !loaded {
				loadedCh = w.loadedCh
			}
			select {
			case <-w.wake:
			case st := <-loadedCh:
				onLoad(st)
			case <-ctx.Done():
			}
			continue
		}
		failed := w.apply(ctx, parts)
		if len(failed) == 0 {
			attempt, failingSince = 0, time.Time{}
			continue
		}
		if ctx.Err() != nil {
			return
		}
		w.mu.Lock()
		w.retry = failed
		w.mu.Unlock()
		now := time.Now()
		if failingSince.IsZero() {
			failingSince = now
		}
		if loaded && p.backlog != nil && now.Sub(failingSince) >= p.cfg.RecordAfter {
			p.log.Warn("memcached server down: recording its keys until it returns", zap.String("server", w.addr),
				zap.Duration("failing_for", now.Sub(failingSince)))
			down = true
			w.setDown(true)
			nextProbe = now.Add(retry.Delay(0))
			attempt = 0
			continue
		}
		_ = retry.Sleep(ctx, attempt)
		attempt++
	}
}

// apply sends the parts' keys as one chain and finishes the parts whose
// keys all went; it returns the parts of the keys that failed.
func (w *worker) apply(ctx context.Context, parts []*part) []*part {
	p := w.p
	var keys []string
	if len(parts) == 1 {
		keys = parts[0].keys
	} else {
		n := 0
		for _, pt := range parts {
			n += len(pt.keys)
		}
		keys = make([]string, 0, n)
		for _, pt := range parts {
			keys = append(keys, pt.keys...)
		}
	}
	errs := p.send(ctx, w.idx, keys)
	var failed []*part
	var firstErr error
	nfail, done := 0, 0
	off := 0
	for _, pt := range parts {
		var bad []string
		for i, k := range pt.keys {
			if err := errs[off+i]; err != nil {
				bad = append(bad, k)
				if firstErr == nil {
					firstErr = err
				}
			}
		}
		off += len(pt.keys)
		if len(bad) == 0 {
			done += len(pt.keys)
			pt.finish()
			continue
		}
		nfail += len(bad)
		done += len(pt.keys) - len(bad)
		failed = append(failed, &part{t: pt.t, keys: bad, since: pt.since, server: pt.server})
	}
	p.m.Keys.Add(float64(len(keys) - nfail))
	w.release(done)
	if nfail > 0 && ctx.Err() == nil {
		p.m.Failures.Add(float64(nfail))
		p.log.Debug("purge failed; retrying", zap.String("server", w.addr), zap.Int("keys", nfail), zap.Error(firstErr))
	}
	return failed
}

// runDown records what is queued for the down server and probes it when
// due; it returns true once the server answered and its backlog has been
// replayed (or the server flushed): the worker then applies keys again.
func (w *worker) runDown(ctx context.Context, nextProbe *time.Time, attempt *int) bool {
	p := w.p
	probe := backoff.Policy{Min: 100 * time.Millisecond, Max: min(p.cfg.RetryMax, 2*time.Second)}
	if parts := w.take(p.cfg.MaxChunk); len(parts) > 0 {
		if err := w.record(ctx, parts); err != nil {
			if ctx.Err() != nil {
				return false
			}
			// The backlog is unreachable: keep the keys and try both
			// the server and the backlog again.
			w.mu.Lock()
			w.retry = append(parts, w.retry...)
			w.mu.Unlock()
			p.log.Warn("cannot record keys of a down server; retrying", zap.String("server", w.addr), zap.Error(err))
			_ = backoff.Wait(ctx, probe.Delay(*attempt))
		}
	}
	if wait := time.Until(*nextProbe); wait > 0 {
		t := time.NewTimer(wait)
		select {
		case <-w.wake:
		case <-t.C:
		case <-ctx.Done():
		}
		t.Stop()
		if time.Now().Before(*nextProbe) || ctx.Err() != nil {
			return false
		}
	}
	*nextProbe = time.Now().Add(probe.Delay(*attempt))
	*attempt++
	pctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	err := p.del.NoOp(pctx, w.idx)
	cancel()
	if err != nil {
		return false
	}
	if err := w.recover(ctx); err != nil {
		if ctx.Err() == nil {
			p.log.Warn("memcached server answers but its backlog could not be applied; retrying", zap.String("server", w.addr), zap.Error(err))
		}
		return false
	}
	return true
}

// send applies keys of server in the configured mode, within one
// Timeout.
func (p *Purger) send(ctx context.Context, server int, keys []string) []error {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	if p.cfg.Mode == ModeStale {
		return p.del.MarkStaleMultiOn(ctx, server, keys, p.cfg.StaleTTL)
	}
	return p.del.DeleteMultiOn(ctx, server, keys)
}
