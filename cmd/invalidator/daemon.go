package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/pgcache/pgcache/batcher"
	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/config"
	"github.com/pgcache/pgcache/counters"
	"github.com/pgcache/pgcache/counterstore"
	"github.com/pgcache/pgcache/keys"
	"github.com/pgcache/pgcache/sdnotify"
	"github.com/pgcache/pgcache/tail"
	"github.com/pgcache/pgcache/wal"
)

var errSlotGone = wal.ErrSlotGone

// daemon is one invalidator process: the tail role, the purge role, or both.
type daemon struct {
	cfg     *config.Config
	log     *zap.Logger
	reg     *prometheus.Registry
	notify  *sdnotify.Notifier // systemd; a no-op outside it
	reloads *reloadMetrics

	mu    sync.Mutex // guards rules and tail
	rules *keys.Set  // replaced by Reload
	tail  *tail.Role // set once the tail role runs

	ready atomic.Bool
}

func newDaemon(cfg *config.Config, rules *keys.Set, log *zap.Logger, notify *sdnotify.Notifier) (*daemon, error) {
	if cfg.MemoryLimit > 0 {
		debug.SetMemoryLimit(cfg.MemoryLimit)
		log.Info("memory limit set", zap.Int64("memory_limit", cfg.MemoryLimit))
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return &daemon{cfg: cfg, rules: rules, log: log, reg: reg, notify: notify, reloads: newReloadMetrics(reg)}, nil
}

// Run runs until soft ends (then drains: stop reading the WAL, publish and
// confirm what was read, finish purging what was received) or hard ends
// (stop at once; anything unfinished is redone after restart).
func (d *daemon) Run(soft, hard context.Context) error {
	n := d.cfg.NATS
	conn, err := bus.Connect(bus.ConnConfig{URL: n.URL, DataDir: n.DataDir, Name: "invalidator-" + d.cfg.DC,
		Creds: n.Creds, NKey: n.NKey, CA: n.TLS.CA, Cert: n.TLS.Cert, Key: n.TLS.Key}, d.log.Named("nats"))
	if errors.Is(err, bus.ErrConnConfig) {
		return fmt.Errorf("%w: nats: %w", ErrConfig, err)
	}
	if err != nil {
		return err
	}
	defer conn.Close()

	g, gctx := errgroup.WithContext(hard)
	// A failing component stops the others softly too.
	soft, cancelSoft := context.WithCancel(soft)
	defer cancelSoft()
	go func() {
		<-gctx.Done()
		cancelSoft()
	}()

	srv, err := d.serveHTTP(g)
	if err != nil {
		return err
	}
	defer srv.Close()

	if err := d.ensureStream(gctx, conn); err != nil {
		return err
	}
	if d.cfg.Purge != nil {
		if err := d.runPurge(soft, gctx, g, conn); err != nil {
			return err
		}
	}
	if d.cfg.Tail {
		if err := d.runTail(soft, gctx, g, conn); err != nil {
			return err
		}
	}
	d.ready.Store(true)
	// Ready once the slot and publication, the stream and the pool are
	// set up (a hot standby is ready while it waits for the slot). The
	// watchdog pings stop when the drain starts.
	_ = d.notify.Ready()
	_ = d.notify.Status(fmt.Sprintf("dc %s: tail %t, purge %t", d.cfg.DC, d.cfg.Tail, d.cfg.Purge != nil))
	g.Go(func() error { return d.notify.RunWatchdog(soft, d.healthy) })
	err = g.Wait()
	d.ready.Store(false)
	return err
}

func (d *daemon) serveHTTP(g *errgroup.Group) (*http.Server, error) {
	if d.cfg.HTTP.Listen == "off" {
		return &http.Server{}, nil
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(d.reg, promhttp.HandlerOpts{}))
	if d.cfg.HTTP.Pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !d.ready.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	ln, err := net.Listen("tcp", d.cfg.HTTP.Listen)
	if err != nil {
		return nil, fmt.Errorf("http listen: %w", err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	// Served until Run closes it after the drain, so /metrics answers
	// while draining; it is not part of g, which must end on its own.
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.log.Error("http server stopped", zap.Error(err))
		}
	}()
	return srv, nil
}

// runTail runs the tail role: it holds the slot (or waits as a hot
// standby), publishes keys and flushes counter deltas; wal confirms what
// is durable. On soft stop the role drains; on hard stop it stops at once.
func (d *daemon) runTail(soft, hard context.Context, g *errgroup.Group, conn *bus.Conn) error {
	rules := d.currentRules()
	sctx, cancel := context.WithTimeout(hard, 30*time.Second)
	defer cancel()
	if err := Verify(sctx, d.cfg, rules); err != nil {
		return err
	}
	role, err := tail.New(d.tailConfig(rules), rules, conn.JetStream(), d.reg, d.log.Named("tail"))
	if err != nil {
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	d.mu.Lock()
	d.tail = role
	if d.rules != rules { // a reload came in meanwhile
		role.SetRules(d.rules)
	}
	d.mu.Unlock()
	g.Go(func() error { return role.Run(hard) })
	g.Go(func() error {
		<-soft.Done()
		return role.Drain(hard)
	})
	select { // set up, or failed
	case <-role.Ready():
		return nil
	case <-hard.Done():
		return nil
	case <-sctx.Done():
		return fmt.Errorf("tail: not set up within 30s: %w", sctx.Err())
	}
}

// tailConfig turns the config file into the tail role's Config.
func (d *daemon) tailConfig(rules *keys.Set) tail.Config {
	c := d.cfg
	tc := tail.Config{WAL: wal.DefaultConfig(), Publisher: bus.DefaultPublisherConfig(), Counters: c.CounterSet}
	tc.WAL.DSN, tc.WAL.Slot, tc.WAL.Publication = c.Postgres.DSN, c.Postgres.Slot, c.Postgres.Publication
	tc.WAL.Tables = tail.Tables(rules, c.CounterSet)
	tc.WAL.MessagePrefixes = nil
	if c.Messages.Prefix != "" {
		tc.WAL.MessagePrefixes = []string{c.Messages.Prefix}
	}
	if c.CounterSet.Len() > 0 {
		tc.WAL.MessagePrefixes = append(tc.WAL.MessagePrefixes, counters.RepairPrefix)
	}
	tc.OnSlotLoss = c.OnSlotLoss
	tc.Publisher.Origin = c.DC
	l := d.layout()
	tc.Publisher.Stream = l.Stream(c.DC)
	tc.Publisher.Remotes, tc.Publisher.RemoteNeed = l.Remotes(c.DC)
	tc.Publisher.CopyTimeout = c.NATS.CopyTimeout
	tc.State = l.State(c.DC)
	tc.Batcher = batcher.Config{MaxPending: c.Batcher.MaxPending, Interval: c.Batcher.Interval}
	tc.Store = d.storeConfig()
	tc.Increments = bus.StreamConfig{Name: c.Increments.Stream, Placement: c.Increments.Placement, Replicas: c.NATS.Replicas}
	return tc
}

// layout is the invalidation streams' layout (see bus.Layout).
func (d *daemon) layout() bus.Layout { return layoutOf(d.cfg) }

// layoutOf is cfg's invalidation streams' layout.
func layoutOf(cfg *config.Config) bus.Layout {
	n := cfg.NATS
	return bus.Layout{Base: bus.StreamConfig{Name: n.Stream, Placement: n.Placement, Replicas: n.Replicas},
		DCs: n.Datacenters, DurableDCs: n.DurableDCs}
}

// ensureStream creates this datacenter's stream of the per-datacenter
// layout, which its purger reads even where no tail runs, and checks that
// its cluster can hold the replicas asked for (bus.ErrReplicas: exit 2).
// A cluster that does not answer is left to the roles, which retry.
func (d *daemon) ensureStream(ctx context.Context, conn *bus.Conn) error {
	l := d.layout()
	if !l.Geo() && d.cfg.NATS.Replicas <= 1 {
		return nil
	}
	sctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	_, err := bus.EnsureStream(sctx, conn.JetStream(), l.Stream(d.cfg.DC))
	if errors.Is(err, bus.ErrReplicas) {
		return fmt.Errorf("%w: nats.replicas: %w", ErrConfig, err)
	}
	if err != nil {
		d.log.Warn("cannot create or check this datacenter's stream yet; the roles retry", zap.Error(err))
	}
	return nil
}

// storeConfig is the counter store's Config.
func (d *daemon) storeConfig() counterstore.Config {
	return counterstore.Config{DSN: d.cfg.Postgres.DSN, Table: d.cfg.Batcher.Table,
		CheckpointTable: d.cfg.Batcher.CheckpointTable, MessagePrefix: d.cfg.Messages.Prefix}
}
