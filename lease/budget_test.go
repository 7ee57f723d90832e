package lease

import (
	"testing"
	"time"
)

// TestBudget: a reservation that does not fit waits for a release; one
// larger than the whole budget goes alone.
func TestBudget(t *testing.T) {
	b := newBudget(100)
	b.acquire(60)
	done := make(chan struct{})
	go func() {
		b.acquire(50) // 110 > 100: waits
		close(done)
	}()
	for deadline := time.Now().Add(10 * time.Second); b.waiting.Load() == 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the second reservation never waited")
		}
	}
	select {
	case <-done:
		t.Fatal("got a reservation past the budget; want it to wait")
	default:
	}
	b.release(60)
	<-done
	if got := b.used.Load(); got != 50 {
		t.Fatalf("got %d reserved; want 50", got)
	}
	b.release(50)
	b.acquire(500) // larger than the budget, nothing reserved: goes alone
	if got := b.used.Load(); got != 500 {
		t.Fatalf("got %d reserved; want 500", got)
	}
	b.release(500)
}
