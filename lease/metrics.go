package lease

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pgcache/pgcache/mcpool"
)

// Collector exports a Server's figures, and the per-server figures of its
// pool, as Prometheus metrics. Register it with a registry; it reads the
// figures at each scrape.
type Collector struct {
	s       *Server
	servers func() []mcpool.ServerStats

	counters []counterDesc
	conns    *prometheus.Desc
	wait     *prometheus.Desc

	srvRequests, srvFailures, srvRejected, srvOpens *prometheus.Desc
	srvState, srvConns, srvInFlight                 *prometheus.Desc
	srvTimeouts                                     *prometheus.Desc
}

type counterDesc struct {
	desc  *prometheus.Desc
	value func(*Stats) uint64
	label string // value of the label, if the desc has one
}

// NewCollector returns a Collector for s whose metric names start with
// namespace + "_". servers, if not nil, returns the pool's per-server
// figures (mcpool.Pool.Stats).
func NewCollector(namespace string, s *Server, servers func() []mcpool.ServerStats) *Collector {
	name := func(n string) string { return prometheus.BuildFQName(namespace, "", n) }
	c := &Collector{s: s, servers: servers}
	add := func(n, help string, v func(*Stats) uint64) {
		c.counters = append(c.counters, counterDesc{desc: prometheus.NewDesc(name(n), help, nil, nil), value: v})
	}
	add("connections_total", "Client connections accepted.", func(s *Stats) uint64 { return s.TotalConns })
	add("connections_refused_total", "Client connections refused beyond the connection limit.", func(s *Stats) uint64 { return s.RefusedConns })
	cmds := prometheus.NewDesc(name("commands_total"), "Commands served, by kind (retrieval counts keys).", []string{"command"}, nil)
	for _, x := range []struct {
		label string
		v     func(*Stats) uint64
	}{
		{"get", func(s *Stats) uint64 { return s.CmdGet }},
		{"set", func(s *Stats) uint64 { return s.CmdSet }},
		{"touch", func(s *Stats) uint64 { return s.CmdTouch }},
		{"delete", func(s *Stats) uint64 { return s.CmdDelete }},
		{"arith", func(s *Stats) uint64 { return s.CmdArith }},
		{"flush", func(s *Stats) uint64 { return s.CmdFlush }},
		{"meta", func(s *Stats) uint64 { return s.CmdMeta }},
	} {
		c.counters = append(c.counters, counterDesc{desc: cmds, value: x.v, label: x.label})
	}
	add("get_hits_total", "Keys read that were found (stale ones included).", func(s *Stats) uint64 { return s.GetHits })
	add("get_misses_total", "Keys read that were not found (lease wins included).", func(s *Stats) uint64 { return s.GetMisses })
	add("lease_wins_total", "Leases handed to clients, which then fill from the database.", func(s *Stats) uint64 { return s.LeaseWins })
	add("lease_waits_total", "Reads that waited for another client's fill.", func(s *Stats) uint64 { return s.LeaseWaits })
	add("lease_joins_total", "Reads that joined a read, wait or lease of the key under way on this proxy instead of asking memcached.", func(s *Stats) uint64 { return s.LeaseJoins })
	add("lease_wait_timeouts_total", "Waits that ended with a miss.", func(s *Stats) uint64 { return s.LeaseWaitTimeouts })
	add("lease_polls_total", "Polls made on behalf of waiting reads.", func(s *Stats) uint64 { return s.LeasePolls })
	add("lease_releases_total", "Leases handed back unfilled.", func(s *Stats) uint64 { return s.LeaseReleases })
	add("lease_stale_serves_total", "Stale values served while a refill was in flight.", func(s *Stats) uint64 { return s.StaleServes })
	add("lease_fills_total", "Fills stored under a lease.", func(s *Stats) uint64 { return s.Fills })
	add("lease_foreign_fills_total", "Fills checked against a lease record written by another proxy.", func(s *Stats) uint64 { return s.ForeignFills })
	add("lease_takeovers_total", "Leases of other clients taken over after lease.ttl unfilled (their empty item marked stale; a new lease is won).", func(s *Stats) uint64 { return s.LeaseTakeovers })
	add("lease_broken_total", "Leases won while an earlier lease of the key was still outstanding: sets not tied to a lease are refused until that lease's memory ends.", func(s *Stats) uint64 { return s.BrokenLeases })
	add("lease_refused_broken_total", "Sets refused because their key's lease record was broken.", func(s *Stats) uint64 { return s.RefusedBroken })
	add("lease_refused_waited_total", "Sets refused at once, without a request to memcached, because their client got a miss at the end of its wait for another client's fill (within Lease.TTL of it).", func(s *Stats) uint64 { return s.RefusedWaited })
	add("lease_grouped_sets_total", "Sets not tied to a lease that were checked and answered together with another set of their key under way, without a request of their own to memcached.", func(s *Stats) uint64 { return s.GroupedSets })
	add("lease_refused_fills_total", "Fills refused: invalidated or expired lease, or lease record unreadable.", func(s *Stats) uint64 { return s.RefusedFills })
	add("lease_check_failures_total", "Lease record reads that failed, refusing the fill.", func(s *Stats) uint64 { return s.CheckFailures })
	add("protocol_errors_total", "Bad command lines and data blocks from clients.", func(s *Stats) uint64 { return s.ProtocolErrors })
	add("backend_errors_total", "Pool requests that failed.", func(s *Stats) uint64 { return s.BackendErrors })
	add("write_timeouts_total", "Connections closed because their client did not read its replies within limits.write_timeout.", func(s *Stats) uint64 { return s.WriteTimeouts })
	c.conns = prometheus.NewDesc(name("connections"), "Client connections open.", nil, nil)
	c.wait = prometheus.NewDesc(name("lease_wait_seconds"), "How long reads waited for another client's fill.", nil, nil)
	srv := func(n, help string) *prometheus.Desc {
		return prometheus.NewDesc(name(n), help, []string{"server"}, nil)
	}
	c.srvRequests = srv("server_requests_total", "Requests answered or failed by each memcached server.")
	c.srvFailures = srv("server_errors_total", "Requests that counted against each server's breaker: down, silent timeout, protocol error.")
	c.srvRejected = srv("server_rejected_total", "Requests failed fast by each server's open breaker.")
	c.srvOpens = srv("server_breaker_opens_total", "Times each server's breaker opened.")
	c.srvState = srv("server_breaker_state", "Breaker state of each server: 0 closed, 1 open, 2 half-open.")
	c.srvConns = srv("server_connections", "Connections up to each server.")
	c.srvInFlight = srv("server_requests_in_flight", "Requests queued or awaiting a response, per server.")
	c.srvTimeouts = prometheus.NewDesc(name("server_timeouts_total"),
		"Requests to each server that timed out, by where they were: queued (never written), late (written in the last half of the timeout), answering (the server kept sending meanwhile), silent (nothing came back: a breaker failure).",
		[]string{"server", "where"}, nil)
	return c
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	seen := map[*prometheus.Desc]bool{}
	for _, x := range c.counters {
		if !seen[x.desc] {
			seen[x.desc] = true
			ch <- x.desc
		}
	}
	for _, d := range []*prometheus.Desc{c.conns, c.wait, c.srvRequests, c.srvFailures, c.srvRejected,
		c.srvOpens, c.srvState, c.srvConns, c.srvInFlight, c.srvTimeouts} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	st := c.s.Stats()
	for _, x := range c.counters {
		var labels []string
		if x.label != "" {
			labels = []string{x.label}
		}
		ch <- prometheus.MustNewConstMetric(x.desc, prometheus.CounterValue, float64(x.value(&st)), labels...)
	}
	ch <- prometheus.MustNewConstMetric(c.conns, prometheus.GaugeValue, float64(st.Conns))
	buckets := make(map[float64]uint64, len(waitBounds))
	var count uint64
	for i, b := range waitBounds {
		count += c.s.st.waitBuckets[i].Load()
		buckets[b.Seconds()] = count
	}
	count += c.s.st.waitBuckets[len(waitBounds)].Load()
	ch <- prometheus.MustNewConstHistogram(c.wait, count, float64(c.s.st.waitNanos.Load())/1e9, buckets)
	if c.servers == nil {
		return
	}
	for i, s := range c.servers() {
		label := s.Addr
		if label == "" {
			label = strconv.Itoa(i)
		}
		ch <- prometheus.MustNewConstMetric(c.srvRequests, prometheus.CounterValue, float64(s.Requests), label)
		ch <- prometheus.MustNewConstMetric(c.srvFailures, prometheus.CounterValue, float64(s.Failures), label)
		ch <- prometheus.MustNewConstMetric(c.srvRejected, prometheus.CounterValue, float64(s.Rejected), label)
		ch <- prometheus.MustNewConstMetric(c.srvOpens, prometheus.CounterValue, float64(s.Opens), label)
		ch <- prometheus.MustNewConstMetric(c.srvState, prometheus.GaugeValue, float64(s.State), label)
		ch <- prometheus.MustNewConstMetric(c.srvConns, prometheus.GaugeValue, float64(s.Conns), label)
		ch <- prometheus.MustNewConstMetric(c.srvInFlight, prometheus.GaugeValue, float64(s.InFlight), label)
		for w := mcpool.TimeoutQueued; w <= mcpool.TimeoutSilent; w++ {
			ch <- prometheus.MustNewConstMetric(c.srvTimeouts, prometheus.CounterValue, float64(s.TimeoutsOf(w)), label, w.String())
		}
	}
}
