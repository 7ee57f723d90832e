package purge

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/lifecycle"
	"github.com/pgcache/pgcache/mcpool"
)

// RoleConfig configures the purge role of one datacenter: its pool, its
// replica (the gate), the purger, and the stream it consumes.
type RoleConfig struct {
	Purger Config
	Pool   mcpool.Config
	// Gate is the LSN gate; an empty DSN means no gate.
	Gate GateConfig
	// Stream is the invalidation stream to consume.
	Stream string
	// AckWait is how long the DC's durable consumer waits for an ack (or
	// a progress signal) before it delivers a message again, to another
	// purge process of the DC if one runs: the time a killed purger's
	// messages wait. It must be above Purger.Progress. 0 means 30s.
	AckWait time.Duration
	// BacklogReplicas is the replicas of the DC's backlog stream
	// (nats.replicas); 0 means 1.
	BacklogReplicas int
}

// Role is the purge role: a durable consumer of the stream for this
// datacenter, the purger with its backlog in JetStream, the gate and the
// pool. Lifecycle: NewRole, then Run (blocks); Drain is the soft stop
// (stop reading the stream, finish what was received); cancelling Run's
// ctx is the hard stop (what is unacked comes again). Close releases what
// Run did not, and is safe twice.
type Role struct {
	log    *zap.Logger
	pool   *mcpool.Pool
	gate   *Gate // nil without a replica DSN
	purger *Purger
	cons   *bus.Consumer
	m      *Metrics

	soft      *lifecycle.Soft
	closeOnce sync.Once
}

// NewRole validates cfg, builds the pool, the gate, the purger and the
// consumer on js, and registers their metrics with reg.
func NewRole(cfg RoleConfig, js jetstream.JetStream, reg prometheus.Registerer, log *zap.Logger) (*Role, error) {
	dc := cfg.Purger.DC
	pool, err := mcpool.New(cfg.Pool, log.Named("pool"))
	if err != nil {
		return nil, fmt.Errorf("%w: pool: %w", ErrConfig, err)
	}
	r := &Role{log: log, pool: pool, soft: lifecycle.New("purge")}
	var gate Waiter
	if cfg.Gate.DSN != "" {
		if r.gate, err = NewGate(cfg.Gate, log.Named("gate")); err != nil {
			pool.Close()
			return nil, fmt.Errorf("%w: %w", ErrConfig, err)
		}
		gate = r.gate
	}
	m := NewMetrics(reg, dc)
	r.m = m
	if r.purger, err = New(cfg.Purger, pool, gate, m, log); err != nil {
		pool.Close()
		return nil, err
	}
	// Keys of a memcached server that is down are recorded in this DC's
	// JetStream (so their messages are acked and the other servers go on)
	// and applied when it returns. With no placement the stream is created
	// in the cluster of the NATS server the purger is connected to: its
	// own DC's.
	backlog, err := NewJetStreamBacklog(js, BacklogConfig{DC: dc, Replicas: cfg.BacklogReplicas})
	if err != nil {
		pool.Close()
		return nil, err
	}
	r.purger.WithBacklog(backlog)
	bad := prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_bad_messages_total", Help: "Stream messages that could not be decoded (terminated)."})
	// The consumer's buffer is part of the role's in-flight memory:
	// a quarter of the purger's (bus raises it to fit the largest message).
	pc := cfg.Purger
	pc.defaults()
	cc := bus.ConsumerConfig{Stream: cfg.Stream, DC: dc, MaxBuffered: int(pc.MaxBytes / 4), AckWait: cfg.AckWait}
	if cc.AckWait < 0 || cc.AckWait > 0 && cc.AckWait <= pc.Progress {
		pool.Close()
		return nil, fmt.Errorf("%w: ack wait (%s) must be above the purger's progress interval (%s)", ErrConfig, cc.AckWait, pc.Progress)
	}
	if r.cons, err = bus.NewConsumer(js, cc, log, func(error) { bad.Inc() }); err != nil {
		pool.Close()
		return nil, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	if reg != nil {
		reg.MustRegister(bad, newPoolCollector(dc, pool))
		if r.gate != nil {
			registerGate(reg, dc, r.gate)
		}
	}
	return r, nil
}

// Run consumes and purges until Drain completes, ctx ends, or a
// component fails.
func (r *Role) Run(ctx context.Context) error {
	defer r.soft.Stopped()
	defer r.Close()
	g, gctx := errgroup.WithContext(ctx)
	// The gate and the purger's workers run until the purger has drained
	// (soft stop) or the hard stop.
	bctx, stopBack := context.WithCancel(gctx)
	defer stopBack()
	if r.gate != nil {
		g.Go(func() error { return r.gate.Run(bctx) })
	}
	g.Go(func() error { return r.purger.Run(gctx) })
	g.Go(func() error {
		defer stopBack()
		cctx, stop := context.WithCancel(gctx)
		defer stop()
		go func() {
			select {
			case <-r.soft.Draining():
				stop()
			case <-cctx.Done():
			}
		}()
		err := r.cons.Run(cctx, func(dl *bus.Delivery) {
			// An error (hard stop, purger closing) leaves the message
			// unacked: it comes again.
			r.m.ObserveDelivery(dl.Batch.CommitTime, dl.Stored, dl.Received)
			_ = r.purger.Handle(gctx, dl.Batch, dl)
		})
		if derr := r.purger.Drain(gctx); derr != nil && err == nil && gctx.Err() == nil {
			err = fmt.Errorf("drain purger: %w", derr)
		}
		r.purger.Close()
		return err
	})
	return g.Wait()
}

// Drain is the soft stop; it returns when Run has, or when ctx ends.
func (r *Role) Drain(ctx context.Context) error { return r.soft.Drain(ctx) }

// Close closes the purger and the pool. Run calls it; it is safe again.
func (r *Role) Close() {
	r.closeOnce.Do(func() {
		r.purger.Close()
		_ = r.pool.Close()
	})
}

// poolCollector exports the pool's per-server stats at scrape time.
type poolCollector struct {
	pool                                       *mcpool.Pool
	state, requests, failures, rejected, conns *prometheus.Desc
	timeouts                                   *prometheus.Desc // by server and where
}

func newPoolCollector(dc string, p *mcpool.Pool) *poolCollector {
	l := []string{"server"}
	c := prometheus.Labels{"dc": dc}
	return &poolCollector{
		pool:     p,
		state:    prometheus.NewDesc("invalidator_breaker_state", "Circuit breaker per memcached server: 0 closed, 1 open, 2 half-open.", l, c),
		requests: prometheus.NewDesc("invalidator_memcached_requests_total", "Requests sent per memcached server.", l, c),
		failures: prometheus.NewDesc("invalidator_memcached_failures_total", "Requests that counted against each memcached server's breaker: down, silent timeout, protocol error.", l, c),
		rejected: prometheus.NewDesc("invalidator_memcached_rejected_total", "Requests failed fast by an open breaker.", l, c),
		conns:    prometheus.NewDesc("invalidator_memcached_connections", "Connections up per memcached server.", l, c),
		timeouts: prometheus.NewDesc("invalidator_memcached_timeouts_total",
			"Requests to each memcached server that timed out, by where they were: queued (never written), late (written in the last half of the timeout), answering (the server kept sending meanwhile), silent (nothing came back: a breaker failure).",
			[]string{"server", "where"}, c),
	}
}

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.state
	ch <- c.requests
	ch <- c.failures
	ch <- c.rejected
	ch <- c.conns
	ch <- c.timeouts
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range c.pool.Stats() {
		ch <- prometheus.MustNewConstMetric(c.state, prometheus.GaugeValue, float64(s.State), s.Addr)
		ch <- prometheus.MustNewConstMetric(c.requests, prometheus.CounterValue, float64(s.Requests), s.Addr)
		ch <- prometheus.MustNewConstMetric(c.failures, prometheus.CounterValue, float64(s.Failures), s.Addr)
		ch <- prometheus.MustNewConstMetric(c.rejected, prometheus.CounterValue, float64(s.Rejected), s.Addr)
		ch <- prometheus.MustNewConstMetric(c.conns, prometheus.GaugeValue, float64(s.Conns), s.Addr)
		for w := mcpool.TimeoutQueued; w <= mcpool.TimeoutSilent; w++ {
			ch <- prometheus.MustNewConstMetric(c.timeouts, prometheus.CounterValue, float64(s.TimeoutsOf(w)), s.Addr, w.String())
		}
	}
}

func registerGate(reg prometheus.Registerer, dc string, g *Gate) {
	c := prometheus.Labels{"dc": dc}
	up := func() float64 {
		if g.Up() {
			return 1
		}
		return 0
	}
	poll := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "invalidator_gate_poll_seconds", Help: "Round trip of one read of the DC replica's replay position by the gate.",
		ConstLabels: c, Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16)})
	g.pollTime = poll
	reg.MustRegister(poll,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "invalidator_replica_replay_lsn", Help: "The DC replica's last replay LSN as a number.", ConstLabels: c},
			func() float64 { return float64(g.Replayed()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "invalidator_replica_up", Help: "1 when the last poll of the DC replica succeeded.", ConstLabels: c}, up),
	)
}
