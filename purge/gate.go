package purge

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"

	"github.com/pgcache/pgcache/backoff"
)

// ErrGateTimeout is returned by Gate.Wait when the replica did not reach the
// position within the gate's MaxWait (lagging or unreachable).
var ErrGateTimeout = errors.New("purge: replica did not replay the transaction in time")

// GateConfig configures the LSN gate of one datacenter.
type GateConfig struct {
	DSN string // the datacenter's replica (a primary works too: its current LSN is used)
	// Poll is how often the replica's replay LSN is read while someone
	// waits. 0 means 1ms.
	Poll time.Duration
	// MaxWait bounds one wait. After it the purge goes ahead (counted as a
	// gate timeout), so a dead replica never stalls invalidation. 0 means 30s.
	MaxWait time.Duration
}

// Gate tells when this datacenter's replica has replayed past a WAL
// position, so that a purge never runs before the replica can serve the
// new row (a refill that read the old row would put stale data back).
// Lifecycle: NewGate, then Run in a goroutine, then Wait from any number
// of goroutines; cancelling Run's ctx stops it.
type Gate struct {
	cfg GateConfig
	log *zap.Logger

	waiters atomic.Int64 // every Wait and WaitReplay in progress
	urgent  atomic.Int64 // the Waits (a batch held back): poll at Poll
	wake    chan struct{}
	up      atomic.Bool
	tli     atomic.Uint32 // the replica's timeline when last read (WaitTimeline)
	// tliGaveUp is until when (Unix ns) WaitTimeline gives up at once,
	// after a wait timed out.
	tliGaveUp atomic.Int64

	mu       sync.Mutex // guards replayed, changed, lagging, lagTarget, gaveUp
	replayed uint64
	changed  chan struct{} // closed and replaced when replayed moves
	// lagging is set when a wait timed out, until the replica replays
	// up to lagTarget (what that wait wanted): meanwhile every wait for a
	// position not yet replayed gives up at once, so that all waiting
	// batches share one MaxWait instead of each waiting its own in turn.
	lagging   bool
	lagTarget uint64
	gaveUp    chan struct{} // closed and replaced when lagging begins

	// pollTime is told how long each read of the replica's position
	// took (nil: not measured); set before Run.
	pollTime interface{ Observe(float64) }
}

// NewGate returns a gate for the replica at cfg.DSN.
func NewGate(cfg GateConfig, log *zap.Logger) (*Gate, error) {
	if cfg.DSN == "" {
		return nil, errors.New("purge: gate needs a replica dsn")
	}
	if cfg.Poll <= 0 {
		cfg.Poll = time.Millisecond
	}
	if cfg.MaxWait <= 0 {
		cfg.MaxWait = 30 * time.Second
	}
	return &Gate{cfg: cfg, log: log, wake: make(chan struct{}, 1), changed: make(chan struct{}), gaveUp: make(chan struct{})}, nil
}

// Replayed is the last replay LSN read from the replica.
func (g *Gate) Replayed() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.replayed
}

// Up reports whether the last poll of the replica succeeded.
func (g *Gate) Up() bool { return g.up.Load() }

// Wait blocks until the replica has replayed the commit at commitLSN:
// replay LSN >= endLSN when known, else > commitLSN. It returns
// ErrGateTimeout after MaxWait, or ctx's error. The MaxWait is shared:
// once a wait has timed out, every wait for a position the replica has
// not replayed returns ErrGateTimeout at once, until the replica has
// caught up with the position that timed out.
func (g *Gate) Wait(ctx context.Context, commitLSN, endLSN uint64) error {
	return g.wait(ctx, need(commitLSN, endLSN), true)
}

// Passed reports, without waiting, whether the last read of the
// replica showed the commit replayed: Wait would return nil at once.
func (g *Gate) Passed(commitLSN, endLSN uint64) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.replayed >= need(commitLSN, endLSN)
}

// WaitReplay is Wait without a time limit: it returns when the replica
// has replayed the commit, or ctx's error. The purger uses it to purge a
// batch again after the gate gave up on it.
func (g *Gate) WaitReplay(ctx context.Context, commitLSN, endLSN uint64) error {
	return g.wait(ctx, need(commitLSN, endLSN), false)
}

func need(commitLSN, endLSN uint64) uint64 {
	if endLSN > commitLSN {
		return endLSN
	}
	return commitLSN + 1
}

func (g *Gate) wait(ctx context.Context, need uint64, limited bool) error {
	g.waiters.Add(1)
	defer g.waiters.Add(-1)
	if limited {
		g.urgent.Add(1)
		defer g.urgent.Add(-1)
	}
	select {
	case g.wake <- struct{}{}:
	default:
	}
	var expired <-chan time.Time
	if limited {
		timer := time.NewTimer(g.cfg.MaxWait)
		defer timer.Stop()
		expired = timer.C
	}
	for {
		g.mu.Lock()
		done, ch, lagging, gaveUp := g.replayed >= need, g.changed, g.lagging, g.gaveUp
		g.mu.Unlock()
		if done {
			return nil
		}
		if limited && lagging {
			return fmt.Errorf("%w: want %X, replayed %X; the replica is lagging (a wait already timed out)", ErrGateTimeout, need, g.Replayed())
		}
		if !limited {
			gaveUp = nil
		}
		select {
		case <-ch:
		case <-gaveUp:
		case <-expired:
			g.mu.Lock()
			first := !g.lagging
			if first {
				g.lagging, g.lagTarget = true, need
				close(g.gaveUp)
				g.gaveUp = make(chan struct{})
			}
			replayed := g.replayed
			g.mu.Unlock()
			if first {
				g.log.Warn("the replica did not replay a commit within max_wait: purging ahead of it until it reaches that commit (each such batch is purged again once the replica replays it)",
					zap.String("want", formatLSN(need)), zap.String("replayed", formatLSN(replayed)), zap.Duration("max_wait", g.cfg.MaxWait))
			}
			return fmt.Errorf("%w: want %X, replayed %X after %s", ErrGateTimeout, need, g.Replayed(), g.cfg.MaxWait)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Lagging reports whether waits give up at once because one timed out
// and the replica has not yet replayed up to it.
func (g *Gate) Lagging() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.lagging
}

// Run polls the replica while anyone waits, reconnecting with backoff
// when it is unreachable. It returns nil when ctx ends.
func (g *Gate) Run(ctx context.Context) error {
	var conn *pgx.Conn
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	fails := 0
	for first := true; ctx.Err() == nil; first = false {
		// The first poll goes at once: the connection is made before the
		// first batch waits for it, not by it.
		if g.waiters.Load() == 0 && !first {
			select {
			case <-g.wake:
			case <-ctx.Done():
				return nil
			case <-time.After(time.Second): // keep Replayed fresh for metrics
			}
		}
		if conn == nil {
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			c, err := pgx.Connect(cctx, g.cfg.DSN)
			cancel()
			if err != nil {
				g.down(ctx, &fails, fmt.Errorf("connect to replica: %w", err))
				continue
			}
			conn = c
		}
		polled := time.Now()
		lsn, err := replayLSN(ctx, conn)
		if g.pollTime != nil && err == nil {
			g.pollTime.Observe(time.Since(polled).Seconds())
		}
		if err != nil {
			conn.Close(context.Background())
			conn = nil
			g.down(ctx, &fails, err)
			continue
		}
		if fails > 0 {
			g.log.Info("replica reachable again")
		}
		fails = 0
		g.up.Store(true)
		g.mu.Lock()
		if lsn > g.replayed {
			g.replayed = lsn
			close(g.changed)
			g.changed = make(chan struct{})
		}
		if g.lagging && g.replayed >= g.lagTarget {
			g.lagging = false
			g.log.Info("replica caught up with the position the gate gave up on; waits are gated again", zap.String("replayed", formatLSN(g.replayed)))
		}
		g.mu.Unlock()
		if g.waiters.Load() > 0 {
			// Second purges alone wait for a lag to end: a slower poll
			// spares the replica.
			d := g.cfg.Poll
			if g.urgent.Load() == 0 {
				d = max(d, secondPurgePoll)
			}
			select {
			case <-time.After(d):
			case <-g.wake:
			case <-ctx.Done():
			}
		}
	}
	return nil
}

func (g *Gate) down(ctx context.Context, fails *int, err error) {
	g.up.Store(false)
	if *fails == 0 && ctx.Err() == nil {
		g.log.Warn("replica unreachable; purges wait up to max_wait", zap.Error(err), zap.Duration("max_wait", g.cfg.MaxWait))
	}
	*fails++
	_ = gateRetry.Sleep(ctx, *fails-1)
}

// secondPurgePoll is how often the replica is polled when only second
// purges (WaitReplay) wait.
const secondPurgePoll = 50 * time.Millisecond

// gateRetry is the backoff between attempts to reach the replica.
var gateRetry = backoff.Policy{Min: 100 * time.Millisecond, Max: 2 * time.Second}

// replayLSN reads the replica's replay position (a primary's current LSN).
func replayLSN(ctx context.Context, conn *pgx.Conn) (uint64, error) {
	qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	var s *string
	err := conn.QueryRow(qctx, `SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text`).Scan(&s)
	if err != nil {
		return 0, fmt.Errorf("read replay lsn: %w", err)
	}
	if s == nil {
		return 0, nil
	}
	return ParseLSN(*s)
}

func formatLSN(l uint64) string { return fmt.Sprintf("%X/%X", l>>32, uint32(l)) }

// ParseLSN parses Postgres's "X/X" text form of an LSN.
func ParseLSN(s string) (uint64, error) {
	var hi, lo uint32
	if _, err := fmt.Sscanf(s, "%X/%X", &hi, &lo); err != nil {
		return 0, fmt.Errorf("parse lsn %q: %w", s, err)
	}
	return uint64(hi)<<32 | uint64(lo), nil
}
