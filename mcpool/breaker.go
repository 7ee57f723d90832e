package mcpool

import (
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// BreakerState is the state of a server's circuit breaker.
type BreakerState int32

const (
	// BreakerClosed: requests flow; consecutive failures are counted.
	BreakerClosed BreakerState = iota
	// BreakerOpen: requests fail fast with ErrBreakerOpen until
	// Breaker.OpenFor has passed.
	BreakerOpen
	// BreakerHalfOpen: one request (the probe) is let through; its success
	// closes the breaker, its failure opens it again. Others fail fast.
	BreakerHalfOpen
)

func (s BreakerState) String() string {
	switch s {
	case BreakerClosed:
		return "closed"
	case BreakerOpen:
		return "open"
	case BreakerHalfOpen:
		return "half-open"
	}
	return "unknown"
}

// BreakerConfig configures the breaker of each server.
type BreakerConfig struct {
	// Failures is how many consecutive failed requests (server down,
	// silent timeout, protocol error) open the breaker. A timeout is a
	// failure only when the request was written and nothing came back on
	// its connection since (TimeoutSilent); other timeouts, and errors of
	// the caller's making, neither count nor reset the count.
	Failures int
	// OpenFor is how long an open breaker fails requests fast before it
	// lets one probe through.
	OpenFor time.Duration
}

// outcome of a request, for the breaker
type outcome int

const (
	outcomeNeutral outcome = iota // not sent, or cancelled by its caller
	outcomeSuccess                // the server answered
	outcomeFailure                // down, timed out silent, or garbled
	// Timeouts that are not the server's failure, neutral to the
	// breaker (see TimeoutWhere):
	outcomeQueued    // never written: the client was too busy
	outcomeLate      // written too late to be answered in time
	outcomeAnswering // written; the server kept sending meanwhile
)

// classify returns a request's outcome for the breaker. Of the timeouts
// only the silent ones (written, and nothing came back on the connection
// since) are failures: a client process too busy to send or read its
// requests in time must not open the breaker of a healthy server.
func classify(err error) outcome {
	if err == nil {
		return outcomeSuccess
	}
	if errors.Is(err, ErrTimeout) {
		switch TimeoutWhereOf(err) {
		case TimeoutQueued:
			return outcomeQueued
		case TimeoutLate:
			return outcomeLate
		case TimeoutAnswering:
			return outcomeAnswering
		}
		return outcomeFailure
	}
	switch {
	case errors.Is(err, ErrServerDown), errors.Is(err, ErrProtocol):
		return outcomeFailure
	}
	var se *ServerError
	if errors.As(err, &se) {
		return outcomeSuccess // it answered
	}
	return outcomeNeutral
}

// breaker is one server's circuit breaker.
type breaker struct {
	cfg    BreakerConfig
	notify func(from, to BreakerState, fails int, cause error)
	now    func() time.Time

	// mirrors of state and of fails != 0, readable without mu
	current atomic.Int32
	failing atomic.Bool

	mu sync.Mutex // guards the fields below
	// state is the breaker's state
	state BreakerState
	// fails counts consecutive failures while closed
	fails int
	// until is when an open breaker turns half-open
	until time.Time
	// probing: a half-open breaker's probe is in flight
	probing bool

	// notifyMu orders notifications: taken before mu is released on a
	// transition, so callbacks run in transition order.
	notifyMu sync.Mutex
}

func newBreaker(cfg BreakerConfig, notify func(from, to BreakerState, fails int, cause error)) *breaker {
	return &breaker{cfg: cfg, notify: notify, now: time.Now}
}

// State returns the current state.
func (b *breaker) State() BreakerState { return BreakerState(b.current.Load()) }

// allow reports whether a request may be sent, and whether it is the
// half-open probe whose outcome decides the state.
func (b *breaker) allow() (probe, ok bool) {
	if b.State() == BreakerClosed {
		return false, true
	}
	b.mu.Lock()
	switch b.state {
	case BreakerClosed:
		b.mu.Unlock()
		return false, true
	case BreakerOpen:
		if b.now().Before(b.until) {
			b.mu.Unlock()
			return false, false
		}
		b.probing = true
		b.transition(BreakerHalfOpen, nil) // unlocks
		return true, true
	default: // half-open
		if b.probing {
			b.mu.Unlock()
			return false, false
		}
		b.probing = true
		b.mu.Unlock()
		return true, true
	}
}

// record takes a request's outcome.
func (b *breaker) record(probe bool, o outcome, err error) {
	if !probe && o != outcomeFailure && b.State() == BreakerClosed && !b.failing.Load() {
		return // fast path: nothing to count or reset
	}
	b.mu.Lock()
	switch {
	case probe && b.state == BreakerHalfOpen:
		b.probing = false
		switch o {
		case outcomeSuccess:
			b.transition(BreakerClosed, nil)
			return
		case outcomeFailure:
			b.until = b.now().Add(b.cfg.OpenFor)
			b.transition(BreakerOpen, err)
			return
		}
		// neutral: the next request probes
	case b.state == BreakerClosed:
		switch o {
		case outcomeSuccess:
			b.setFails(0)
		case outcomeFailure:
			b.setFails(b.fails + 1)
			if b.fails >= b.cfg.Failures {
				b.until = b.now().Add(b.cfg.OpenFor)
				b.transition(BreakerOpen, err)
				return
			}
		}
	}
	b.mu.Unlock()
}

func (b *breaker) setFails(n int) {
	b.fails = n
	b.failing.Store(n != 0)
}

// transition sets the state with mu held, releases mu and notifies.
func (b *breaker) transition(to BreakerState, cause error) {
	from, fails := b.state, b.fails
	b.state = to
	b.current.Store(int32(to))
	b.setFails(0)
	b.notifyMu.Lock()
	b.mu.Unlock()
	defer b.notifyMu.Unlock()
	if b.notify != nil && from != to {
		b.notify(from, to, fails, cause)
	}
}
