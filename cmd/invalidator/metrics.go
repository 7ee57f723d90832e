package main

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/wal"
)

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
