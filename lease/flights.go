package lease

import (
	"context"
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/pgcache/pgcache/mcpool"
)

// nShards is the number of shards of the flight table: enough that the
// reads of different keys seldom share a lock on a busy proxy.
const nShards = 64

// shard is one part of the flight table, chosen by a hash of the key.
type shard struct {
	mu sync.Mutex // guards flights and the fields of every flight in it
	// flights maps a key to what this proxy has under way for it.
	flights map[string]*flight
	// free holds flights of reads nobody joined, for reuse (at most
	// maxFree): most reads are hits that no other read of the key
	// overlaps.
	free []*flight
	// sets maps a key to its checks of sets under way (setgroups.go),
	// and freeSets holds keySets for reuse (at most maxFreeSets).
	sets     map[string]*keySets
	freeSets []*keySets
}

// maxFree bounds a shard's free flights.
const maxFree = 8

// flight is what this proxy has under way for one key: a read whose
// answer has not come (reading), a poller serving waiters (polling), or
// a lease handed to one of its clients that it has not seen filled
// (leased). A read of the key finding a flight joins it and sends
// nothing; the flight ends with one outcome for all who joined (done is
// closed and out set), except the waiter handed a new lease by the
// poller, which gets it alone. All fields are guarded by the shard's mu,
// but out, which is written once before done is closed.
type flight struct {
	// sh is the shard of the flight's key.
	sh *shard
	// reading: a client's read (mg N) of the key is in flight; its answer
	// decides for the readers who joined meanwhile.
	reading bool
	// polling: a poller goroutine reads the key for the waiters.
	polling bool
	// leased is the CAS of a lease this proxy handed out and has not seen
	// filled, for which readers wait rather than ask memcached; 0: none.
	// A lease on a stale item whose readers are served stale is not
	// recorded here: they ask memcached, which answers with the value.
	leased uint64
	// waiters are the readers that joined, in order; those that gave up
	// stay in the slice with left set, and head skips those picked.
	waiters []*waiter
	head    int
	live    int // waiters neither left nor picked
	// done is closed when out is set; made when the first reader joins.
	done  chan struct{}
	out   outcome
	ended bool // settled: out is final
}

// waiter is one reader waiting on a flight.
type waiter struct {
	// lease gets a value when the poller handed this waiter a new lease
	// (picked is set first): its client fills.
	lease  chan struct{}
	picked atomic.Bool
	// cas is the lease handed to this waiter, and unrecorded whether its
	// record could not be written; both set before lease gets its value.
	cas        uint64
	unrecorded bool
	left       bool // gave up (its wait is over); guarded by the shard's mu
}

func (l *leaser) shardOf(key string) *shard {
	return &l.shards[maphash.String(l.seed, key)%nShards]
}

// joinLocked adds a waiter to f.
func (f *flight) joinLocked() *waiter {
	if f.done == nil {
		f.done = make(chan struct{})
	}
	w := &waiter{lease: make(chan struct{}, 1)}
	f.waiters = append(f.waiters, w)
	f.live++
	return w
}

// pickLocked removes and returns the longest waiter that has not left,
// or nil.
func (f *flight) pickLocked() *waiter {
	for f.head < len(f.waiters) {
		w := f.waiters[f.head]
		f.waiters[f.head] = nil
		f.head++
		if !w.left {
			w.picked.Store(true)
			f.live--
			return w
		}
	}
	return nil
}

// begin starts a read of key that may take a lease. When this proxy
// already has a flight for key, the caller joins it (w non-nil) and
// sends nothing: it waits for the flight's outcome. Otherwise it opens
// one (w nil, f non-nil): the caller sends its mg and hands the answer
// to result, which decides for whoever joined meanwhile. f is nil when
// joining is off (Lease.Wait 0, or the proxy is closing).
func (l *leaser) begin(key string) (f *flight, w *waiter) {
	if l.cfg.Wait <= 0 || l.stopped.Load() {
		return nil, nil
	}
	sh := l.shardOf(key)
	sh.mu.Lock()
	f = sh.flights[key]
	if f == nil {
		if n := len(sh.free); n > 0 {
			f = sh.free[n-1]
			sh.free[n-1] = nil
			sh.free = sh.free[:n-1]
		} else {
			f = new(flight)
		}
		f.sh = sh
		f.reading = true
		sh.flights[key] = f
		sh.mu.Unlock()
		return f, nil
	}
	w = f.joinLocked()
	start := !f.reading && !f.polling // a lease handed out, no one waiting yet
	if start {
		f.polling = true
	}
	sh.mu.Unlock()
	l.st.joins.Add(1)
	if start {
		l.goPoll(key, f)
	}
	return f, w
}

// settle ends f with o: every waiter that has not left gets it, and the
// key's next reader asks memcached again.
func (l *leaser) settle(key string, f *flight, o outcome) {
	sh := f.sh
	sh.mu.Lock()
	defer sh.mu.Unlock()
	l.settleLocked(sh, key, f, o)
}

// settleLocked is settle with the shard's mu held. A flight already
// settled is left as it is: its waiters have their outcome.
func (l *leaser) settleLocked(sh *shard, key string, f *flight, o outcome) {
	if f.ended {
		return
	}
	f.ended = true
	f.reading, f.polling = false, false
	f.out = o
	if f.done != nil {
		close(f.done)
	}
	f.waiters, f.head, f.live = nil, 0, 0
	if sh.flights[key] == f {
		delete(sh.flights, key)
	}
}

// settleRead ends f, opened by the caller's read, with o, and recycles
// it if no one joined: then no one else holds it, as it was reachable
// only through the shard until now.
func (l *leaser) settleRead(key string, f *flight, o outcome) {
	sh := f.sh
	sh.mu.Lock()
	if f.done == nil && f.leased == 0 && sh.flights[key] == f {
		delete(sh.flights, key)
		if len(sh.free) < maxFree {
			*f = flight{}
			sh.free = append(sh.free, f)
		}
		sh.mu.Unlock()
		return
	}
	l.settleLocked(sh, key, f, o)
	sh.mu.Unlock()
}

// leasedRead ends the read of f that won a lease for this proxy's
// client: the readers that joined wait for its fill, polled for; with
// none, f stays as a mark of the lease (if won recorded it) for the
// readers to come.
func (l *leaser) leasedRead(key string, f *flight) {
	sh := f.sh
	sh.mu.Lock()
	f.reading = false
	start := f.live > 0
	if start {
		f.polling = true
	} else {
		l.idleLocked(sh, key, f)
	}
	sh.mu.Unlock()
	if start {
		l.goPoll(key, f)
	}
}

// idleLocked forgets the waiters of f, none of whom waits any more, and
// f itself unless it marks a lease. f is neither reading nor polling.
func (l *leaser) idleLocked(sh *shard, key string, f *flight) {
	f.waiters, f.head, f.live = nil, 0, 0
	if f.leased == 0 && sh.flights[key] == f {
		delete(sh.flights, key)
	}
}

// await makes the reader of f a waiter of it, after its read found
// another client's lease, and starts the poller if none runs.
func (l *leaser) await(key string, f *flight) *waiter {
	sh := f.sh
	sh.mu.Lock()
	f.reading = false
	w := f.joinLocked()
	start := !f.polling
	f.polling = true
	sh.mu.Unlock()
	if start {
		l.goPoll(key, f)
	}
	return w
}

// markLeased records on key's flight f that this proxy handed out the
// lease cas, if f is still the key's. Called with l.mu held.
func (l *leaser) markLeased(key string, f *flight, cas uint64) {
	sh := l.shardOf(key)
	sh.mu.Lock()
	if sh.flights[key] == f {
		f.leased = cas
	}
	sh.mu.Unlock()
}

// unmarkLeased drops the mark of the lease cas from key's flight, once
// the lease is filled or its record dropped. Called with l.mu held.
func (l *leaser) unmarkLeased(key string, cas uint64) {
	sh := l.shardOf(key)
	sh.mu.Lock()
	if f := sh.flights[key]; f != nil && f.leased == cas {
		f.leased = 0
		if !f.reading && !f.polling {
			l.idleLocked(sh, key, f)
		}
	}
	sh.mu.Unlock()
}

// filled hands it, just stored for key by a fill that memcached accepted
// (ms C<cas> answered HD), to the readers of this proxy waiting for
// that fill, without waiting for the next poll: it was memcached's value
// when the fill was answered, after they joined. A read in flight is
// left alone: its answer may predate the fill, and its readers wait for
// it.
func (l *leaser) filled(key string, it item) {
	if l.cfg.Wait <= 0 {
		return
	}
	sh := l.shardOf(key)
	sh.mu.Lock()
	if f := sh.flights[key]; f != nil && !f.reading && f.live > 0 {
		l.settleLocked(sh, key, f, outcome{kind: gotValue, item: it})
	}
	sh.mu.Unlock()
}

// wrote is told that a write of key through this proxy (set, delete,
// and the like) was answered. A read or poll of key in flight, which may
// have been answered before the write, is detached from the key: a read
// that comes after the write sends its own mg or joins one sent after
// the write, so a client reads its own writes. Those who joined it keep
// it; a lease mark on it goes (the fill, if this write is one, took the
// record already).
func (l *leaser) wrote(key string) {
	if !l.enabled() || l.cfg.Wait <= 0 {
		return
	}
	sh := l.shardOf(key)
	sh.mu.Lock()
	if f := sh.flights[key]; f != nil && (f.reading || f.polling) {
		delete(sh.flights, key)
	}
	sh.mu.Unlock()
}

// goPoll starts the poller of f, or ends f with a miss when the proxy
// is closing.
func (l *leaser) goPoll(key string, f *flight) {
	l.mu.Lock()
	if l.stopped.Load() {
		l.mu.Unlock()
		l.settle(key, f, outcome{kind: gotMiss})
		return
	}
	l.wg.Add(1)
	l.mu.Unlock()
	go l.poll(key, f)
}

// wait blocks until w gets an outcome of f or the wait (counted from
// start) is over.
func (l *leaser) wait(ctx context.Context, key string, f *flight, w *waiter, start time.Time) (getResult, error) {
	l.st.waits.Add(1)
	now := l.now()
	if start.IsZero() {
		start = now
	}
	t := time.NewTimer(l.cfg.Wait - now.Sub(start))
	defer t.Stop()
	var o outcome
	select {
	case <-w.lease:
		o.kind = gotLease
		o.item.cas = w.cas
	case <-f.done:
		o = l.outcomeOf(f, w)
	case <-t.C:
		if l.leave(key, f, w) {
			l.st.waitTimeouts.Add(1)
			l.st.observeWait(l.now().Sub(start))
			return getResult{waited: true}, nil
		}
		o = l.outcomeOf(f, w) // an outcome came as the timer fired
	case <-ctx.Done():
		if l.leave(key, f, w) {
			return getResult{}, nil
		}
		o = l.outcomeOf(f, w)
	}
	l.st.observeWait(l.now().Sub(start))
	switch o.kind {
	case gotValue:
		if o.stale {
			l.st.staleServes.Add(1)
		}
		return getResult{found: true, item: o.item, stale: o.stale}, nil
	case gotLease:
		// The poller recorded the lease for this client.
		return getResult{lease: o.item.cas, unrecorded: w.unrecorded}, nil
	}
	// The read this one joined failed or found no value, or the poller
	// gave up: a miss, after a wait, as at the end of Lease.Wait.
	return getResult{waited: true}, o.err
}

// outcomeOf is w's outcome once f is done or w was picked.
func (l *leaser) outcomeOf(f *flight, w *waiter) outcome {
	if w.picked.Load() {
		<-w.lease
		return outcome{kind: gotLease, item: item{cas: w.cas}}
	}
	<-f.done
	return f.out
}

// leave takes w out of f; false when it already has an outcome (f is
// done, or w was picked for a lease).
func (l *leaser) leave(key string, f *flight, w *waiter) bool {
	sh := f.sh
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if w.picked.Load() {
		return false
	}
	select {
	case <-f.done:
		return false
	default:
	}
	w.left = true
	f.live--
	return true
}

// poll looks for key's value on behalf of f's waiters, backing off from
// PollMin to PollMax, until it can answer them all or none is left.
func (l *leaser) poll(key string, f *flight) {
	defer l.wg.Done()
	sh := f.sh
	delay := l.cfg.PollMin
	t := time.NewTimer(delay)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-l.stop:
			l.settle(key, f, outcome{kind: gotMiss})
			return
		}
		sh.mu.Lock()
		if f.live == 0 {
			f.polling = false
			l.idleLocked(sh, key, f)
			sh.mu.Unlock()
			return
		}
		sh.mu.Unlock()
		l.st.polls.Add(1)
		resp, err := l.be.MetaGet(context.Background(), key, l.getFlags...)
		if err != nil || resp.Status != mcpool.StatusVA {
			// A server that fails now fails the waiters fast rather than
			// at the end of their wait.
			if err != nil {
				l.st.backendErrors.Add(1)
				l.log.Debug("lease poll failed", zap.String("key", key), zap.Error(err))
			}
			l.settle(key, f, outcome{kind: gotMiss})
			return
		}
		serveStale := resp.Stale && l.cfg.Stale && !isStub(&resp)
		switch {
		case resp.Win:
			// The lease was released, expired or invalidated: a new one
			// goes to the longest waiter, who fills.
			sh.mu.Lock()
			w := f.pickLocked()
			sh.mu.Unlock()
			if w == nil {
				l.release(context.Background(), key, resp.CAS, resp.Stale)
				l.settle(key, f, outcome{kind: gotMiss})
				return
			}
			mark := f
			if serveStale {
				mark = nil
			}
			w.unrecorded = !l.won(context.Background(), key, &resp, mark)
			w.cas = resp.CAS
			w.lease <- struct{}{}
			if serveStale {
				l.settle(key, f, outcome{kind: gotValue, item: itemOf(&resp), stale: true})
				return
			}
		case serveStale:
			l.settle(key, f, outcome{kind: gotValue, item: itemOf(&resp), stale: true})
			return
		case l.overdue(&resp):
			// The lease ran past Lease.TTL unfilled: take it over; the
			// next poll, at once, wins a new one for a waiter.
			l.takeOver(context.Background(), key, resp.CAS)
			t.Reset(0)
			continue
		case resp.Stale, resp.Claimed && isStub(&resp):
			// still being filled
		default:
			l.settle(key, f, outcome{kind: gotValue, item: itemOf(&resp)})
			return
		}
		delay = min(2*delay, l.cfg.PollMax)
		t.Reset(delay)
	}
}
