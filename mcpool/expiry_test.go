package mcpool

import (
	"testing"
	"time"
)

// TestExpiryTicks: a timeout is cut in at most 8 ticks of at most 1ms
// below 8ms, and a request's due tick is a whole timeout after the tick
// it begins in ends.
func TestExpiryTicks(t *testing.T) {
	for _, tt := range []struct {
		timeout time.Duration
		ticks   int64
		tick    time.Duration
	}{
		{time.Second, 8, 125 * time.Millisecond},
		{80 * time.Millisecond, 8, 10 * time.Millisecond},
		{8 * time.Millisecond, 8, time.Millisecond},
		{1900 * time.Microsecond, 2, 950 * time.Microsecond},
		{500 * time.Microsecond, 1, 500 * time.Microsecond},
		{time.Nanosecond, 1, 100 * time.Microsecond},
	} {
		e := newExpiry(tt.timeout)
		if e.ticks != tt.ticks || e.tick != tt.tick {
			t.Errorf("timeout %s: got %d ticks of %s; want %d of %s", tt.timeout, e.ticks, e.tick, tt.ticks, tt.tick)
		}
		before := e.now()
		got := e.due()
		after := e.now()
		if got < before+tt.ticks+1 || got > after+tt.ticks+1 {
			t.Errorf("timeout %s: due at tick %d, now %d..%d; want now + %d", tt.timeout, got, before, after, tt.ticks+1)
		}
	}
}
