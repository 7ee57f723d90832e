package main

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/pgcache/pgcache/config"
	"github.com/pgcache/pgcache/keys"
	"github.com/pgcache/pgcache/tail"
)

// ErrReload is a config reload (SIGHUP) that was refused; the running
// config stays in force.
var ErrReload = errors.New("invalidator: reload refused")

// reloadMetrics count reloads by result.
type reloadMetrics struct {
	total *prometheus.CounterVec
	ok    prometheus.Gauge
}

func newReloadMetrics(reg prometheus.Registerer) *reloadMetrics {
	m := &reloadMetrics{
		total: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "invalidator_config_reloads_total", Help: "Config reloads (SIGHUP), by result: applied or refused."}, []string{"result"}),
		ok:    prometheus.NewGauge(prometheus.GaugeOpts{Name: "invalidator_config_last_reload_ok", Help: "1 when the last reload was applied (or none was asked), 0 when it was refused."}),
	}
	m.ok.Set(1)
	reg.MustRegister(m.total, m.ok)
	return m
}

// Reload re-reads the config file at path. What a reload changes is the
// rules: key templates and truncate keys of the tables already streamed.
// The new rules are validated like at start, against the live database
// (tables, columns, replica identity), and apply from the next
// transaction. Anything else (another table, the servers, the counters,
// the listeners) needs a restart: such a file is refused with the
// sections named, and the running config stays, as it does for a file
// that does not parse or fails validation.
func (d *daemon) Reload(ctx context.Context, path string) error {
	err := d.reload(ctx, path)
	if err != nil {
		d.reloads.total.WithLabelValues("refused").Inc()
		d.reloads.ok.Set(0)
		d.log.Error("config reload refused; the running config stays in force", zap.String("config", path), zap.Error(err))
		return err
	}
	d.reloads.total.WithLabelValues("applied").Inc()
	d.reloads.ok.Set(1)
	return nil
}

func (d *daemon) reload(ctx context.Context, path string) error {
	cfg, rules, err := config.Load(path)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrReload, err)
	}
	if changed := restartOnly(d.cfg, cfg); len(changed) > 0 {
		return fmt.Errorf("%w: %s changed; a reload applies rules only: restart to apply", ErrReload, strings.Join(changed, ", "))
	}
	if old, now := tail.Tables(d.currentRules(), d.cfg.CounterSet), tail.Tables(rules, cfg.CounterSet); !slices.Equal(old, now) {
		return fmt.Errorf("%w: the rule tables changed (%s to %s); the publication and the stream filter follow them at start: restart to apply",
			ErrReload, strings.Join(old, ","), strings.Join(now, ","))
	}
	if d.cfg.Tail {
		vctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		if err := Verify(vctx, cfg, rules); err != nil {
			return fmt.Errorf("%w: %w", ErrReload, err)
		}
	}
	d.mu.Lock()
	d.rules = rules
	h := d.tail
	d.mu.Unlock()
	if h != nil {
		h.SetRules(rules)
	}
	d.log.Info("config reloaded; new rules apply from the next transaction", zap.String("config", path), zap.Int("rules", len(cfg.Rules)))
	return nil
}

func (d *daemon) currentRules() *keys.Set {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.rules
}

// restartOnly names the sections that differ between the running and the
// new config, other than the rules.
func restartOnly(old, new *config.Config) []string {
	var out []string
	for _, f := range []struct {
		name string
		a, b any
	}{
		{"dc", old.DC, new.DC},
		{"postgres", old.Postgres, new.Postgres},
		{"nats", old.NATS, new.NATS},
		{"tail", old.Tail, new.Tail},
		{"purge", old.Purge, new.Purge},
		{"messages", old.Messages, new.Messages},
		{"counters", old.Counters, new.Counters},
		{"batcher", old.Batcher, new.Batcher},
		{"increments", old.Increments, new.Increments},
		{"http", old.HTTP, new.HTTP},
	} {
		if !reflect.DeepEqual(f.a, f.b) {
			out = append(out, f.name)
		}
	}
	return out
}

// healthy is the systemd watchdog's check: gathering the metrics reads the
// stats of the stream, the publisher and the pool, each under its lock,
// so a component stuck holding its lock stops the pings and systemd
// restarts the process. An unreachable Postgres, NATS or memcached does
// not fail it: a restart would not fix those, and the alerts cover them.
func (d *daemon) healthy(ctx context.Context) error {
	done := make(chan error, 1)
	go func() {
		_, err := d.reg.Gather()
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("gather metrics: %w", err)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("metrics not gathered in time: a component is stuck: %w", ctx.Err())
	}
}
