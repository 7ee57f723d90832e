package tail

import (
	"context"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/wal"
)

// journalMargin is how many batches at or before the switch the journal
// scan reads past the first one, since batches of one stream are in
// commit order only up to retries and several origins.
const journalMargin = 256

// onTimeline handles a promotion seen by the stream (wal.Config's
// OnTimeline, in Run's goroutine before the new session delivers
// anything): the old primary may have committed, and the tail published,
// transactions past the switch that the new primary never received, and
// readers may have cached their rows since. Their keys are purged again in
// every datacenter, from the stream: the stream is the journal.
func (r *Role) onTimeline(ctx context.Context, sw wal.TimelineSwitch) error {
	n, err := r.repurge(ctx, uint64(sw.SwitchLSN), sw.To)
	if err != nil {
		return fmt.Errorf("%w: purge the keys published past the switch again: %w", wal.ErrRetry, err)
	}
	r.log.Warn("purged again every key published past the timeline switch (phantoms of the old primary)",
		zap.Uint32("from", sw.From), zap.Uint32("to", sw.To), zap.Stringer("switch_lsn", sw.SwitchLSN), zap.Int("keys", n))
	r.stateMu.Lock()
	r.system.Timeline = sw.To
	r.stateMu.Unlock()
	r.pub.SetTimeline(sw.To)
	return nil
}

// repurge publishes again every key of the batches on the stream whose
// commit is past switchLSN, as new batches gated on the new timeline's
// current position, and waits until JetStream stores them. It returns
// the number of keys.
func (r *Role) repurge(ctx context.Context, switchLSN uint64, timeline uint32) (int, error) {
	st, err := r.js.Stream(ctx, r.cfg.Publisher.Stream.Name)
	if err != nil {
		return 0, err
	}
	info, err := st.Info(ctx)
	if err != nil {
		return 0, err
	}
	seen := map[string]bool{}
	var keys []string
	past := 0
	for seq := info.State.LastSeq; seq >= info.State.FirstSeq && seq > 0 && past < journalMargin; seq-- {
		m, err := bus.GetMsg(ctx, st, seq, info.State.FirstSeq, info.State.LastSeq)
		if err != nil {
			if ctx.Err() != nil {
				return 0, ctx.Err()
			}
			continue // deleted, or gone by max age
		}
		b, err := bus.Decode(m.Data)
		if err != nil {
			continue
		}
		if b.CommitLSN <= switchLSN {
			past++
			continue
		}
		for _, k := range b.Keys {
			if !seen[k] {
				seen[k] = true
				keys = append(keys, k)
			}
		}
	}
	if len(keys) == 0 {
		return 0, nil
	}
	// Gate them on where the new timeline is now: a replica has replayed
	// past it only once it follows the new primary.
	sys, err := r.stream.IdentifySystem(ctx)
	if err != nil {
		return 0, err
	}
	at := max(uint64(sys.WALEnd), switchLSN+1)
	for len(keys) > 0 {
		part, size := 0, 0
		for part < len(keys) && size+bus.KeyBytes(keys[part]) < 512<<10 && part < 1000 {
			size += bus.KeyBytes(keys[part])
			part++
		}
		b := &bus.Batch{CommitLSN: at, CommitTime: time.Now(), Timeline: timeline, Keys: keys[:part]}
		if err := r.pub.Announce(ctx, b); err != nil {
			return 0, err
		}
		r.repurged.Add(float64(part))
		keys = keys[part:]
	}
	return len(seen), nil
}
