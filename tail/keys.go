// Package tail is the tail role of the invalidator: it holds the
// replication slot (or waits as a hot standby), turns each committed
// transaction into invalidation keys for the bus and counter deltas for
// the batcher, applies counter increments from NATS, and drains softly.
// Each transaction's acknowledgement travels with it: wal hands it over
// with the transaction, the role splits it between the publisher and the
// batcher, and each does its part once its data is durable; wal alone
// confirms the slot. It leaves decoding to wal, key rendering to keys,
// transport to bus, counting to counters and batcher, and storage to
// counterstore.
package tail

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/keys"
	"github.com/pgcache/pgcache/mckey"
	"github.com/pgcache/pgcache/row"
	"github.com/pgcache/pgcache/wal"
)

// Publisher takes the keys of transactions in WAL order, and each
// transaction's Ack, done once its keys are durable; bus.Publisher
// implements it.
type Publisher interface {
	BeginTx(commitLSN uint64, commitTime time.Time)
	Add(ctx context.Context, keys ...string) error
	EndTx(ctx context.Context, endLSN uint64, ack bus.Ack) error
}

// Metrics are the tailer's Prometheus collectors.
type Metrics struct {
	Txs       prometheus.Counter
	Changes   prometheus.Counter
	Messages  prometheus.Counter
	Keys      prometheus.Counter
	KeyErrors *prometheus.CounterVec
	identity  *identityMetrics
}

// NewMetrics registers the tailer's metrics with reg (nil: not registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Txs:       prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_transactions_total", Help: "Committed transactions decoded."}),
		Changes:   prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_changes_total", Help: "Row changes decoded."}),
		Messages:  prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_messages_total", Help: "Logical messages with invalidation keys decoded."}),
		Keys:      prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_keys_published_total", Help: "Keys handed to the bus."}),
		KeyErrors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "invalidator_key_errors_total", Help: "Keys that could not be rendered, by reason."}, []string{"reason"}),
	}
	if reg != nil {
		reg.MustRegister(m.Txs, m.Changes, m.Messages, m.Keys, m.KeyErrors)
	}
	m.identity = newIdentityMetrics(reg)
	return m
}

// Handler implements wal.Handler for invalidation keys. It is used from
// wal's goroutine only.
type Handler struct {
	rules *keys.Set
	pub   Publisher
	m     *Metrics
	log   *zap.Logger
	buf   []string
	next  atomic.Pointer[keys.Set] // rules from a reload, taken at the next transaction
	cur   atomic.Pointer[keys.Set] // the rules in use, for other goroutines
	id    identity
}

// NewHandler returns a handler that renders keys with rules.
func NewHandler(rules *keys.Set, pub Publisher, m *Metrics, log *zap.Logger) *Handler {
	if m == nil {
		m = NewMetrics(nil)
	}
	h := &Handler{rules: rules, pub: pub, m: m, log: log}
	h.cur.Store(rules)
	h.id = identity{m: m.identity, log: log, need: func(t string) []string { return NeedOld(t, h.rules, nil) }}
	return h
}

// currentRules returns the rules in use, from any goroutine.
func (h *Handler) currentRules() *keys.Set {
	if r := h.next.Load(); r != nil {
		return r
	}
	return h.cur.Load()
}

// Relation implements the stream's relation callback (wal.Config's
// OnRelation): it follows each table's replica identity.
func (h *Handler) Relation(rel wal.Relation) { h.id.relation(rel) }

// SetRules replaces the rules from any goroutine (a config reload). They
// apply from the next transaction on: a transaction never mixes two sets.
func (h *Handler) SetRules(r *keys.Set) { h.next.Store(r) }

// takeRules switches to rules set by SetRules, between transactions.
func (h *Handler) takeRules() {
	if r := h.next.Swap(nil); r != nil {
		h.rules = r
		h.cur.Store(r)
	}
}

// Begin implements wal.Handler.
func (h *Handler) Begin(_ context.Context, tx wal.TxInfo) error {
	h.takeRules()
	h.pub.BeginTx(uint64(tx.CommitLSN), tx.CommitTime)
	return nil
}

// Change implements wal.Handler.
func (h *Handler) Change(ctx context.Context, _ wal.TxInfo, c row.Change) error {
	h.m.Changes.Inc()
	h.id.change(c)
	var errs []error
	h.buf, errs = h.rules.Keys(h.buf[:0], c)
	h.report(c.Table, errs)
	return h.add(ctx)
}

// Message implements wal.Handler. A non-transactional message comes as a
// transaction of its own (wal delivers Begin and Commit around it).
func (h *Handler) Message(ctx context.Context, _ wal.TxInfo, m wal.Message) error {
	h.m.Messages.Inc()
	var errs []error
	h.buf, errs = keys.ParseMessage(m.Content)
	h.report("message:"+m.Prefix, errs)
	return h.add(ctx)
}

// Commit implements wal.Handler: the publisher takes the transaction's
// Ack and does it once the transaction's keys are acked by JetStream.
func (h *Handler) Commit(ctx context.Context, tx wal.TxInfo, ack *wal.Ack) error {
	h.m.Txs.Inc()
	return h.pub.EndTx(ctx, uint64(tx.EndLSN), ack)
}

func (h *Handler) add(ctx context.Context) error {
	if len(h.buf) == 0 {
		return nil
	}
	h.m.Keys.Add(float64(len(h.buf)))
	return h.pub.Add(ctx, h.buf...)
}

// report counts and logs keys that could not be rendered. The stream goes
// on: the other keys of the change are published.
func (h *Handler) report(source string, errs []error) {
	for _, err := range errs {
		reason := Reason(err)
		h.m.KeyErrors.WithLabelValues(reason).Inc()
		h.m.identity.unrendered.WithLabelValues(source, reason).Inc()
		h.log.Warn("key not rendered", zap.String("source", source), zap.String("reason", reason), zap.Error(err))
	}
}

// Reason names a key error for the metric label.
func Reason(err error) string {
	if r := mckey.Reason(err); r != "" {
		return r
	}
	switch {
	case errors.Is(err, keys.ErrKeyInvalidUTF8):
		return "invalid_utf8"
	case errors.Is(err, keys.ErrUnchangedToast):
		return "unchanged_toast"
	case errors.Is(err, keys.ErrColumnMissing):
		return "column_missing"
	case errors.Is(err, keys.ErrOldValueMissing):
		return "old_value_missing"
	case errors.Is(err, keys.ErrTruncate):
		return "truncate"
	default:
		return "other"
	}
}
