package mcpool

import (
	"sync/atomic"
	"time"
)

// expiryTicks is the number of ticks in Config.Timeout, fewer for a
// Timeout under 8ms (ticks of at most 1ms, at least 100µs): a request
// whose ctx has no deadline fails between Timeout and Timeout + a tick
// after it began.
const expiryTicks = 8

// expiry applies Config.Timeout to the requests whose ctx has no
// deadline, a tick at a time, in place of a timer per request: arming,
// stopping and selecting on a timer per request cost the proxy about 5%
// of its CPU (BENCHMARKS.md).
//
// A request in a connection's pipeline carries the tick it is due at
// (due); at each tick run calls onTick, which times out the requests due
// (Conn.expire). A request waiting before it is sent (for a connection
// slot, or for the first connection) selects on the channel of the tick
// it began in, which run closes ticks+1 ticks later. take gives both.
type expiry struct {
	ticks int64 // in a timeout
	tick  time.Duration
	now   atomic.Int64 // ticks since start
	cur   atomic.Pointer[chan struct{}]
}

func newExpiry(timeout time.Duration) *expiry {
	n := min(expiryTicks, max(1, int64((timeout+time.Millisecond-1)/time.Millisecond)))
	e := &expiry{ticks: n, tick: max(timeout/time.Duration(n), 100*time.Microsecond)}
	ch := make(chan struct{})
	e.cur.Store(&ch)
	return e
}

// due returns the tick at which a request beginning now times out: a
// whole timeout's ticks after the end of the current one.
func (e *expiry) due() int64 { return e.now.Load() + e.ticks + 1 }

// take returns, for a request beginning now, the channel that closes when
// it times out and the tick it is due at (the same moment).
func (e *expiry) take() (<-chan struct{}, int64) { return *e.cur.Load(), e.due() }

// run counts the ticks, calls onTick with each, and closes the channels
// whose time has come, until stop closes. The channels still open then
// are left: their requests end with the pool's connections.
func (e *expiry) run(stop <-chan struct{}, onTick func(tick int64)) {
	t := time.NewTicker(e.tick)
	defer t.Stop()
	type due struct {
		ch chan struct{}
		at int64
	}
	var queue []due // in order of at
	for {
		select {
		case <-t.C:
		case <-stop:
			return
		}
		next := make(chan struct{})
		// The requests that took old began during the tick now ending.
		old := e.cur.Swap(&next)
		queue = append(queue, due{*old, e.due()})
		now := e.now.Add(1)
		onTick(now)
		n := 0
		for n < len(queue) && queue[n].at <= now {
			close(queue[n].ch)
			n++
		}
		queue = append(queue[:0], queue[n:]...)
	}
}
