// Command leaseproxy is a memcached proxy whose leases make a thundering
// herd cost one database query. It serves memcached's text protocol on
// one listener for one datacenter's pool (see package lease), with
// /metrics and /healthz on another. SIGTERM or SIGINT drains it.
//
//	leaseproxy -config leaseproxy.yaml
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"strings"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/pgcache/pgcache/lease"
	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/sdnotify"
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
	if fc.Procs > 0 {
		runtime.GOMAXPROCS(fc.Procs)
	}
	if _, set := os.LookupEnv("GOGC"); !set && fc.GCPercent > 0 {
		debug.SetGCPercent(fc.GCPercent)
	}
	if _, set := os.LookupEnv("GOMEMLIMIT"); !set && fc.MemoryLimit > 0 {
		debug.SetMemoryLimit(fc.MemoryLimit)
	}
	if err := serve(fc, *path, log); err != nil {
		log.Error("leaseproxy stopped", zap.Error(err))
		return 1
	}
	return 0
}

func serve(fc fileConfig, path string, log *zap.Logger) error {
	notify, err := sdnotify.FromEnv()
	if err != nil {
		log.Warn("systemd notify settings ignored", zap.Error(err))
	}
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
		zap.Duration("lease_wait", fc.Lease.Wait), zap.Bool("lease_stale", fc.Lease.Stale),
		zap.Int("conns_per_server", fc.Pool.ConnsPerServer), zap.Int("procs", runtime.GOMAXPROCS(0)),
		zap.Int64("memory_limit", debug.SetMemoryLimit(-1)))

	sig, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	g, gctx := errgroup.WithContext(context.Background())
	// Ends when the drain starts: no more watchdog pings or reloads.
	running, stopRunning := context.WithCancel(context.Background())
	defer stopRunning()
	g.Go(func() error { return srv.Serve(context.Background(), ln) })
	g.Go(func() error {
		if err := hsrv.Serve(hln); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("http: %w", err)
		}
		return nil
	})
	_ = notify.Ready()
	_ = notify.Status("serving on " + ln.Addr().String())
	g.Go(func() error {
		return notify.RunWatchdog(running, func(ctx context.Context) error { return probe(ctx, ln.Addr().String()) })
	})
	g.Go(func() error {
		for {
			select {
			case <-hup:
				// A reload checks the file; a restart applies it.
				_ = notify.Reloading()
				if _, err := loadConfig(path); err != nil {
					log.Error("reload: config file is invalid; still serving with the one loaded at start", zap.Error(err))
				} else {
					log.Info("reload: config file is valid; restart to apply changes", zap.String("config", path))
				}
				_ = notify.Ready()
			case <-running.Done():
				return nil
			}
		}
	})
	g.Go(func() error {
		select {
		case <-sig.Done():
			log.Info("draining", zap.Duration("timeout", fc.DrainTimeout))
		case <-gctx.Done():
		}
		_ = notify.Stopping()
		stopRunning()
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

// probe is the watchdog's health check: the proxy accepts a connection
// and answers a command on it. A refusal line (too many connections) also
// proves the accept loop alive; a down memcached pool does not fail it,
// since a restart would not fix that.
func probe(ctx context.Context, addr string) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("probe: %w", err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	if _, err := c.Write([]byte("version\r\n")); err != nil {
		return fmt.Errorf("probe: %w", err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("probe: no answer to version: %w", err)
	}
	if !strings.HasPrefix(line, "VERSION ") && !strings.HasPrefix(line, "SERVER_ERROR") {
		return fmt.Errorf("probe: unexpected answer %q", line)
	}
	return nil
}
