package backoff

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestDelay(t *testing.T) {
	p := Policy{Min: 10 * time.Millisecond, Max: time.Second}
	tests := []struct {
		attempt int
		lo, hi  time.Duration
	}{
		{0, 5 * time.Millisecond, 10 * time.Millisecond},
		{1, 10 * time.Millisecond, 20 * time.Millisecond},
		{3, 40 * time.Millisecond, 80 * time.Millisecond},
		{7, 500 * time.Millisecond, time.Second},   // 1.28s capped at 1s
		{100, 500 * time.Millisecond, time.Second}, // no overflow
		{-1, 5 * time.Millisecond, 10 * time.Millisecond},
	}
	for _, tt := range tests {
		for i := 0; i < 200; i++ {
			if d := p.Delay(tt.attempt); d < tt.lo || d > tt.hi {
				t.Fatalf("Delay(%d) = %s; want within [%s, %s]", tt.attempt, d, tt.lo, tt.hi)
			}
		}
	}
	var zero Policy
	if d := zero.Delay(0); d < 25*time.Millisecond || d > 50*time.Millisecond {
		t.Fatalf("zero policy Delay(0) = %s; want within [25ms, 50ms]", d)
	}
	if d := zero.Delay(20); d < 2500*time.Millisecond || d > 5*time.Second {
		t.Fatalf("zero policy Delay(20) = %s; want within [2.5s, 5s]", d)
	}
}

func TestWaitEndsWithCtx(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Wait(ctx, time.Hour); !errors.Is(err, context.Canceled) {
		t.Fatalf("Wait on a cancelled ctx = %v; want context.Canceled", err)
	}
	if err := Wait(context.Background(), time.Millisecond); err != nil {
		t.Fatalf("Wait(1ms) = %v; want nil", err)
	}
}
