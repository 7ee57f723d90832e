package mcpool

import (
	"sync/atomic"
	"time"
)

// expiryTicks is the number of ticks in Config.Timeout, fewer for a
// Timeout under 8ms (ticks of at most 1ms, at least 100µs): a request
// whose ctx has no deadline fails between Timeout and Timeout + two ticks
// after it began (later if the machine is too busy to run the expiry on
// time, never sooner).
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
// it began in, which run closes a timeout after that tick ends. take
// gives both.
//
// Ticks are counted by the wall clock from the expiry's start, not by the
// ticker's deliveries, and a request's channel closes a whole timeout
// after the last moment it was handed out: a run goroutine that is late
// (a loaded machine) ends requests late, never early.
type expiry struct {
	ticks   int64 // in a timeout
	tick    time.Duration
	timeout time.Duration
	start   time.Time
	cur     atomic.Pointer[chan struct{}]
}

func newExpiry(timeout time.Duration) *expiry {
	n := min(expiryTicks, max(1, int64((timeout+time.Millisecond-1)/time.Millisecond)))
	e := &expiry{ticks: n, tick: max(timeout/time.Duration(n), 100*time.Microsecond), timeout: timeout, start: time.Now()}
	ch := make(chan struct{})
	e.cur.Store(&ch)
	return e
}

// now is the current tick by the wall clock.
func (e *expiry) now() int64 { return int64(time.Since(e.start) / e.tick) }

// due returns the tick at which a request beginning now times out: a
// whole timeout's ticks after the end of the current one.
func (e *expiry) due() int64 { return e.now() + e.ticks + 1 }

// take returns, for a request beginning now, the channel that closes when
// it times out and the tick it is due at.
func (e *expiry) take() (<-chan struct{}, int64) { return *e.cur.Load(), e.due() }

// run calls onTick with the current tick at each tick, and closes each
// channel a timeout after it stopped being handed out, until stop
// closes. The channels still open then are left: their requests end with
// the pool's connections.
func (e *expiry) run(stop <-chan struct{}, onTick func(tick int64)) {
	t := time.NewTicker(e.tick)
	defer t.Stop()
	type due struct {
		ch chan struct{}
		at time.Time
	}
	var queue []due // in order of at
	for {
		select {
		case <-t.C:
		case <-stop:
			return
		}
		next := make(chan struct{})
		// The requests that took old began before now.
		old := e.cur.Swap(&next)
		now := time.Now()
		queue = append(queue, due{*old, now.Add(e.timeout)})
		onTick(e.now())
		n := 0
		for n < len(queue) && !queue[n].at.After(now) {
			close(queue[n].ch)
			n++
		}
		queue = append(queue[:0], queue[n:]...)
	}
}
