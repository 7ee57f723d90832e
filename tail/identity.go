package tail

import (
	"context"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/pgcache/pgcache/row"
	"github.com/pgcache/pgcache/wal"
)

// identityMetrics say, per table, whether the replica identity supplies
// the old values the rules need, and count what could not be rendered.
type identityMetrics struct {
	ok         *prometheus.GaugeVec
	unrendered *prometheus.CounterVec
}

func newIdentityMetrics(reg prometheus.Registerer) *identityMetrics {
	m := &identityMetrics{
		ok: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "invalidator_replica_identity_ok",
			Help: "1 when the table's replica identity sends the old value of every column its keys and counters use; 0 when UPDATEs and DELETEs may leave old keys cached."}, []string{"table"}),
		unrendered: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "invalidator_unrendered_keys_total",
			Help: "Keys of row changes that could not be rendered, by table and reason (old_value_missing: the replica identity did not send a column's old value)."}, []string{"table", "reason"}),
	}
	if reg != nil {
		reg.MustRegister(m.ok, m.unrendered)
	}
	return m
}

// identity is the handler's view of each table's replica identity, from
// the relation messages of the stream. It is used from wal's goroutine
// only.
type identity struct {
	m    *identityMetrics
	log  *zap.Logger
	need func(table string) []string
	weak map[string][]string // table -> needed columns its identity does not send
}

// relation takes a relation the server described: at the start of each
// connection, and after ALTER TABLE ... REPLICA IDENTITY or any other
// change of the table.
func (id *identity) relation(rel wal.Relation) {
	need := id.need(rel.Table)
	var missing []string
	if rel.Identity != 'f' {
		for _, c := range need {
			if !slices.Contains(rel.IdentityColumns, c) {
				missing = append(missing, c)
			}
		}
	}
	was := id.weak[rel.Table]
	if len(missing) == 0 {
		id.m.ok.WithLabelValues(rel.Table).Set(1)
		if was != nil {
			delete(id.weak, rel.Table)
			id.log.Info("replica identity now sends the old values the rules need", zap.String("table", rel.Table))
		}
		return
	}
	id.m.ok.WithLabelValues(rel.Table).Set(0)
	if id.weak == nil {
		id.weak = make(map[string][]string)
	}
	id.weak[rel.Table] = missing
	if !slices.Equal(was, missing) {
		id.log.Error("the table's replica identity does not send the old values of columns the keys or counters use: "+
			"an UPDATE that changes them leaves the old key cached, and a DELETE cannot render it; run the statement (or `invalidator check` for the narrowest fix)",
			zap.String("table", rel.Table), zap.String("identity", string(rel.Identity)), zap.Strings("columns", missing),
			zap.String("run", "ALTER TABLE "+quoteTable(rel.Table)+" REPLICA IDENTITY FULL;"))
	}
}

// change counts an UPDATE whose old row lacks a needed column of a table
// with a weak identity: its old key could not be rendered.
func (id *identity) change(c row.Change) {
	if c.Op != row.Update {
		return
	}
	missing := id.weak[c.Table]
	for _, col := range missing {
		if !hasColumn(c.Old, col) {
			id.m.unrendered.WithLabelValues(c.Table, "old_value_missing").Inc()
			return
		}
	}
}

func hasColumn(cols []row.Column, name string) bool {
	for _, c := range cols {
		if c.Name == name {
			return true
		}
	}
	return false
}

// quoteTable quotes "schema.table" for a statement to paste.
func quoteTable(t string) string {
	schema, table, _ := strings.Cut(t, ".")
	q := func(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }
	return q(schema) + "." + q(table)
}

// watchIdentity re-runs the check of every table (existence, columns,
// replica identity of the table and each partition) every interval, so a
// change made while no row of the table changes, or a partition attached
// without an identity, is seen too. A table's state is logged when it
// changes.
func (r *Role) watchIdentity(ctx context.Context, interval time.Duration) {
	bad := map[string]string{}
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Minute)
		results, _, err := check(cctx, r.cfg.WAL.DSN, r.keys.currentRules(), r.cfg.Counters)
		cancel()
		if err != nil && ctx.Err() == nil {
			r.log.Debug("periodic check: database not reachable", zap.Error(err))
		}
		for _, res := range results {
			if res.problem == "" {
				r.keys.m.identity.ok.WithLabelValues(res.table).Set(1)
				if bad[res.table] != "" {
					r.log.Info("periodic check: table served again", zap.String("table", res.table))
					delete(bad, res.table)
				}
				continue
			}
			r.keys.m.identity.ok.WithLabelValues(res.table).Set(0)
			if bad[res.table] != res.problem {
				r.log.Error("periodic check: keys of this table may stay stale", zap.String("table", res.table), zap.String("problem", res.problem))
				bad[res.table] = res.problem
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(interval):
		}
	}
}
