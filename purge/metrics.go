package purge

import (
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the purger's Prometheus collectors.
type Metrics struct {
	Keys     prometheus.Counter
	Failures prometheus.Counter
	Pending  prometheus.Gauge
	Batches  prometheus.Counter
	Latency  prometheus.Observer
	// Stage splits commit-to-purge by stage (label stage): publish
	// (commit to stored in the stream, the tail's part), deliver (stored
	// to decoded by this DC's consumer), handle (decoded to the batch's
	// work starting: the in-flight limits), apply (gate passed to the
	// last key applied) and ack (the stream's ack round trip, after the
	// keys are applied). The gate's part is GateWait.
	Stage       *prometheus.HistogramVec
	GateWait    prometheus.Observer
	GateTimeout prometheus.Counter
	// RePurged counts keys applied a second time because the gate had
	// given up on the replica: once it replays past their commit.
	RePurged prometheus.Counter
	// RePurgeDropped counts keys whose second purge was given up (the
	// bound on keys awaiting one was reached, or the purger stopped).
	RePurgeDropped prometheus.Counter
	// InvalidKeys counts keys dropped as no memcached key, by reason
	// (mckey.Reason: empty, too_long, invalid_char).
	InvalidKeys *prometheus.CounterVec
	// Recorded, Replayed and Flushes are per server: keys recorded in the
	// backlog while it was down, keys applied from the backlog once it
	// returned, and flush_alls sent because its backlog overflowed.
	Recorded *prometheus.CounterVec
	Replayed *prometheus.CounterVec
	Flushes  *prometheus.CounterVec

	servers *serverCollector
	// the Stage observers, by stage
	stPublish, stDeliver, stHandle, stApply, stAck prometheus.Observer
}

// ObserveDelivery records a delivered batch's publish and deliver stages
// (see Stage); zero times are skipped.
func (m *Metrics) ObserveDelivery(commit, stored, received time.Time) {
	if !commit.IsZero() && !stored.IsZero() {
		m.stPublish.Observe(max(stored.Sub(commit), 0).Seconds())
	}
	if !stored.IsZero() && !received.IsZero() {
		m.stDeliver.Observe(max(received.Sub(stored), 0).Seconds())
	}
}

// NewMetrics registers the purger's metrics for dc with reg (nil: not registered).
func NewMetrics(reg prometheus.Registerer, dc string) *Metrics {
	l := prometheus.Labels{"dc": dc}
	keys := prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_keys_purged_total", Help: "Keys deleted or stale-marked in this DC's pool.", ConstLabels: l})
	fails := prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_purge_failures_total", Help: "Failed attempts to apply a key (each is retried or recorded).", ConstLabels: l})
	pending := prometheus.NewGauge(prometheus.GaugeOpts{Name: "invalidator_pending_keys", Help: "Keys of batches received and not yet applied or recorded.", ConstLabels: l})
	batches := prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_batches_acked_total", Help: "Batches fully applied (or recorded for a down server) and acked.", ConstLabels: l})
	lat := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "invalidator_commit_to_purge_seconds", Help: "From the commit on the primary to the last key of its batch applied in this DC.",
		ConstLabels: l, Buckets: prometheus.ExponentialBuckets(0.0005, 2, 18)})
	stage := prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "invalidator_purge_stage_seconds", Help: "Commit to purge split by stage: publish, deliver, handle, apply, ack (the gate's part is invalidator_gate_wait_seconds).",
		ConstLabels: l, Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16)}, []string{"stage"})
	for _, s := range []string{"publish", "deliver", "handle", "apply", "ack"} {
		stage.WithLabelValues(s)
	}
	gw := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "invalidator_gate_wait_seconds", Help: "Time batches waited for this DC's replica to replay their commit.",
		ConstLabels: l, Buckets: prometheus.ExponentialBuckets(0.0005, 2, 18)})
	gt := prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_gate_timeouts_total", Help: "Batches purged after the gate's max_wait without the replica reaching them.", ConstLabels: l})
	rp := prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_repurged_keys_total", Help: "Keys purged again once the lagging replica replayed past their commit (after a gate timeout).", ConstLabels: l})
	rpd := prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_repurge_dropped_keys_total", Help: "Keys whose second purge after a gate timeout was given up (bound reached or purger stopped).", ConstLabels: l})
	inv := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "invalidator_invalid_keys_total", Help: "Keys in stream batches that are no memcached key, dropped (the batch's other keys are applied).", ConstLabels: l}, []string{"reason"})
	rec := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "invalidator_server_recorded_keys_total", Help: "Keys recorded in the backlog for a memcached server that was down.", ConstLabels: l}, []string{"server"})
	rep := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "invalidator_server_replayed_keys_total", Help: "Keys applied from the backlog once their server returned.", ConstLabels: l}, []string{"server"})
	fl := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "invalidator_server_flushes_total", Help: "flush_all sent to a returning server whose backlog had overflowed.", ConstLabels: l}, []string{"server"})
	sc := &serverCollector{
		pending: prometheus.NewDesc("invalidator_server_pending_keys", "Keys not yet applied on this memcached server: queued, retrying, or recorded in its backlog while it is down.", []string{"server"}, l),
		oldest:  prometheus.NewDesc("invalidator_server_oldest_pending_seconds", "Age of the oldest key not yet applied on this memcached server (0: none).", []string{"server"}, l),
		bytes:   prometheus.NewDesc("invalidator_server_backlog_bytes", "Bytes of keys recorded in this server's backlog.", []string{"server"}, l),
		flush:   prometheus.NewDesc("invalidator_server_flush_pending", "1 when this server's backlog overflowed: it is flushed (flush_all) when it returns.", []string{"server"}, l),
		down:    prometheus.NewDesc("invalidator_server_down", "1 while the purger records this server's keys instead of applying them.", []string{"server"}, l),
	}
	for _, r := range []string{"empty", "too_long", "invalid_char"} {
		inv.WithLabelValues(r)
	}
	if reg != nil {
		reg.MustRegister(keys, fails, pending, batches, lat, stage, gw, gt, rp, rpd, inv, rec, rep, fl, sc)
	}
	m := &Metrics{Keys: keys, Failures: fails, Pending: pending, Batches: batches, Latency: lat, Stage: stage, GateWait: gw, GateTimeout: gt,
		RePurged: rp, RePurgeDropped: rpd, InvalidKeys: inv, Recorded: rec, Replayed: rep, Flushes: fl, servers: sc}
	m.stPublish, m.stDeliver, m.stHandle = stage.WithLabelValues("publish"), stage.WithLabelValues("deliver"), stage.WithLabelValues("handle")
	m.stApply, m.stAck = stage.WithLabelValues("apply"), stage.WithLabelValues("ack")
	return m
}

// serverCollector exports each server's pending state at scrape time.
type serverCollector struct {
	workers                             atomic.Pointer[[]*worker]
	pending, oldest, bytes, flush, down *prometheus.Desc
}

func (c *serverCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.pending
	ch <- c.oldest
	ch <- c.bytes
	ch <- c.flush
	ch <- c.down
}

func (c *serverCollector) Collect(ch chan<- prometheus.Metric) {
	ws := c.workers.Load()
	if ws == nil {
		return
	}
	now := time.Now()
	for _, w := range *ws {
		s := w.stats(now)
		ch <- prometheus.MustNewConstMetric(c.pending, prometheus.GaugeValue, float64(s.Pending), w.addr)
		ch <- prometheus.MustNewConstMetric(c.oldest, prometheus.GaugeValue, s.OldestAge.Seconds(), w.addr)
		ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.GaugeValue, float64(s.BacklogBytes), w.addr)
		ch <- prometheus.MustNewConstMetric(c.flush, prometheus.GaugeValue, b2f(s.FlushPending), w.addr)
		ch <- prometheus.MustNewConstMetric(c.down, prometheus.GaugeValue, b2f(s.Down), w.addr)
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
