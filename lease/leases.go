package lease

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/pgcache/pgcache/mcpool"
)

// item is a value as the client sees it.
type item struct {
	value []byte
	flags uint32
	cas   uint64
}

// getResult is what a read of one key returns to the client.
type getResult struct {
	found bool
	item  item
	// stale: the value was served stale while a refill is in flight.
	stale bool
}

type outcomeKind uint8

const (
	gotMiss  outcomeKind = iota // no value: wait over, nothing came
	gotValue                    // the winner's value (or the stale one)
	gotLease                    // the poller won a new lease for this waiter
)

type outcome struct {
	kind  outcomeKind
	item  item
	stale bool
}

// waiter is one reader waiting for a key's value.
type waiter struct {
	ch chan outcome // capacity 1; written once, under leaser.mu
}

// flight is the set of readers of one key waiting on this proxy, served
// by one poller.
type flight struct {
	waiters []*waiter
}

// record is a lease this proxy handed to a client: the CAS of the item
// memcached gave W for.
type record struct {
	cas     uint64
	stale   bool // the lease refills a stale item (X W)
	expires time.Time
}

type queued struct {
	key string
	cas uint64
}

// leaser holds the lease records and waiting readers of one proxy. Lease
// state itself lives in memcached (the W, Z and X flags); the records only
// remember which CAS a fill must match.
type leaser struct {
	cfg  LeaseConfig
	be   Backend
	log  *zap.Logger
	st   *counters
	now  func() time.Time
	nTTL string // "N<seconds>"
	// getFlags are the flags of a read that may take a lease, made once:
	// a variadic literal would be allocated per read.
	getFlags []string

	mu sync.Mutex // guards records, queue, qhead, flights, stopped
	// records maps a key to the lease handed out for it.
	records map[string]record
	// queue lists records in the order they were made, which is their
	// expiry order; entries whose record is gone are skipped.
	queue []queued
	qhead int
	// flights maps a key to the readers waiting for it.
	flights map[string]*flight
	stopped bool

	// nflights mirrors len(flights), so that reads skip mu when no one
	// waits (the common case).
	nflights atomic.Int64

	stop     chan struct{}
	stopOnce sync.Once
	wg       sync.WaitGroup // pollers, sweeper, record cleanups
}

func newLeaser(cfg LeaseConfig, be Backend, log *zap.Logger, st *counters) *leaser {
	l := &leaser{
		cfg:     cfg,
		be:      be,
		log:     log,
		st:      st,
		now:     time.Now,
		records: make(map[string]record),
		flights: make(map[string]*flight),
		stop:    make(chan struct{}),
	}
	if cfg.TTL > 0 {
		l.nTTL = "N" + strconv.FormatInt(cfg.ttlSeconds(), 10)
		l.getFlags = []string{"v", "f", "c", l.nTTL}
		l.wg.Add(1)
		go l.sweeper()
	}
	return l
}

func (l *leaser) enabled() bool { return l.cfg.TTL > 0 }

// close stops the pollers (their waiters get a miss) and the sweeper, and
// waits for them.
func (l *leaser) close() {
	l.stopOnce.Do(func() {
		l.mu.Lock()
		l.stopped = true
		l.mu.Unlock()
		close(l.stop)
	})
	l.wg.Wait()
}

// isStub reports whether r is the empty item memcached creates for a
// lease (mg N): no data and no client flags. A real empty value with
// flags 0 looks the same; see the package documentation.
func isStub(r *mcpool.Response) bool { return len(r.Value) == 0 && r.ClientFlags == 0 }

func itemOf(r *mcpool.Response) item {
	return item{value: r.Value, flags: r.ClientFlags, cas: r.CAS}
}

// get reads key for a client: a hit, a miss that won the lease (the
// client is to fill), a stale value, or the winner's value after a wait.
func (l *leaser) get(ctx context.Context, key string) (getResult, error) {
	if !l.enabled() {
		resp, err := l.be.MetaGet(ctx, key, plainGetFlags...)
		return l.plainResult(ctx, key, &resp, err)
	}
	start := l.now()
	if f, w := l.joinFlight(key); f != nil {
		return l.wait(ctx, key, f, w, start), nil
	}
	resp, err := l.be.MetaGet(ctx, key, l.getFlags...)
	return l.result(ctx, key, &resp, err, start)
}

// multiGetter is a Backend that pipelines the reads of many keys
// (*mcpool.Pool, hence PoolBackend, is one).
type multiGetter interface {
	MetaGetMulti(ctx context.Context, keys []string, flags ...string) ([]mcpool.Response, []error)
}

// getMulti reads keys as get reads each, into out and errs, when the
// Backend pipelines reads (ok false: it does not, nothing was done). The
// reads of the keys nobody on this proxy waits for go out together, one
// write per server. Waits that follow count from one start, so together
// they last at most Wait. A key named twice gets its first read's result:
// a second mg would see the first one's lease.
func (l *leaser) getMulti(ctx context.Context, keys []string, out []getResult, errs []error) (ok bool) {
	mg, ok := l.be.(multiGetter)
	if !ok {
		return false
	}
	first := make(map[string]int, len(keys))
	type joined struct {
		f *flight
		w *waiter
	}
	var waits map[int]joined
	send := make([]string, 0, len(keys))
	idx := make([]int, 0, len(keys)) // position in keys of each sent key
	start := l.now()
	for i, k := range keys {
		if _, dup := first[k]; dup {
			continue
		}
		first[k] = i
		if l.enabled() {
			if f, w := l.joinFlight(k); f != nil {
				if waits == nil {
					waits = make(map[int]joined)
				}
				waits[i] = joined{f, w}
				continue
			}
		}
		send = append(send, k)
		idx = append(idx, i)
	}
	flags := plainGetFlags
	if l.enabled() {
		flags = l.getFlags
	}
	resps, rerrs := mg.MetaGetMulti(ctx, send, flags...)
	for j, i := range idx {
		if l.enabled() {
			out[i], errs[i] = l.result(ctx, keys[i], &resps[j], rerrs[j], start)
		} else {
			out[i], errs[i] = l.plainResult(ctx, keys[i], &resps[j], rerrs[j])
		}
	}
	for i, k := range keys {
		if j, ok := waits[i]; ok {
			out[i] = l.wait(ctx, k, j.f, j.w, start)
		} else if f := first[k]; f != i {
			out[i], errs[i] = out[f], errs[f]
		}
	}
	return true
}

// joinFlight makes the caller a waiter of key's flight, if there is one.
func (l *leaser) joinFlight(key string) (*flight, *waiter) {
	if l.nflights.Load() == 0 {
		return nil, nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if f := l.flights[key]; f != nil {
		return f, l.joinLocked(f)
	}
	return nil, nil
}

// result is what a client gets for key given the response to the read
// that may take a lease (mg v f c N<ttl>): a hit, a miss that won the
// lease (the client is to fill), a stale value, or the winner's value
// after a wait.
func (l *leaser) result(ctx context.Context, key string, resp *mcpool.Response, err error, start time.Time) (getResult, error) {
	if err != nil {
		return getResult{}, err
	}
	if resp.Status != mcpool.StatusVA {
		// EN despite N: memcached could not allocate the empty item.
		return getResult{}, nil
	}
	switch {
	case resp.Win:
		l.won(ctx, key, resp)
		return getResult{}, nil
	case resp.Stale:
		if l.cfg.Stale && !isStub(resp) {
			l.st.staleServes.Add(1)
			return getResult{found: true, item: itemOf(resp), stale: true}, nil
		}
	case resp.Claimed && isStub(resp):
	default:
		return getResult{found: true, item: itemOf(resp)}, nil
	}
	// Another client holds the lease: wait for its value.
	if l.cfg.Wait <= 0 {
		l.st.waitTimeouts.Add(1)
		return getResult{}, nil
	}
	l.mu.Lock()
	if l.stopped {
		l.mu.Unlock()
		return getResult{}, nil
	}
	f := l.flights[key]
	if f == nil {
		f = &flight{}
		l.flights[key] = f
		l.nflights.Add(1)
		l.wg.Add(1)
		go l.poll(key, f)
	}
	w := l.joinLocked(f)
	l.mu.Unlock()
	return l.wait(ctx, key, f, w, start), nil
}

var plainGetFlags = []string{"v", "f", "c"}

// plainResult is what a client gets for key from a read with leases off
// (mg v f c). A stale item is a miss; if the read took its refill token
// (memcached gives W to the first reader of a stale item whatever its
// flags), the token is handed back.
func (l *leaser) plainResult(ctx context.Context, key string, resp *mcpool.Response, err error) (getResult, error) {
	if err != nil || resp.Status != mcpool.StatusVA {
		return getResult{}, err
	}
	if resp.Stale {
		if resp.Win {
			l.release(ctx, key, resp.CAS, true)
		}
		return getResult{}, nil
	}
	return getResult{found: true, item: itemOf(resp)}, nil
}

func (l *leaser) joinLocked(f *flight) *waiter {
	w := &waiter{ch: make(chan outcome, 1)}
	f.waiters = append(f.waiters, w)
	return w
}

// wait blocks until w gets an outcome or the wait (counted from start)
// is over.
func (l *leaser) wait(ctx context.Context, key string, f *flight, w *waiter, start time.Time) getResult {
	l.st.waits.Add(1)
	t := time.NewTimer(l.cfg.Wait - l.now().Sub(start))
	defer t.Stop()
	var o outcome
	select {
	case o = <-w.ch:
	case <-t.C:
		if !l.leave(f, w) {
			o = <-w.ch // an outcome was sent as the timer fired
			break
		}
		l.st.waitTimeouts.Add(1)
		l.st.observeWait(l.now().Sub(start))
		return getResult{}
	case <-ctx.Done():
		if !l.leave(f, w) {
			o = <-w.ch
			break
		}
		return getResult{}
	}
	l.st.observeWait(l.now().Sub(start))
	switch o.kind {
	case gotValue:
		if o.stale {
			l.st.staleServes.Add(1)
		}
		return getResult{found: true, item: o.item, stale: o.stale}
	case gotLease:
		return getResult{} // the poller recorded the lease for this client
	}
	return getResult{}
}

// leave removes w from f; false when an outcome was already sent to it.
func (l *leaser) leave(f *flight, w *waiter) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, x := range f.waiters {
		if x == w {
			f.waiters = append(f.waiters[:i], f.waiters[i+1:]...)
			return true
		}
	}
	return false
}

// poll looks for key's value on behalf of f's waiters, backing off from
// PollMin to PollMax, until it can answer them all or none is left.
func (l *leaser) poll(key string, f *flight) {
	defer l.wg.Done()
	delay := l.cfg.PollMin
	t := time.NewTimer(delay)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-l.stop:
			l.end(key, f, outcome{kind: gotMiss})
			return
		}
		l.mu.Lock()
		if len(f.waiters) == 0 {
			l.forgetLocked(key, f)
			l.mu.Unlock()
			return
		}
		l.mu.Unlock()
		l.st.polls.Add(1)
		resp, err := l.be.MetaGet(context.Background(), key, l.getFlags...)
		if err != nil || resp.Status != mcpool.StatusVA {
			// A server that fails now fails the waiters fast rather than
			// at the end of their wait.
			if err != nil {
				l.st.backendErrors.Add(1)
				l.log.Debug("lease poll failed", zap.String("key", key), zap.Error(err))
			}
			l.end(key, f, outcome{kind: gotMiss})
			return
		}
		switch {
		case resp.Win:
			// The lease was released, expired or invalidated: a new one
			// goes to the longest waiter, who fills.
			l.mu.Lock()
			var w *waiter
			if len(f.waiters) > 0 {
				w = f.waiters[0]
				f.waiters = f.waiters[1:]
			}
			l.mu.Unlock()
			if w == nil {
				l.release(context.Background(), key, resp.CAS, resp.Stale)
				l.end(key, f, outcome{kind: gotMiss})
				return
			}
			l.won(context.Background(), key, &resp)
			w.ch <- outcome{kind: gotLease}
			if resp.Stale && l.cfg.Stale && !isStub(&resp) {
				l.end(key, f, outcome{kind: gotValue, item: itemOf(&resp), stale: true})
				return
			}
		case resp.Stale:
			if l.cfg.Stale && !isStub(&resp) {
				l.end(key, f, outcome{kind: gotValue, item: itemOf(&resp), stale: true})
				return
			}
		case resp.Claimed && isStub(&resp):
			// still being filled
		default:
			l.end(key, f, outcome{kind: gotValue, item: itemOf(&resp)})
			return
		}
		delay = min(2*delay, l.cfg.PollMax)
		t.Reset(delay)
	}
}

// end answers every waiter of f with o and forgets f.
func (l *leaser) end(key string, f *flight, o outcome) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, w := range f.waiters {
		w.ch <- o
	}
	f.waiters = nil
	l.forgetLocked(key, f)
}

// forgetLocked removes f from the flights if it is still key's.
func (l *leaser) forgetLocked(key string, f *flight) {
	if l.flights[key] == f {
		delete(l.flights, key)
		l.nflights.Add(-1)
	}
}

// won records the lease memcached just gave (W) so that the fill can be
// checked against it, on any connection of this proxy and, through the
// record written to memcached, on other proxies.
func (l *leaser) won(ctx context.Context, key string, resp *mcpool.Response) {
	l.st.wins.Add(1)
	now := l.now()
	l.mu.Lock()
	l.records[key] = record{cas: resp.CAS, stale: resp.Stale, expires: now.Add(l.cfg.TTL)}
	l.queue = append(l.queue, queued{key: key, cas: resp.CAS})
	for len(l.records) > l.cfg.MaxRecords || len(l.queue)-l.qhead > 2*l.cfg.MaxRecords {
		l.popLocked()
	}
	l.mu.Unlock()
	if l.cfg.ForeignSet != ForeignCheck {
		return
	}
	_, err := l.be.MetaSet(ctx, l.recordKey(key), strconv.AppendUint(nil, resp.CAS, 10),
		mcpool.SetOptions{TTL: 2 * time.Duration(l.cfg.ttlSeconds()) * time.Second})
	if err != nil {
		l.st.backendErrors.Add(1)
		l.log.Debug("write lease record", zap.String("key", key), zap.Error(err))
	}
}

// popLocked drops the oldest queue entry and its record if it is still
// the same lease.
func (l *leaser) popLocked() {
	q := l.queue[l.qhead]
	l.queue[l.qhead] = queued{}
	l.qhead++
	if r, ok := l.records[q.key]; ok && r.cas == q.cas {
		delete(l.records, q.key)
	}
	if l.qhead > len(l.queue)/2 && l.qhead > 64 {
		n := copy(l.queue, l.queue[l.qhead:])
		clear(l.queue[n:])
		l.queue = l.queue[:n]
		l.qhead = 0
	}
}

// take removes and returns this proxy's lease record for key.
func (l *leaser) take(key string) (record, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	r, ok := l.records[key]
	if ok {
		delete(l.records, key)
	}
	return r, ok
}

// sweeper drops expired records. A lease on a stale item that was not
// filled in time is handed back (md I C<cas>), so that the next reader
// can win it; an unfilled lease on a miss needs nothing, as memcached
// expires its empty item.
func (l *leaser) sweeper() {
	defer l.wg.Done()
	tick := time.NewTicker(max(l.cfg.TTL/4, 100*time.Millisecond))
	defer tick.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-tick.C:
		}
		now := l.now()
		var release []queued
		l.mu.Lock()
		for l.qhead < len(l.queue) {
			q := l.queue[l.qhead]
			r, ok := l.records[q.key]
			if ok && r.cas == q.cas && now.Before(r.expires) {
				break
			}
			if ok && r.cas == q.cas && r.stale {
				release = append(release, q)
			}
			l.popLocked()
		}
		l.mu.Unlock()
		for _, q := range release {
			l.release(context.Background(), q.key, q.cas, true)
		}
	}
}

// release hands back a lease nobody will fill: a stale item is marked
// stale again (which clears its token), an empty lease item is deleted.
// Both only if the item is still the one leased (C<cas>).
func (l *leaser) release(ctx context.Context, key string, cas uint64, stale bool) {
	l.st.releases.Add(1)
	_, err := l.be.MetaDelete(ctx, key, mcpool.DeleteOptions{Invalidate: stale, CAS: cas})
	if err != nil {
		l.st.backendErrors.Add(1)
		l.log.Debug("release lease", zap.String("key", key), zap.Error(err))
	}
}

// fillResult is the reply to a fill.
type fillResult uint8

const (
	fillStored fillResult = iota + 1
	fillRefused
	fillPlain // no lease: store as an ordinary write
)

// fill stores value for a set or add of key if a lease governs it. It
// returns fillPlain when no lease is known, and the caller stores as
// usual.
func (l *leaser) fill(ctx context.Context, key string, value []byte, flags uint32, exptime int64) (fillResult, error) {
	if !l.enabled() {
		return fillPlain, nil
	}
	if r, ok := l.take(key); ok {
		res, err := l.checkedSet(ctx, key, value, flags, exptime, r.cas)
		l.cleanupRecord(key, r.cas)
		return res, err
	}
	switch l.cfg.ForeignSet {
	case ForeignPlain:
		return fillPlain, nil
	case ForeignRefuse:
		l.st.refused.Add(1)
		return fillRefused, nil
	}
	resp, err := l.be.MetaGet(ctx, l.recordKey(key), "v")
	if err != nil {
		// Without the record the fill cannot be checked: refusing costs a
		// miss, storing might store a stale value (I2). The client gets
		// the error.
		l.st.checkFailed.Add(1)
		l.st.refused.Add(1)
		return fillRefused, fmt.Errorf("read lease record: %w", err)
	}
	if resp.Status != mcpool.StatusVA {
		return fillPlain, nil
	}
	cas, perr := strconv.ParseUint(string(resp.Value), 10, 64)
	if perr != nil || cas == 0 {
		return fillPlain, nil
	}
	l.st.foreignFills.Add(1)
	res, err := l.checkedSet(ctx, key, value, flags, exptime, cas)
	l.cleanupRecord(key, cas)
	return res, err
}

// checkedSet stores value only if key's item still has the leased CAS:
// an invalidation since (delete, or md I which bumps the CAS) or the
// lease's expiry makes memcached answer NF or EX, and the fill is refused.
func (l *leaser) checkedSet(ctx context.Context, key string, value []byte, flags uint32, exptime int64, cas uint64) (fillResult, error) {
	resp, err := l.be.MetaSet(ctx, key, value, setOptions(0, flags, exptime, cas))
	if err != nil {
		return 0, err
	}
	if resp.Status == mcpool.StatusHD {
		l.st.fills.Add(1)
		return fillStored, nil
	}
	l.st.refused.Add(1)
	return fillRefused, nil
}

// cleanupRecord removes the lease record written to memcached for a
// lease that has been used, if it still names that lease. It runs in the
// background: the client has its answer.
func (l *leaser) cleanupRecord(key string, cas uint64) {
	if l.cfg.ForeignSet != ForeignCheck {
		return
	}
	l.mu.Lock()
	if l.stopped {
		l.mu.Unlock()
		return
	}
	l.wg.Add(1)
	l.mu.Unlock()
	go func() {
		defer l.wg.Done()
		ctx := context.Background()
		rk := l.recordKey(key)
		resp, err := l.be.MetaGet(ctx, rk, "v", "c")
		if err != nil || resp.Status != mcpool.StatusVA || string(resp.Value) != strconv.FormatUint(cas, 10) {
			return
		}
		_, _ = l.be.MetaDelete(ctx, rk, mcpool.DeleteOptions{CAS: resp.CAS})
	}()
}

// recordKey is the memcached key of key's lease record. It lives on the
// same server as key, so that a dead server fails only its own keys: the
// name is RecordPrefix+key, or RecordPrefix+"sha256:"+hex when that is
// longer than 250 bytes, followed by "#n" with the smallest n that places
// it there. Every proxy with the same server list computes the same name.
func (l *leaser) recordKey(key string) string {
	base := l.cfg.RecordPrefix + key
	if len(base) > MaxKeyBytes-4 {
		sum := sha256.Sum256([]byte(key))
		base = l.cfg.RecordPrefix + "sha256:" + hex.EncodeToString(sum[:])
	}
	want := l.be.Pick(key)
	for n := 0; n < 1000; n++ {
		rk := base + "#" + strconv.Itoa(n)
		if l.be.Pick(rk) == want {
			return rk
		}
	}
	return base // a ring this lopsided is unlikely; the record still works
}

// setOptions builds an ms for a text-protocol store: mode, client flags,
// exptime passed through as the client wrote it, CAS to compare (0: none).
func setOptions(mode byte, flags uint32, exptime int64, cas uint64) mcpool.SetOptions {
	opt := mcpool.SetOptions{Mode: mode, CAS: cas, ClientFlags: flags}
	if exptime != 0 {
		opt.Flags = []string{"T" + strconv.FormatInt(exptime, 10)}
	}
	return opt
}

// errIsClient reports whether err is the client's fault (a key or request
// the pool refused) rather than the backend's.
func errIsClient(err error) bool {
	return errors.Is(err, mcpool.ErrBadKey) || errors.Is(err, mcpool.ErrBadRequest)
}
