package purge

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/pgcache/pgcache/backoff"
	"github.com/pgcache/pgcache/bus"
)

// applyFlush applies a batch that announces a flush of every pool (the
// tail lost its slot: the changes in between cannot be decoded). Once the
// replica has replayed to where the new slot starts (the gate), every
// server of this datacenter's pool is flushed. A server that does not
// answer for RecordAfter gets the backlog's flush mark instead: it is
// flushed when it returns, before it is used, also after a restart of
// this process. Without a backlog, the flush of that server is retried
// until it answers. The batch is acked once every server is flushed or
// marked, so each datacenter flushes once.
func (p *Purger) applyFlush(ctx context.Context, b *bus.Batch, d Acker) {
	progress := time.NewTicker(p.cfg.Progress)
	defer progress.Stop()
	if p.gate != nil {
		if err := p.waitGate(ctx, b, d, progress.C); err != nil && !errors.Is(err, ErrGateTimeout) {
			return // ctx ended: delivered again
		}
	}
	for _, w := range p.workers {
		if err := p.flushServer(ctx, w, d, progress.C); err != nil {
			return // ctx ended: delivered again
		}
	}
	p.log.Warn("flushed every server of the pool, as the tail announced after a slot loss",
		zap.Uint64("from_lsn", b.CommitLSN), zap.String("origin", b.Origin))
	if err := d.Ack(ctx); err != nil {
		p.log.Warn("ack of the flush failed; it will be applied again", zap.Error(err))
		return
	}
	p.m.Batches.Inc()
}

// flushServer flushes one server, or marks it to be flushed when it
// returns (see applyFlush).
func (p *Purger) flushServer(ctx context.Context, w *worker, d Acker, tick <-chan time.Time) error {
	retry := backoff.Policy{Min: p.cfg.RetryMin, Max: p.cfg.RetryMax}
	start := time.Now()
	for attempt := 0; ; attempt++ {
		fctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
		err := p.del.FlushAll(fctx, w.idx)
		cancel()
		if err == nil {
			p.m.Flushes.WithLabelValues(w.addr).Inc()
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if p.backlog != nil && time.Since(start) >= p.cfg.RecordAfter {
			if merr := p.backlog.MarkFlush(ctx, w.addr); merr == nil {
				w.markFlush()
				p.log.Error("memcached server does not answer: it will be flushed when it returns, before it is used",
					zap.String("server", w.addr), zap.Error(err))
				return nil
			} else if ctx.Err() != nil {
				return ctx.Err()
			}
		}
		if attempt == 0 || attempt%20 == 19 {
			p.log.Warn("cannot flush a memcached server; retrying", zap.String("server", w.addr), zap.Error(err))
		}
		select {
		case <-tick:
			_ = d.InProgress()
		default:
		}
		if err := retry.Sleep(ctx, attempt); err != nil {
			return fmt.Errorf("flush %s: %w", w.addr, err)
		}
	}
}

// markFlush notes that the server must be flushed before it is used
// again: the worker goes down, probes it, and flushes it when it answers.
func (w *worker) markFlush() {
	w.mu.Lock()
	w.bl.Flush = true
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// flushDue reports a flush mark the worker has not acted on.
func (w *worker) flushDue() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.bl.Flush
}
