// Command leaseproxy is a memcached proxy whose leases make a thundering
// herd cost one database query. It serves memcached's text protocol on
// one listener for one datacenter's pool (see package lease), with
// /metrics and /healthz on another. SIGTERM or SIGINT drains it.
//
//	leaseproxy -config leaseproxy.yaml
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/pgcache/pgcache/lease"
	"github.com/pgcache/pgcache/mcpool"
)

func main() { os.Exit(run()) }

func run() int {
	path := flag.String("config", "leaseproxy.yaml", "configuration file")
	flag.Parse()
	fc, err := loadConfig(*path)
	if err != nil {
		fmt.Fprintln(os.Stderr, "leaseproxy:", err)
		return 2
	}
	log, err := fc.newLogger()
	if err != nil {
		fmt.Fprintln(os.Stderr, "leaseproxy:", err)
		return 2
	}
	defer func() { _ = log.Sync() }()
	if err := serve(fc, log); err != nil {
		log.Error("leaseproxy stopped", zap.Error(err))
		return 1
	}
	return 0
}

func serve(fc fileConfig, log *zap.Logger) error {
	pool, err := mcpool.New(fc.poolConfig(), log.Named("mcpool"))
	if err != nil {
		return err
	}
	defer pool.Close()
	srv, err := lease.New(fc.leaseConfig(), lease.NewPoolBackend(pool), log.Named("lease"))
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		lease.NewCollector("leaseproxy", srv, pool.Stats))
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.Handle("/healthz", srv.HealthHandler(pool.Stats))
	if fc.HTTP.Pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	}
	hsrv := &http.Server{Handler: mux}

	ln, err := net.Listen("tcp", fc.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	hln, err := net.Listen("tcp", fc.HTTP.Listen)
	if err != nil {
		ln.Close()
		return fmt.Errorf("http listen: %w", err)
	}
	log.Info("leaseproxy serving", zap.String("listen", ln.Addr().String()), zap.String("http", hln.Addr().String()),
		zap.Strings("servers", fc.Servers), zap.String("hash", fc.Hash), zap.Duration("lease_ttl", fc.Lease.TTL),
		zap.Duration("lease_wait", fc.Lease.Wait), zap.Bool("lease_stale", fc.Lease.Stale))

	sig, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	g, gctx := errgroup.WithContext(context.Background())
	g.Go(func() error { return srv.Serve(context.Background(), ln) })
	g.Go(func() error {
		if err := hsrv.Serve(hln); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("http: %w", err)
		}
		return nil
	})
	g.Go(func() error {
		select {
		case <-sig.Done():
			log.Info("draining", zap.Duration("timeout", fc.DrainTimeout))
		case <-gctx.Done():
		}
		ctx, cancel := context.WithTimeout(context.Background(), fc.DrainTimeout)
		defer cancel()
		err := srv.Drain(ctx)
		_ = hsrv.Shutdown(ctx)
		if err != nil {
			log.Warn("drain incomplete: connections closed", zap.Error(err))
		} else {
			log.Info("drained")
		}
		return nil
	})
	return g.Wait()
}
