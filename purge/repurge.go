package purge

import (
	"context"
	"sync"

	"go.uber.org/zap"
)

// rePurge purges again, once the replica has replayed their commit, the
// batches that were purged early because the gate timed out: a reader
// may have refilled from the lagging replica between the early purge and
// the replay, storing the old row. Entries are kept in memory in arrival
// (stream) order, bounded by Config.MaxRePurgeBytes.
type rePurge struct {
	p    *Purger
	gate Replayer
	wake chan struct{}

	mu      sync.Mutex // guards entries, bytes, dropped
	entries []rePurgeEntry
	bytes   int64
	dropped bool // a drop was logged since the queue last emptied
}

type rePurgeEntry struct {
	commitLSN, endLSN uint64
	keys              []string
	bytes             int64
}

func newRePurge(p *Purger, gate Replayer) *rePurge {
	return &rePurge{p: p, gate: gate, wake: make(chan struct{}, 1)}
}

// add queues keys for a second purge once the replica replays the commit.
func (r *rePurge) add(commitLSN, endLSN uint64, keys []string) {
	var n int64
	for _, k := range keys {
		n += int64(len(k))
	}
	r.mu.Lock()
	if r.bytes+n > r.p.cfg.MaxRePurgeBytes {
		logIt := !r.dropped
		r.dropped = true
		r.mu.Unlock()
		r.p.m.RePurgeDropped.Add(float64(len(keys)))
		if logIt {
			r.p.log.Error("too many keys wait for a second purge after gate timeouts; some will be purged only once (a refill from the lagging replica may stay stale until its TTL)",
				zap.Int64("max_repurge_bytes", r.p.cfg.MaxRePurgeBytes))
		}
		return
	}
	r.entries = append(r.entries, rePurgeEntry{commitLSN, endLSN, keys, n})
	r.bytes += n
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

func (r *rePurge) pop() {
	r.mu.Lock()
	r.bytes -= r.entries[0].bytes
	r.entries[0] = rePurgeEntry{}
	r.entries = r.entries[1:]
	r.mu.Unlock()
}

// run waits for the replica to replay each entry's commit, oldest first,
// and queues its keys again. Entries left when ctx ends are dropped
// (counted).
func (r *rePurge) run(ctx context.Context) {
	defer func() {
		r.mu.Lock()
		n := 0
		for _, e := range r.entries {
			n += len(e.keys)
		}
		r.entries, r.bytes = nil, 0
		r.mu.Unlock()
		if n > 0 {
			r.p.m.RePurgeDropped.Add(float64(n))
			r.p.log.Warn("stopping with keys still waiting for a second purge after gate timeouts", zap.Int("keys", n))
		}
	}()
	for {
		e, ok := r.head()
		if !ok {
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
		r.pop()
		r.p.queue(e.keys, nil)
		r.p.m.RePurged.Add(float64(len(e.keys)))
	}
}
