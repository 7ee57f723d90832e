package main

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/purge"
	"github.com/pgcache/pgcache/wal"
)

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

func (d *daemon) registerTail(s *wal.Stream, p *bus.Publisher) {
	gauge := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f)
	}
	d.reg.MustRegister(
		gauge("invalidator_slot_lag_bytes", "Server WAL end minus the LSN confirmed to the slot.", func() float64 { return float64(s.Stats().LagBytes) }),
		gauge("invalidator_replication_lag_seconds", "Server send time minus commit time of the last decoded transaction (0 when idle).", func() float64 { return s.Stats().DecodeLag.Seconds() }),
		gauge("invalidator_slot_confirmed_lsn", "LSN confirmed to the slot, as a number.", func() float64 { return float64(s.Stats().ConfirmedLSN) }),
		gauge("invalidator_slot_active", "1 while this process holds the slot and streams.", func() float64 { return b2f(s.Stats().State == wal.StateStreaming) }),
		gauge("invalidator_publish_in_flight", "Batches published and not yet acked by JetStream.", func() float64 { return float64(p.Stats().InFlight) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "invalidator_published_batches_total", Help: "Batches published since start."}, func() float64 { return float64(p.Stats().Batches) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "invalidator_publish_retries_total", Help: "Batches published again after a failed or missing ack."}, func() float64 { return float64(p.Stats().Retries) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "invalidator_wal_reconnects_total", Help: "Replication connections made again: after a lost connection, or a handler's retry."}, func() float64 { return float64(s.Stats().Reconnects) }),
	)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
