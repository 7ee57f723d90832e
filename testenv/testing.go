package testenv

import (
	"context"
	"fmt"
	"testing"
	"time"
)

// NewMemcacheds starts n memcached servers for a test and stops them when
// the test ends. A server that cannot start fails the test with the reason.
func NewMemcacheds(t testing.TB, n int) []*Memcached {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dir := t.TempDir()
	out := make([]*Memcached, 0, n)
	for i := 0; i < n; i++ {
		m, err := StartMemcached(ctx, fmt.Sprintf("mc%d", i+1), fmt.Sprintf("%s/mc%d", dir, i+1))
		if err != nil {
			t.Fatalf("testenv: start memcached: %v", err)
		}
		t.Cleanup(func() { _ = m.Close() })
		out = append(out, m)
	}
	return out
}

// New starts a whole environment for a test and closes it when the test
// ends. An environment that cannot start fails the test with the reason.
func New(t testing.TB, opts Options) *Env {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e, err := Start(ctx, opts)
	if err != nil && ctx.Err() == nil {
		// A port taken between its check and the bind (by a test running
		// in parallel) fails one start; a second start picks new ports.
		t.Logf("testenv: start failed, trying once more: %v", err)
		e, err = Start(ctx, opts)
	}
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() {
		if err := e.Close(); err != nil {
			t.Errorf("testenv close: %v", err)
		}
	})
	return e
}
