package sdnotify

import (
	"context"
	"time"
)

// HealthFunc reports whether the service's main loop is making progress.
// It gets a ctx that ends after one watchdog period. It should check what
// a restart would fix (a stalled loop, a dead listener), not what it would
// not (a database or a memcached server being down): a failing check makes
// systemd kill the service once the interval passes without a ping.
type HealthFunc func(ctx context.Context) error

// RunWatchdog pings the watchdog every WatchdogPeriod while healthy
// returns nil, until ctx ends; it then returns nil. It checks once at the
// start, then at every period. A check that fails sends no ping and sets
// STATUS= to the error, and the status set by Status is restored once a
// check passes again. A check that never returns stops the pings too,
// which is the point: systemd then restarts the stalled service.
//
// It returns nil at once when the Notifier is disabled or systemd set no
// watchdog, so a caller can start it unconditionally in its run group.
// healthy nil means "always healthy" (a liveness ping of the process).
func (n *Notifier) RunWatchdog(ctx context.Context, healthy HealthFunc) error {
	period := n.WatchdogPeriod()
	if period <= 0 {
		return nil
	}
	t := time.NewTicker(period)
	defer t.Stop()
	failing := false
	for {
		err := check(ctx, period, healthy)
		if ctx.Err() != nil {
			return nil
		}
		switch {
		case err == nil:
			if failing {
				failing = false
				n.mu.Lock()
				s := n.status
				n.mu.Unlock()
				_ = n.Notify("STATUS=" + s)
			}
			_ = n.Watchdog()
		case !failing:
			failing = true
			_ = n.Notify("STATUS=" + oneLine("unhealthy, not pinging the watchdog: "+err.Error()))
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func check(ctx context.Context, period time.Duration, healthy HealthFunc) error {
	if healthy == nil {
		return nil
	}
	cctx, cancel := context.WithTimeout(ctx, period)
	defer cancel()
	return healthy(cctx)
}
