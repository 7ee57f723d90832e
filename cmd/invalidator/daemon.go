package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/counters"
	"github.com/pgcache/pgcache/keys"
	"github.com/pgcache/pgcache/sdnotify"
	"github.com/pgcache/pgcache/tail"
	"github.com/pgcache/pgcache/wal"
)

var errSlotGone = wal.ErrSlotGone

// daemon is one invalidator process: the tail role, the purge role, or both.
type daemon struct {
	cfg     *Config
	log     *zap.Logger
	reg     *prometheus.Registry
	notify  *sdnotify.Notifier // systemd; a no-op outside it
	reloads *reloadMetrics

	mu    sync.Mutex    // guards rules and tail
	rules *keys.Set     // replaced by Reload
	tail  *tail.Handler // set once the tail role runs

	ready atomic.Bool
}

func newDaemon(cfg *Config, rules *keys.Set, log *zap.Logger, notify *sdnotify.Notifier) (*daemon, error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return &daemon{cfg: cfg, rules: rules, log: log, reg: reg, notify: notify, reloads: newReloadMetrics(reg)}, nil
}

// Run runs until soft ends (then drains: stop reading the WAL, publish and
// confirm what was read, finish purging what was received) or hard ends
// (stop at once; anything unfinished is redone after restart).
func (d *daemon) Run(soft, hard context.Context) error {
	nc, shutdownNATS, err := d.connectNATS(hard)
	if err != nil {
		return err
	}
	defer shutdownNATS()
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}

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

	if d.cfg.Purge != nil {
		if err := d.runPurge(soft, gctx, g, js); err != nil {
			return err
		}
	}
	if d.cfg.Tail {
		if err := d.runTail(soft, gctx, g, js); err != nil {
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

// connectNATS connects to nats.url, or starts an embedded single-node
// server when it is empty.
func (d *daemon) connectNATS(ctx context.Context) (*nats.Conn, func(), error) {
	url := d.cfg.NATS.URL
	stop := func() {}
	if url == "" {
		o := &server.Options{
			ServerName: "invalidator-" + d.cfg.DC,
			Host:       "127.0.0.1",
			Port:       server.RANDOM_PORT,
			JetStream:  true,
			StoreDir:   filepath.Join(d.cfg.NATS.DataDir, "nats"),
			NoSigs:     true,
			NoLog:      true,
		}
		s, err := server.NewServer(o)
		if err != nil {
			return nil, nil, fmt.Errorf("embedded nats: %w", err)
		}
		s.Start()
		if !s.ReadyForConnections(10 * time.Second) {
			s.Shutdown()
			return nil, nil, errors.New("embedded nats: not ready")
		}
		url = s.ClientURL()
		stop = func() { s.Shutdown(); s.WaitForShutdown() }
		d.log.Info("embedded NATS server started", zap.String("store", o.StoreDir))
	}
	log := d.log.Named("nats")
	auth, err := natsAuth(d.cfg.NATS)
	if err != nil {
		stop()
		return nil, nil, err
	}
	nc, err := nats.Connect(url, append(auth,
		nats.Name("invalidator-"+d.cfg.DC),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250*time.Millisecond),
		nats.RetryOnFailedConnect(true),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) { log.Warn("disconnected", zap.Error(err)) }),
		nats.ReconnectHandler(func(*nats.Conn) { log.Info("reconnected") }),
	)...)
	if err != nil {
		stop()
		return nil, nil, fmt.Errorf("connect to nats: %w", err)
	}
	return nc, stop, nil
}

// natsAuth turns nats.creds, nats.nkey and nats.tls into options.
func natsAuth(c NATSConfig) ([]nats.Option, error) {
	var opts []nats.Option
	if c.Creds != "" {
		opts = append(opts, nats.UserCredentials(c.Creds))
	}
	if c.NKey != "" {
		o, err := nats.NkeyOptionFromSeed(c.NKey)
		if err != nil {
			return nil, fmt.Errorf("%w: nats.nkey: %w", ErrConfig, err)
		}
		opts = append(opts, o)
	}
	if c.TLS.CA != "" {
		opts = append(opts, nats.RootCAs(c.TLS.CA))
	}
	if c.TLS.Cert != "" {
		opts = append(opts, nats.ClientCert(c.TLS.Cert, c.TLS.Key))
	}
	return opts, nil
}

func (d *daemon) serveHTTP(g *errgroup.Group) (*http.Server, error) {
	if d.cfg.HTTP.Listen == "off" {
		return &http.Server{}, nil
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(d.reg, promhttp.HandlerOpts{}))
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

// runTail holds the slot (or waits as a hot standby), publishes, and
// confirms LSNs that JetStream has acked.
func (d *daemon) runTail(soft, hard context.Context, g *errgroup.Group, js jetstream.JetStream) error {
	log := d.log.Named("tail")
	wc := wal.DefaultConfig()
	wc.DSN = d.cfg.Postgres.DSN
	wc.Slot = d.cfg.Postgres.Slot
	wc.Publication = d.cfg.Postgres.Publication
	rules := d.currentRules()
	wc.Tables = tailTables(d.cfg, rules)
	wc.MessagePrefixes = nil
	if d.cfg.Messages.Prefix != "" {
		wc.MessagePrefixes = []string{d.cfg.Messages.Prefix}
	}
	if d.cfg.counters.Len() > 0 {
		wc.MessagePrefixes = append(wc.MessagePrefixes, counters.RepairPrefix)
	}
	stream, err := wal.New(wc, log.Named("wal"))
	if err != nil {
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	sctx, cancel := context.WithTimeout(hard, 30*time.Second)
	defer cancel()
	if err := Verify(sctx, d.cfg, rules); err != nil {
		return err
	}
	if err := stream.Setup(sctx); err != nil {
		return fmt.Errorf("set up slot and publication: %w", err)
	}
	if _, err := bus.EnsureStream(sctx, js, bus.StreamConfig{Name: d.cfg.NATS.Stream, Placement: d.cfg.NATS.Placement}); err != nil {
		return err
	}
	// With counters, the slot is confirmed up to the minimum of what
	// JetStream acked and what the batcher committed.
	onDurable := func(lsn uint64) { stream.Confirm(pglogrepl.LSN(lsn)) }
	var ctr *counterRun
	if d.cfg.counters.Len() > 0 {
		ctr, err = d.setupCounters(sctx, stream)
		if err != nil {
			return err
		}
		onDurable = ctr.conf.busDurable
	}
	pcfg := bus.DefaultPublisherConfig()
	pcfg.Origin = d.cfg.DC
	pcfg.Stream.Name = d.cfg.NATS.Stream
	pub, err := bus.NewPublisher(js, pcfg, log.Named("bus"), onDurable)
	if err != nil {
		if ctr != nil {
			ctr.pg.Close()
		}
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	d.registerTail(stream, pub)
	th := tail.NewHandler(rules, pub, tail.NewMetrics(d.reg), log)
	d.mu.Lock()
	d.tail = th
	if d.rules != rules { // a reload came in meanwhile
		th.SetRules(d.rules)
	}
	d.mu.Unlock()
	var h wal.Handler = th
	if ctr != nil {
		h = fanout{tail: th, ctr: &counterHandler{set: ctr.set, b: ctr.b, m: ctr.m, log: log.Named("counters"), wait: handlerWait}}
		d.startCounters(soft, hard, g, js, ctr, stream)
	}
	g.Go(func() error { return pub.Run(hard) })
	g.Go(func() error {
		// Reading stops on soft stop; then every batch is published
		// and acked, every counter delta flushed, and the last LSN
		// confirmed to Postgres.
		var err error
		if ctr != nil {
			err = ctr.runStream(soft, stream, h, log)
		} else {
			err = stream.Run(soft, h)
		}
		if err != nil && !errors.Is(err, context.Canceled) {
			return fmt.Errorf("wal: %w", err)
		}
		if derr := pub.Drain(hard); derr != nil {
			return derr
		}
		if ctr != nil {
			if derr := ctr.b.Drain(hard); derr != nil {
				return fmt.Errorf("counters: %w", derr)
			}
		}
		return d.confirmFinal(hard, stream)
	})
	return nil
}

// confirmFinal moves the slot to the last LSN JetStream acked after the
// drain. The stream has stopped, so the slot is advanced with SQL; a
// failure only means those transactions are published again on restart.
func (d *daemon) confirmFinal(ctx context.Context, s *wal.Stream) error {
	lsn := s.Stats().ConfirmedLSN
	if lsn == 0 {
		return nil
	}
	var err error
	for attempt := 0; attempt < 50; attempt++ {
		err = advanceSlot(ctx, d.cfg.Postgres.DSN, d.cfg.Postgres.Slot, lsn)
		if err == nil {
			d.log.Info("drained; slot confirmed", zap.String("lsn", lsn.String()))
			return nil
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(100 * time.Millisecond): // the walsender may still hold the slot for a moment
		}
	}
	d.log.Warn("could not confirm the last LSN after the drain; it will be published again", zap.Error(err))
	return nil
}

func advanceSlot(ctx context.Context, dsn, slot string, lsn pglogrepl.LSN) error {
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	conn, err := pgx.Connect(cctx, dsn)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.Background())
	// Never move backwards: the slot may already be past lsn.
	_, err = conn.Exec(cctx, `SELECT pg_replication_slot_advance($1, $2::pg_lsn)
		FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn < $2::pg_lsn`, slot, lsn.String())
	if err != nil {
		return fmt.Errorf("advance slot: %w", err)
	}
	return nil
}
