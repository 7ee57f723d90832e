package purge

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/mcpool"
)

// TestPoolCollectorTimeouts: each memcached server has a timeouts series
// for every place a request can time out, so that an overloaded purger
// (queued, late) is told apart from a dead server (silent) on the
// dashboards.
func TestPoolCollectorTimeouts(t *testing.T) {
	cfg := mcpool.DefaultConfig()
	cfg.Servers = []string{"127.0.0.1:1", "127.0.0.1:2"}
	p, err := mcpool.New(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	reg := prometheus.NewRegistry()
	reg.MustRegister(newPoolCollector("dc1", p))
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, mf := range mfs {
		if mf.GetName() != "invalidator_memcached_timeouts_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			l := map[string]string{}
			for _, lp := range m.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			if l["dc"] != "dc1" {
				t.Errorf("dc label: got %q; want dc1", l["dc"])
			}
			got[l["server"]+" "+l["where"]] = true
		}
	}
	for _, s := range cfg.Servers {
		for _, w := range []string{"queued", "late", "answering", "silent"} {
			if !got[s+" "+w] {
				t.Errorf("invalidator_memcached_timeouts_total{server=%q,where=%q}: missing (have %v)", s, w, got)
			}
		}
	}
}
