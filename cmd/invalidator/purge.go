package main

import (
	"context"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/purge"
)

// runPurge starts this DC's consumer and purger. On soft stop the consumer
// stops reading and the purger finishes what it has; on hard stop
// unfinished batches stay unacked and come again.
func (d *daemon) runPurge(soft, hard context.Context, g *errgroup.Group, js jetstream.JetStream) error {
	pc := d.cfg.Purge
	log := d.log.Named("purge")
	mc := mcpool.DefaultConfig()
	mc.Servers = pc.Servers
	mc.Hash = pc.Hash
	mc.Timeout = pc.Timeout
	pool, err := mcpool.New(mc, log.Named("pool"))
	if err != nil {
		return fmt.Errorf("%w: purge pool: %w", ErrConfig, err)
	}
	d.registerPool(pool)
	var gate purge.Waiter
	// The gate runs until the purger has finished (or a hard stop).
	gateCtx, stopGate := context.WithCancel(hard)
	if pc.ReplicaDSN != "" {
		gt, err := purge.NewGate(purge.GateConfig{DSN: pc.ReplicaDSN, MaxWait: pc.GateMaxWait}, log.Named("gate"))
		if err != nil {
			stopGate()
			return fmt.Errorf("%w: %w", ErrConfig, err)
		}
		d.registerGate(gt)
		g.Go(func() error { return gt.Run(gateCtx) })
		gate = gt
	}
	m := purge.NewMetrics(d.reg, d.cfg.DC)
	p, err := purge.New(purge.Config{DC: d.cfg.DC, Mode: pc.Mode, StaleTTL: pc.StaleTTL, Timeout: pc.Timeout}, pool, gate, m, log)
	if err != nil {
		stopGate()
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	// Keys of a memcached server that is down are recorded in this DC's
	// JetStream (so their messages are acked and the other servers go on)
	// and applied when it returns. With no placement the stream is created
	// in the cluster of the NATS server the purger is connected to: its
	// own DC's.
	backlog, err := purge.NewJetStreamBacklog(js, purge.BacklogConfig{DC: d.cfg.DC})
	if err != nil {
		stopGate()
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	p.WithBacklog(backlog)
	bad := prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_bad_messages_total", Help: "Stream messages that could not be decoded (terminated)."})
	d.reg.MustRegister(bad)
	cons, err := bus.NewConsumer(js, bus.ConsumerConfig{Stream: d.cfg.NATS.Stream, DC: d.cfg.DC}, log, func(error) { bad.Inc() })
	if err != nil {
		stopGate()
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	// The purger's workers run until it is drained (soft stop) or the hard
	// ctx ends.
	g.Go(func() error { return p.Run(hard) })
	g.Go(func() error {
		defer pool.Close()
		defer stopGate()
		defer p.Close()
		err := cons.Run(soft, func(dl *bus.Delivery) {
			// An error (hard stop, purger closing) leaves the message
			// unacked: it comes again.
			_ = p.Handle(hard, dl.Batch, dl)
		})
		if derr := p.Drain(hard); derr != nil && err == nil && hard.Err() == nil {
			err = fmt.Errorf("drain purger: %w", derr)
		}
		return err
	})
	return nil
}

// poolCollector exports the pool's per-server stats at scrape time.
type poolCollector struct {
	dc       string
	pool     *mcpool.Pool
	state    *prometheus.Desc
	requests *prometheus.Desc
	failures *prometheus.Desc
	rejected *prometheus.Desc
	conns    *prometheus.Desc
}

func (d *daemon) registerPool(p *mcpool.Pool) {
	l := []string{"server"}
	c := prometheus.Labels{"dc": d.cfg.DC}
	d.reg.MustRegister(&poolCollector{
		dc: d.cfg.DC, pool: p,
		state:    prometheus.NewDesc("invalidator_breaker_state", "Circuit breaker per memcached server: 0 closed, 1 open, 2 half-open.", l, c),
		requests: prometheus.NewDesc("invalidator_memcached_requests_total", "Requests sent per memcached server.", l, c),
		failures: prometheus.NewDesc("invalidator_memcached_failures_total", "Failed requests per memcached server.", l, c),
		rejected: prometheus.NewDesc("invalidator_memcached_rejected_total", "Requests failed fast by an open breaker.", l, c),
		conns:    prometheus.NewDesc("invalidator_memcached_connections", "Connections up per memcached server.", l, c),
	})
}

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.state
	ch <- c.requests
	ch <- c.failures
	ch <- c.rejected
	ch <- c.conns
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	for _, s := range c.pool.Stats() {
		ch <- prometheus.MustNewConstMetric(c.state, prometheus.GaugeValue, float64(s.State), s.Addr)
		ch <- prometheus.MustNewConstMetric(c.requests, prometheus.CounterValue, float64(s.Requests), s.Addr)
		ch <- prometheus.MustNewConstMetric(c.failures, prometheus.CounterValue, float64(s.Failures), s.Addr)
		ch <- prometheus.MustNewConstMetric(c.rejected, prometheus.CounterValue, float64(s.Rejected), s.Addr)
		ch <- prometheus.MustNewConstMetric(c.conns, prometheus.GaugeValue, float64(s.Conns), s.Addr)
	}
}

func (d *daemon) registerGate(g *purge.Gate) {
	c := prometheus.Labels{"dc": d.cfg.DC}
	d.reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "invalidator_replica_replay_lsn", Help: "The DC replica's last replay LSN as a number.", ConstLabels: c},
			func() float64 { return float64(g.Replayed()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "invalidator_replica_up", Help: "1 when the last poll of the DC replica succeeded.", ConstLabels: c},
			func() float64 { return b2f(g.Up()) }),
	)
}
