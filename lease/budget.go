package lease

import (
	"sync"
	"sync/atomic"
)

// budget is a count of bytes that holders reserve before they allocate
// and release when done (Config.ReplyBytes). A reservation that does not
// fit waits, unless nothing is reserved: one reservation larger than the
// whole budget goes alone. The fast path is one compare-and-swap.
type budget struct {
	max     int64
	used    atomic.Int64
	waiting atomic.Int64 // reservations waiting in acquire

	mu   sync.Mutex // guards nothing but cond's waits
	cond *sync.Cond
}

func newBudget(max int64) *budget {
	b := &budget{max: max}
	b.cond = sync.NewCond(&b.mu)
	return b
}

// fits reports whether n more bytes fit now.
func (b *budget) fits(n int64) bool {
	u := b.used.Load()
	return u == 0 || u+n <= b.max
}

// acquire reserves n bytes, waiting for releases until they fit.
func (b *budget) acquire(n int64) {
	for {
		u := b.used.Load()
		if u == 0 || u+n <= b.max {
			if b.used.CompareAndSwap(u, u+n) {
				return
			}
			continue
		}
		b.mu.Lock()
		b.waiting.Add(1)
		for !b.fits(n) {
			b.cond.Wait()
		}
		b.waiting.Add(-1)
		b.mu.Unlock()
	}
}

// release returns n bytes reserved by acquire.
func (b *budget) release(n int64) {
	if n == 0 {
		return
	}
	b.used.Add(-n)
	if b.waiting.Load() > 0 {
		b.mu.Lock()
		b.cond.Broadcast()
		b.mu.Unlock()
	}
}
