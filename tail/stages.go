package tail

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgcache/pgcache/bus"
)

// stageMetrics splits the tail's part of commit-to-purge (the purge
// role's "publish" stage, commit to stored) by stage, per published
// batch: see bus.StageObserver.
type stageMetrics struct {
	receive, batch, ack prometheus.Observer
}

func newStageMetrics(reg prometheus.Registerer) *stageMetrics {
	h := prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "invalidator_tail_stage_seconds",
		Help:    "The tail's part of commit to purge, per published batch: receive (commit to its first keys handed to the publisher: walsender, connection, decoding), batch (then to the publish: linger), ack (publish to JetStream's ack, read in publish order).",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16)}, []string{"stage"})
	if reg != nil {
		reg.MustRegister(h)
	}
	return &stageMetrics{receive: h.WithLabelValues(bus.StageReceive), batch: h.WithLabelValues(bus.StageBatch), ack: h.WithLabelValues(bus.StageAck)}
}

// ObserveStage implements bus.StageObserver.
func (m *stageMetrics) ObserveStage(stage string, d time.Duration) {
	switch stage {
	case bus.StageReceive:
		m.receive.Observe(d.Seconds())
	case bus.StageBatch:
		m.batch.Observe(d.Seconds())
	case bus.StageAck:
		m.ack.Observe(d.Seconds())
	}
}
