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

	waiters atomic.Int64
	wake    chan struct{}
	up      atomic.Bool

	mu       sync.Mutex // guards replayed, changed
	replayed uint64
	changed  chan struct{} // closed and replaced when replayed moves
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
	return &Gate{cfg: cfg, log: log, wake: make(chan struct{}, 1), changed: make(chan struct{})}, nil
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
// ErrGateTimeout after MaxWait, or ctx's error.
func (g *Gate) Wait(ctx context.Context, commitLSN, endLSN uint64) error {
	need := commitLSN + 1
	if endLSN > commitLSN {
		need = endLSN
	}
	g.waiters.Add(1)
	defer g.waiters.Add(-1)
	select {
	case g.wake <- struct{}{}:
	default:
	}
	timer := time.NewTimer(g.cfg.MaxWait)
	defer timer.Stop()
	for {
		g.mu.Lock()
		done, ch := g.replayed >= need, g.changed
		g.mu.Unlock()
		if done {
			return nil
		}
		select {
		case <-ch:
		case <-timer.C:
			return fmt.Errorf("%w: want %X, replayed %X after %s", ErrGateTimeout, need, g.Replayed(), g.cfg.MaxWait)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
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
	for ctx.Err() == nil {
		if g.waiters.Load() == 0 {
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
		lsn, err := replayLSN(ctx, conn)
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
		g.mu.Unlock()
		if g.waiters.Load() > 0 {
			select {
			case <-time.After(g.cfg.Poll):
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

// ParseLSN parses Postgres's "X/X" text form of an LSN.
func ParseLSN(s string) (uint64, error) {
	var hi, lo uint32
	if _, err := fmt.Sscanf(s, "%X/%X", &hi, &lo); err != nil {
		return 0, fmt.Errorf("parse lsn %q: %w", s, err)
	}
	return uint64(hi)<<32 | uint64(lo), nil
}
