// Command invalidator tails the Postgres primary's logical replication
// stream, publishes the cache keys of every committed change to NATS
// JetStream, and purges them from this datacenter's memcached pool once
// the datacenter's replica has replayed the change.
//
//	invalidator -config invalidator.yaml
//	invalidator check -config invalidator.yaml
//	invalidator repair -config invalidator.yaml -counter NAME [-group V]...
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/pgcache/pgcache/config"
	"github.com/pgcache/pgcache/sdnotify"
)

// Exit codes.
// ErrConfig wraps every configuration error (ErrConfig).
var ErrConfig = config.ErrConfig

const (
	exitOK       = 0
	exitError    = 1 // runtime failure (systemd restarts it)
	exitConfig   = 2 // bad config or check failed (restarting will not help)
	exitSlotGone = 3 // the slot is gone: caches may be stale, an operator must act
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	sub := ""
	if len(args) > 0 && args[0] == "repair" {
		return runRepair(args[1:], stdout, stderr)
	}
	if len(args) > 0 && args[0] == "check" {
		sub, args = "check", args[1:]
	}
	fs := flag.NewFlagSet("invalidator", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "invalidator.yaml", "config file")
	drain := fs.Duration("drain-timeout", 30*time.Second, "how long a SIGTERM drain may take before a hard stop")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return exitConfig
	}
	cfg, rules, err := config.Load(*path)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitConfig
	}
	if sub == "check" {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := Check(ctx, cfg, rules, stdout); err != nil {
			fmt.Fprintln(stderr, err)
			return exitConfig
		}
		return exitOK
	}
	log, err := newLogger(*level, stderr)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitConfig
	}
	defer func() { _ = log.Sync() }()
	notify, err := sdnotify.FromEnv()
	if err != nil {
		log.Warn("systemd notify settings ignored", zap.Error(err))
	}

	// First SIGTERM/SIGINT: drain. Second, or the drain timeout: hard stop.
	soft, stopSoft := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stopSoft()
	hard, stopHard := context.WithCancel(context.Background())
	defer stopHard()
	go func() {
		<-soft.Done()
		_ = notify.Stopping()
		_ = notify.Status("draining")
		stopSoft()
		log.Info("draining; send the signal again to stop at once", zap.Duration("timeout", *drain))
		again := make(chan os.Signal, 1)
		signal.Notify(again, syscall.SIGTERM, syscall.SIGINT)
		select {
		case <-again:
		case <-time.After(*drain):
			log.Warn("drain timed out; stopping")
		case <-hard.Done():
		}
		stopHard()
	}()

	d, err := newDaemon(cfg, rules, log, notify)
	if err != nil {
		log.Error("cannot start", zap.Error(err))
		if errors.Is(err, ErrConfig) {
			return exitConfig
		}
		return exitError
	}
	// SIGHUP: reload the rules (see daemon.Reload).
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for {
			select {
			case <-hup:
				_ = notify.Reloading()
				_ = d.Reload(soft, *path)
				_ = notify.Ready()
			case <-soft.Done():
				return
			}
		}
	}()
	err = d.Run(soft, hard)
	switch {
	case err == nil:
		log.Info("stopped")
		return exitOK
	case errors.Is(err, errSlotGone):
		_ = notify.Status("replication slot gone: caches may be stale; operator action needed (RUNBOOK: slot lost)")
		log.Error("replication slot is gone; caches may be stale", zap.Error(err))
		return exitSlotGone
	case errors.Is(err, ErrConfig):
		log.Error("refusing to run", zap.Error(err))
		return exitConfig
	default:
		log.Error("failed", zap.Error(err))
		return exitError
	}
}

func newLogger(level string, w io.Writer) (*zap.Logger, error) {
	var l zapcore.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("%w: log level %q", ErrConfig, level)
	}
	enc := zap.NewProductionEncoderConfig()
	enc.EncodeTime = zapcore.ISO8601TimeEncoder
	core := zapcore.NewCore(zapcore.NewJSONEncoder(enc), zapcore.AddSync(w), l)
	// Sampling keeps a flood of identical warnings (a bad key on every
	// row) from drowning the log; the metrics count every one.
	core = zapcore.NewSamplerWithOptions(core, time.Second, 10, 100)
	return zap.New(core).Named("invalidator"), nil
}
