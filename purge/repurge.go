package purge

import (
	"context"
	"sync"
	"time"

	"go.uber.org/zap"
)

// RePurgeLog durably keeps the batches that wait for a second purge
// (see Replayer), so that a purger restarted while the replica still
// lags purges them again all the same. JetStreamBacklog implements it;
// a Backlog that does too is used for it.
type RePurgeLog interface {
	// AppendRePurge records keys to purge again once the replica replays
	// the commit; it returns the record's position.
	AppendRePurge(ctx context.Context, commitLSN, endLSN uint64, keys []string) (uint64, error)
	// LoadRePurge calls fn with every record, oldest first.
	LoadRePurge(ctx context.Context, fn func(pos, commitLSN, endLSN uint64, keys []string)) error
	// TrimRePurge removes the records up to pos.
	TrimRePurge(ctx context.Context, pos uint64) error
}

// rePurge purges again, once the replica has replayed their commit, the
// batches that were purged early because the gate timed out: a reader
// may have refilled from the lagging replica between the early purge and
// the replay, storing the old row. Entries are kept in memory in arrival
// (stream) order, bounded by Config.MaxRePurgeBytes, and, with a
// RePurgeLog, recorded durably before their batch is acked.
type rePurge struct {
	p    *Purger
	gate Replayer
	wake chan struct{}

	mu      sync.Mutex // guards entries, bytes, dropped, log
	entries []rePurgeEntry
	bytes   int64
	dropped bool       // a drop was logged since the queue last emptied
	log     RePurgeLog // set by run once loaded; nil: nothing is trimmed
}

type rePurgeEntry struct {
	commitLSN, endLSN uint64
	keys              []string
	bytes             int64
	pos               uint64 // in the RePurgeLog; 0: in memory only
}

func newRePurge(p *Purger, gate Replayer) *rePurge {
	return &rePurge{p: p, gate: gate, wake: make(chan struct{}, 1)}
}

// add queues keys for a second purge once the replica replays the
// commit, recording them durably first when a log is in use.
func (r *rePurge) add(ctx context.Context, commitLSN, endLSN uint64, keys []string) {
	var n int64
	for _, k := range keys {
		n += int64(len(k))
	}
	r.mu.Lock()
	full := r.bytes+n > r.p.cfg.MaxRePurgeBytes
	logIt := full && !r.dropped
	if full {
		r.dropped = true
	}
	r.mu.Unlock()
	// Record even before run has loaded the log: a record that load then
	// also reads is purged twice, which is harmless.
	log, _ := r.p.backlog.(RePurgeLog)
	if full {
		r.p.m.RePurgeDropped.Add(float64(len(keys)))
		if logIt {
			r.p.log.Error("too many keys wait for a second purge after gate timeouts; some will be purged only once (a refill from the lagging replica may stay stale until its TTL)",
				zap.Int64("max_repurge_bytes", r.p.cfg.MaxRePurgeBytes))
		}
		return
	}
	var pos uint64
	if log != nil {
		// Three tries of 5 s: the backlog stream's first creation waits
		// for JetStream's meta leader, which a busy or just started
		// cluster can take longer than one try to answer.
		var err error
		for try := 0; try < 3 && ctx.Err() == nil; try++ {
			lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			pos, err = log.AppendRePurge(lctx, commitLSN, endLSN, keys)
			cancel()
			if err == nil {
				break
			}
		}
		if err != nil {
			r.p.log.Warn("cannot record keys for a second purge; kept in memory only (lost if the purger stops first)", zap.Error(err))
		}
	}
	r.push(rePurgeEntry{commitLSN, endLSN, keys, n, pos})
}

func (r *rePurge) push(e rePurgeEntry) {
	r.mu.Lock()
	r.entries = append(r.entries, e)
	r.bytes += e.bytes
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

func (r *rePurge) head() (rePurgeEntry, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.entries) == 0 {
		r.dropped = false
		return rePurgeEntry{}, false
	}
	return r.entries[0], true
}

// popReplayed removes and returns the entries, from the head, whose
// commit the replica has replayed (the head's is, by the caller's wait),
// up to max keys.
func (r *rePurge) popReplayed(replayed uint64, max int) []rePurgeEntry {
	r.mu.Lock()
	defer r.mu.Unlock()
	i, keys := 0, 0
	for ; i < len(r.entries); i++ {
		e := r.entries[i]
		if i > 0 && (need(e.commitLSN, e.endLSN) > replayed || keys+len(e.keys) > max) {
			break
		}
		keys += len(e.keys)
		r.bytes -= e.bytes
	}
	out := append([]rePurgeEntry(nil), r.entries[:i]...)
	clear(r.entries[:i])
	r.entries = r.entries[i:]
	return out
}

// lowestPos is the lowest log position still queued, or 0.
func (r *rePurge) lowestPos() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	var low uint64
	for _, e := range r.entries {
		if e.pos != 0 && (low == 0 || e.pos < low) {
			low = e.pos
		}
	}
	return low
}

// load reads the log's records into the queue, retrying until it can or
// ctx ends (false). Until then additions are kept in memory only, and
// nothing is trimmed.
func (r *rePurge) load(ctx context.Context, log RePurgeLog) bool {
	for attempt := 0; ; attempt++ {
		var loaded []rePurgeEntry
		lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := log.LoadRePurge(lctx, func(pos, commitLSN, endLSN uint64, keys []string) {
			var n int64
			for _, k := range keys {
				n += int64(len(k))
			}
			loaded = append(loaded, rePurgeEntry{commitLSN, endLSN, keys, n, pos})
		})
		cancel()
		if err == nil {
			r.mu.Lock()
			for _, e := range loaded {
				r.bytes += e.bytes
			}
			r.entries = append(loaded, r.entries...)
			r.log = log
			r.mu.Unlock()
			if len(loaded) > 0 {
				r.p.log.Info("batches from before the restart wait for a second purge once the replica replays them", zap.Int("batches", len(loaded)))
			}
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		if attempt%10 == 0 {
			r.p.log.Warn("cannot read the second-purge log; retrying", zap.Error(err))
		}
		if loadRetry.Sleep(ctx, attempt) != nil {
			return false
		}
	}
}

// run waits for the replica to replay each entry's commit, oldest first,
// and purges its keys again; entries recorded in the log are trimmed
// once applied. Entries left when ctx ends are dropped from memory
// (those in the log come back at the next start).
func (r *rePurge) run(ctx context.Context) {
	defer func() {
		r.mu.Lock()
		n := 0
		for _, e := range r.entries {
			if e.pos == 0 {
				n += len(e.keys)
			}
		}
		r.entries, r.bytes = nil, 0
		r.mu.Unlock()
		if n > 0 {
			r.p.m.RePurgeDropped.Add(float64(n))
			r.p.log.Warn("stopping with keys, not recorded, still waiting for a second purge after gate timeouts", zap.Int("keys", n))
		}
	}()
	if log, ok := r.p.backlog.(RePurgeLog); ok && !r.load(ctx, log) {
		return
	}
	var trimmed, done uint64 // log positions: trimmed up to; applied up to
	for {
		e, ok := r.head()
		if !ok {
			r.trim(ctx, &trimmed, done)
			select {
			case <-r.wake:
				continue
			case <-ctx.Done():
				return
			}
		}
		if err := r.gate.WaitReplay(ctx, e.commitLSN, e.endLSN); err != nil {
			return // ctx ended
		}
		replayed := need(e.commitLSN, e.endLSN)
		if g, ok := r.gate.(interface{ Replayed() uint64 }); ok {
			replayed = max(replayed, g.Replayed())
		}
		batch := r.popReplayed(replayed, r.p.cfg.MaxChunk)
		var keys []string
		for _, e := range batch {
			keys = append(keys, e.keys...)
			done = max(done, e.pos)
		}
		if len(keys) > 0 {
			t := &tracker{done: make(chan struct{})}
			r.p.queue(keys, t)
			select {
			case <-t.done:
			case <-ctx.Done():
				return
			}
		}
		r.p.m.RePurged.Add(float64(len(keys)))
		if low := r.lowestPos(); low != 0 {
			r.trim(ctx, &trimmed, min(done, low-1))
		}
	}
}

// trim removes the log's records up to upTo, if any were added since.
func (r *rePurge) trim(ctx context.Context, trimmed *uint64, upTo uint64) {
	r.mu.Lock()
	log := r.log
	r.mu.Unlock()
	if log == nil || upTo <= *trimmed {
		return
	}
	tctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	err := log.TrimRePurge(tctx, upTo)
	cancel()
	if err != nil {
		if ctx.Err() == nil {
			r.p.log.Warn("cannot trim the second-purge log (its records will be purged again after a restart)", zap.Error(err))
		}
		return
	}
	*trimmed = upTo
}
