package mcpool

import (
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

// newTestPool returns a Pool over servers with test-friendly timings,
// closed when the test ends. mutate, if set, adjusts the config.
func newTestPool(t testing.TB, servers []string, mutate func(*Config)) *Pool {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Servers = servers
	cfg.Timeout = 5 * time.Second
	cfg.ReconnectMin = 10 * time.Millisecond
	cfg.ReconnectMax = 100 * time.Millisecond
	cfg.Breaker = BreakerConfig{Failures: 3, OpenFor: 100 * time.Millisecond}
	if mutate != nil {
		mutate(&cfg)
	}
	p, err := New(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}
