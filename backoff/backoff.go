// Package backoff computes the wait before a retry: exponential from a
// minimum to a maximum, with jitter on the upper half so that many
// clients retrying at once spread out. It leaves the retry loop, and what
// counts as retryable, to its callers.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Policy is an exponential backoff. The zero value waits 50ms, doubling
// up to 5s.
type Policy struct {
	Min time.Duration // first wait (before jitter); 0 means 50ms
	Max time.Duration // cap (before jitter); 0 means 5s
}

// Delay returns the wait before retry number attempt (0 for the first
// retry): Min<<attempt capped at Max, then a random point in its upper
// half, so d/2 <= Delay <= d.
func (p Policy) Delay(attempt int) time.Duration {
	lo, hi := p.Min, p.Max
	if lo <= 0 {
		lo = 50 * time.Millisecond
	}
	if hi <= 0 {
		hi = 5 * time.Second
	}
	hi = max(hi, lo)
	d := lo << min(max(attempt, 0), 30)
	if d <= 0 || d > hi {
		d = hi
	}
	return d/2 + rand.N(d/2+1)
}

// Sleep waits Delay(attempt), or until ctx ends, whichever is first; it
// returns ctx.Err() when ctx ended first.
func (p Policy) Sleep(ctx context.Context, attempt int) error {
	return Wait(ctx, p.Delay(attempt))
}

// Wait waits d, or until ctx ends; it returns ctx.Err() when ctx ended
// first. Unlike time.After it leaves no timer behind.
func Wait(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
