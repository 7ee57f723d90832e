// Package purge applies invalidation batches to one datacenter's memcached
// pool: it waits for the datacenter's replica to replay each transaction
// (the LSN gate), deletes or stale-marks every key with many deletes in
// flight and retries with exponential backoff and jitter, and acks a batch
// only when all of its keys are applied. It leaves WAL decoding, message
// transport and key placement to others.
package purge

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/pgcache/pgcache/bus"
)

// Modes of applying a key.
const (
	ModeDelete = "delete" // delete the key
	ModeStale  = "stale"  // mark it stale (md I T<n>), for leaseproxy's stale serving
)

// Deleter applies keys to a pool; mcpool.Pool implements it. A key that is
// not there counts as applied. Errors are retried.
type Deleter interface {
	Delete(ctx context.Context, key string) error
	MarkStale(ctx context.Context, key string, ttl time.Duration) error
}

// Acker acknowledges one delivered batch; bus.Delivery implements it.
type Acker interface {
	Ack(ctx context.Context) error // every key applied
	InProgress() error             // still working: do not redeliver yet
}

// Waiter is the LSN gate; Gate implements it.
type Waiter interface {
	Wait(ctx context.Context, commitLSN, endLSN uint64) error
}

// Config configures one datacenter's purger.
type Config struct {
	DC   string
	Mode string // ModeDelete (default) or ModeStale
	// StaleTTL is the TTL given to a stale-marked item (T flag): how long
	// it may be served stale while one client refills it. 0 means 30s.
	StaleTTL time.Duration
	// Concurrency is the number of keys in flight across the pool. 0 means 256.
	Concurrency int
	// MaxBatches is the number of batches being applied at once; beyond it
	// Handle blocks (and so stops reading the stream). 0 means 1024.
	MaxBatches int
	// RetryMin and RetryMax bound the backoff between attempts at one key.
	// 0 means 10ms and 5s.
	RetryMin, RetryMax time.Duration
	// Progress is how often a batch still being applied tells JetStream it
	// is alive, so that it is not redelivered. 0 means 10s. It must be
	// below the consumer's AckWait.
	Progress time.Duration
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{Mode: ModeDelete, StaleTTL: 30 * time.Second, Concurrency: 256, MaxBatches: 1024,
		RetryMin: 10 * time.Millisecond, RetryMax: 5 * time.Second, Progress: 10 * time.Second}
}

// Validate checks the configuration.
func (c Config) Validate() error {
	if c.DC == "" {
		return errors.New("purge: dc is empty")
	}
	if c.Mode != ModeDelete && c.Mode != ModeStale {
		return fmt.Errorf("purge: mode %q: want %q or %q", c.Mode, ModeDelete, ModeStale)
	}
	if c.Concurrency < 1 || c.MaxBatches < 1 {
		return fmt.Errorf("purge: concurrency (%d) and max batches (%d) must be positive", c.Concurrency, c.MaxBatches)
	}
	if c.RetryMin <= 0 || c.RetryMax < c.RetryMin {
		return fmt.Errorf("purge: retry min (%s) must be positive and not above retry max (%s)", c.RetryMin, c.RetryMax)
	}
	if c.StaleTTL < time.Second {
		return fmt.Errorf("purge: stale ttl (%s) must be at least 1s", c.StaleTTL)
	}
	return nil
}

func (c *Config) defaults() {
	d := DefaultConfig()
	if c.Mode == "" {
		c.Mode = d.Mode
	}
	if c.StaleTTL == 0 {
		c.StaleTTL = d.StaleTTL
	}
	if c.Concurrency == 0 {
		c.Concurrency = d.Concurrency
	}
	if c.MaxBatches == 0 {
		c.MaxBatches = d.MaxBatches
	}
	if c.RetryMin == 0 {
		c.RetryMin = d.RetryMin
	}
	if c.RetryMax == 0 {
		c.RetryMax = d.RetryMax
	}
	if c.Progress == 0 {
		c.Progress = d.Progress
	}
}

// Metrics are the purger's Prometheus collectors.
type Metrics struct {
	Keys        prometheus.Counter
	Failures    prometheus.Counter
	Pending     prometheus.Gauge
	Batches     prometheus.Counter
	Latency     prometheus.Observer
	GateWait    prometheus.Observer
	GateTimeout prometheus.Counter
}

// NewMetrics registers the purger's metrics for dc with reg (nil: not registered).
func NewMetrics(reg prometheus.Registerer, dc string) *Metrics {
	l := prometheus.Labels{"dc": dc}
	keys := prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_keys_purged_total", Help: "Keys deleted or stale-marked in this DC's pool.", ConstLabels: l})
	fails := prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_purge_failures_total", Help: "Failed attempts to apply a key (each is retried).", ConstLabels: l})
	pending := prometheus.NewGauge(prometheus.GaugeOpts{Name: "invalidator_pending_keys", Help: "Keys received and not yet applied.", ConstLabels: l})
	batches := prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_batches_acked_total", Help: "Batches fully applied and acked.", ConstLabels: l})
	lat := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "invalidator_commit_to_purge_seconds", Help: "From the commit on the primary to the last key of its batch applied in this DC.",
		ConstLabels: l, Buckets: prometheus.ExponentialBuckets(0.0005, 2, 18)})
	gw := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "invalidator_gate_wait_seconds", Help: "Time batches waited for this DC's replica to replay their commit.",
		ConstLabels: l, Buckets: prometheus.ExponentialBuckets(0.0005, 2, 18)})
	gt := prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_gate_timeouts_total", Help: "Batches purged after the gate's max_wait without the replica reaching them.", ConstLabels: l})
	if reg != nil {
		reg.MustRegister(keys, fails, pending, batches, lat, gw, gt)
	}
	return &Metrics{Keys: keys, Failures: fails, Pending: pending, Batches: batches, Latency: lat, GateWait: gw, GateTimeout: gt}
}

// Purger applies batches to one datacenter's pool. Lifecycle: New, then
// Handle for every delivery (from the consumer's goroutine), then Wait
// after the consumer stops (soft stop), or cancel the ctx given to New
// (hard stop: unfinished batches are not acked and come again).
type Purger struct {
	cfg  Config
	del  Deleter
	gate Waiter // nil: no gate
	log  *zap.Logger
	m    *Metrics
	ctx  context.Context

	batches chan struct{} // semaphore: batches in progress
	keys    chan struct{} // semaphore: keys in flight
	wg      sync.WaitGroup
}

// New returns a purger whose work runs under ctx. gate may be nil.
func New(ctx context.Context, cfg Config, del Deleter, gate Waiter, m *Metrics, log *zap.Logger) (*Purger, error) {
	cfg.defaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if m == nil {
		m = NewMetrics(nil, cfg.DC)
	}
	return &Purger{cfg: cfg, del: del, gate: gate, log: log, m: m, ctx: ctx,
		batches: make(chan struct{}, cfg.MaxBatches), keys: make(chan struct{}, cfg.Concurrency)}, nil
}

// Handle starts applying one delivered batch, acked through d once every
// key is applied. It blocks while MaxBatches are in progress, which stops
// the consumer from reading more.
func (p *Purger) Handle(b *bus.Batch, d Acker) {
	select {
	case p.batches <- struct{}{}:
	case <-p.ctx.Done():
		return // not acked: delivered again
	}
	p.m.Pending.Add(float64(len(b.Keys)))
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		defer func() { <-p.batches }()
		p.apply(b, d)
	}()
}

// Wait waits for every batch in progress to finish (or to give up when the
// ctx given to New ends).
func (p *Purger) Wait() { p.wg.Wait() }

func (p *Purger) apply(b *bus.Batch, d Acker) {
	ctx := p.ctx
	// Tell JetStream the batch is alive while the gate or a dead server
	// holds it.
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		t := time.NewTicker(p.cfg.Progress)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				_ = d.InProgress()
			case <-stop:
				return
			}
		}
	}()

	if p.gate != nil {
		begin := time.Now()
		err := p.gate.Wait(ctx, b.CommitLSN, b.EndLSN)
		p.m.GateWait.Observe(time.Since(begin).Seconds())
		switch {
		case errors.Is(err, ErrGateTimeout):
			p.m.GateTimeout.Inc()
			p.log.Warn("purging without the replica's replay (gate timed out)", zap.Uint64("commit_lsn", b.CommitLSN), zap.Error(err))
		case err != nil:
			p.m.Pending.Sub(float64(len(b.Keys)))
			return // ctx ended: not acked, delivered again
		}
	}

	var wg sync.WaitGroup
	var failed sync.Once
	ok := true
	for _, key := range b.Keys {
		select {
		case p.keys <- struct{}{}:
		case <-ctx.Done():
			failed.Do(func() { ok = false })
		}
		if ctx.Err() != nil {
			failed.Do(func() { ok = false })
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-p.keys }()
			if err := p.applyKey(ctx, key); err != nil {
				failed.Do(func() { ok = false })
			}
		}()
	}
	wg.Wait()
	p.m.Pending.Sub(float64(len(b.Keys)))
	if !ok {
		return // ctx ended: not acked, delivered again
	}
	if err := d.Ack(ctx); err != nil {
		// The keys are applied; a lost ack means one more harmless delivery.
		p.log.Warn("ack failed; the batch will be applied again", zap.Uint64("commit_lsn", b.CommitLSN), zap.Error(err))
		return
	}
	p.m.Batches.Inc()
	if !b.CommitTime.IsZero() {
		p.m.Latency.Observe(time.Since(b.CommitTime).Seconds())
	}
}

// applyKey applies one key, retrying until it succeeds or ctx ends. A key
// on a dead server stays here, pending, while other keys go on.
func (p *Purger) applyKey(ctx context.Context, key string) error {
	for attempt := 0; ; attempt++ {
		var err error
		if p.cfg.Mode == ModeStale {
			err = p.del.MarkStale(ctx, key, p.cfg.StaleTTL)
		} else {
			err = p.del.Delete(ctx, key)
		}
		if err == nil {
			p.m.Keys.Inc()
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		p.m.Failures.Inc()
		d := p.backoff(attempt)
		if attempt == 0 || attempt%20 == 0 {
			p.log.Warn("purge failed; retrying", zap.String("key", key), zap.Int("attempt", attempt+1), zap.Duration("retry_in", d), zap.Error(err))
		}
		select {
		case <-time.After(d):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// backoff is exponential from RetryMin to RetryMax with full jitter on
// the upper half.
func (p *Purger) backoff(attempt int) time.Duration {
	d := p.cfg.RetryMin << min(attempt, 20)
	if d <= 0 || d > p.cfg.RetryMax {
		d = p.cfg.RetryMax
	}
	return d/2 + rand.N(d/2+1)
}
