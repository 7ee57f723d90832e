package lease

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"hash/maphash"
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
	// lease is the CAS of the lease this read won for its client (a
	// miss the client is to fill); 0: none.
	lease uint64
	// unrecorded: the lease's record could not be written to memcached.
	unrecorded bool
	// waited: a miss after a wait for another client's fill or read of
	// the key: Lease.Wait ran out, the read it joined failed, or the
	// poller gave up. The client's set that follows is not a fill (see
	// boundLease.waited).
	waited bool
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
	err   error // gotMiss: the read that the waiter joined failed
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

	// Lock order: mu before a shard's mu; never the other way.
	mu sync.Mutex // guards records, queue, qhead; wg.Add once stopped
	// records maps a key to the lease handed out for it.
	records map[string]record
	// queue lists records in the order they were made, which is their
	// expiry order; entries whose record is gone are skipped.
	queue []queued
	qhead int
	// stopped is set (under mu) when close begins.
	stopped atomic.Bool
	// epoch counts the flush_all this proxy forwarded: a connection's
	// lease from an earlier epoch is forgotten.
	epoch atomic.Uint64

	// shards hold the flights: per key, the reads, waits and leases under
	// way on this proxy (see flights.go).
	shards [nShards]shard
	seed   maphash.Seed

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
		seed:    maphash.MakeSeed(),
		stop:    make(chan struct{}),
	}
	for i := range l.shards {
		l.shards[i].flights = make(map[string]*flight)
	}
	if cfg.TTL > 0 {
		// The empty item of a lease lives Lease.Memory, so that a slow
		// fill finds it unless the key was invalidated; the lease itself
		// ends after Lease.TTL, when a reader takes it over (see
		// overdue). t returns the item's remaining TTL for that.
		l.nTTL = "N" + strconv.FormatInt(cfg.memorySeconds(), 10)
		l.getFlags = []string{"v", "f", "c", "t", l.nTTL}
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
		l.stopped.Store(true)
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
	f, w := l.begin(key)
	if w != nil {
		return l.wait(ctx, key, f, w, l.now())
	}
	// A wait after the read, if it finds another client's lease, counts
	// from then (a zero start): a hit reads no clock.
	resp, err := l.be.MetaGet(ctx, key, l.getFlags...)
	return l.result(ctx, key, f, &resp, err, time.Time{})
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
//
// Before the reads go out, perKey bytes per key sent are reserved from
// bud, as the values read are allocated as they arrive; once they have
// come, only their size stays reserved (reserved; the caller releases it
// once it has written them).
func (l *leaser) getMulti(ctx context.Context, keys []string, out []getResult, errs []error, bud *budget, perKey int64) (reserved int64, ok bool) {
	mg, ok := l.be.(multiGetter)
	if !ok {
		return 0, false
	}
	first := make(map[string]int, len(keys))
	type joined struct {
		f *flight
		w *waiter
	}
	var waits map[int]joined
	send := make([]string, 0, len(keys))
	idx := make([]int, 0, len(keys))     // position in keys of each sent key
	fls := make([]*flight, 0, len(keys)) // the flight each sent key opened
	start := l.now()
	for i, k := range keys {
		if _, dup := first[k]; dup {
			continue
		}
		first[k] = i
		var f *flight
		if l.enabled() {
			var w *waiter
			if f, w = l.begin(k); w != nil {
				if waits == nil {
					waits = make(map[int]joined)
				}
				waits[i] = joined{f, w}
				continue
			}
		}
		send = append(send, k)
		idx = append(idx, i)
		fls = append(fls, f)
	}
	flags := plainGetFlags
	if l.enabled() {
		flags = l.getFlags
	}
	if len(send) > 0 && bud != nil {
		reserved = int64(len(send)) * perKey
		bud.acquire(reserved)
	}
	resps, rerrs := mg.MetaGetMulti(ctx, send, flags...)
	if reserved > 0 {
		// Keep only what the values take, while they are written out.
		var got int64
		for j := range resps {
			got += int64(len(resps[j].Value))
		}
		if got < reserved {
			bud.release(reserved - got)
			reserved = got
		}
	}
	for j, i := range idx {
		if l.enabled() {
			out[i], errs[i] = l.result(ctx, keys[i], fls[j], &resps[j], rerrs[j], start)
		} else {
			out[i], errs[i] = l.plainResult(ctx, keys[i], &resps[j], rerrs[j])
		}
	}
	for i, k := range keys {
		if j, ok := waits[i]; ok {
			out[i], errs[i] = l.wait(ctx, k, j.f, j.w, start)
		} else if f := first[k]; f != i {
			out[i], errs[i] = out[f], errs[f]
		}
	}
	return reserved, true
}

// result is what a client gets for key given the response to the read
// that may take a lease (mg v f c N<ttl>): a hit, a miss that won the
// lease (the client is to fill), a stale value, or the winner's value
// after a wait. f is the flight the read opened (nil: none); the readers
// that joined it get the same value, or wait with this one.
func (l *leaser) result(ctx context.Context, key string, f *flight, resp *mcpool.Response, err error, start time.Time) (getResult, error) {
	if err != nil {
		if f != nil {
			l.settleRead(key, f, outcome{kind: gotMiss, err: err})
		}
		return getResult{}, err
	}
	if resp.Status != mcpool.StatusVA {
		// EN despite N: memcached could not allocate the empty item.
		if f != nil {
			l.settleRead(key, f, outcome{kind: gotMiss})
		}
		return getResult{}, nil
	}
	serveStale := resp.Stale && l.cfg.Stale && !isStub(resp)
	switch {
	case resp.Win:
		if f == nil {
			ok := l.won(ctx, key, resp, nil)
			return getResult{lease: resp.CAS, unrecorded: !ok}, nil
		}
		if serveStale {
			// The readers that joined get the stale value at once, as
			// those that see Z X do.
			ok := l.won(ctx, key, resp, nil)
			l.settle(key, f, outcome{kind: gotValue, item: itemOf(resp), stale: true})
			return getResult{lease: resp.CAS, unrecorded: !ok}, nil
		}
		ok := l.won(ctx, key, resp, f)
		l.leasedRead(key, f)
		return getResult{lease: resp.CAS, unrecorded: !ok}, nil
	case serveStale:
		l.st.staleServes.Add(1)
		it := itemOf(resp)
		if f != nil {
			l.settleRead(key, f, outcome{kind: gotValue, item: it, stale: true})
		}
		return getResult{found: true, item: it, stale: true}, nil
	case l.overdue(resp):
		// Another client's lease ran past Lease.TTL unfilled: take it
		// over, and read again (this reader or another wins a new one).
		l.takeOver(ctx, key, resp.CAS)
		again, err := l.be.MetaGet(ctx, key, l.getFlags...)
		if err != nil || again.Status != mcpool.StatusVA || !l.overdue(&again) {
			return l.result(ctx, key, f, &again, err, start)
		}
		// The take-over failed: wait as for any lease, without looping.
	case resp.Stale, resp.Claimed && isStub(resp):
		// Another client holds the lease: wait for its value.
	default:
		it := itemOf(resp)
		if f != nil {
			l.settleRead(key, f, outcome{kind: gotValue, item: it})
		}
		return getResult{found: true, item: it}, nil
	}
	if f == nil {
		// Joining is off: no wait (Wait 0), or the proxy is closing.
		if l.cfg.Wait <= 0 {
			l.st.waitTimeouts.Add(1)
		}
		return getResult{}, nil
	}
	return l.wait(ctx, key, f, l.await(key, f), start)
}

var plainGetFlags = []string{"v", "f", "c"}

// overdue reports whether resp is the empty item of another client's
// lease (Z) handed out more than Lease.TTL ago: it was created with
// Lease.Memory as TTL (mg N), and less than Memory - TTL is left. A
// stale one (marked by the purger, whose TTL it then has) is not: its
// lease is handed back by the proxy that gave it (see sweeper).
func (l *leaser) overdue(resp *mcpool.Response) bool {
	return resp.Claimed && !resp.Win && !resp.Stale && isStub(resp) &&
		resp.TTL >= 0 && l.cfg.memorySeconds()-resp.TTL >= l.cfg.ttlSeconds()
}

// takeOver ends an overdue lease on key's empty item cas: it marks the
// item stale (md I C<cas>), which bumps its CAS, so that the lease's late
// fill is refused, and memcached gives W to the next reader.
func (l *leaser) takeOver(ctx context.Context, key string, cas uint64) {
	l.st.takeovers.Add(1)
	_, err := l.be.MetaDelete(ctx, key, mcpool.DeleteOptions{Invalidate: true, CAS: cas})
	if err != nil {
		l.st.backendErrors.Add(1)
		l.log.Debug("take over lease", zap.String("key", key), zap.Error(err))
	}
}

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

// won records the lease memcached just gave (W) so that the fill can be
// checked against it, on any connection of this proxy and, through the
// record written to memcached, on other proxies. With f, the lease is
// also marked on key's flight f, so that the key's readers wait for its
// fill without asking memcached; the mark goes with the record.
//
// It reports whether the lease is recorded as its fill will need: false
// when the record in memcached (ForeignCheck) could not be written.
func (l *leaser) won(ctx context.Context, key string, resp *mcpool.Response, f *flight) (recorded bool) {
	l.st.wins.Add(1)
	now := l.now()
	l.mu.Lock()
	if old, ok := l.records[key]; ok {
		l.unmarkLeased(key, old.cas)
	}
	l.records[key] = record{cas: resp.CAS, stale: resp.Stale, expires: now.Add(l.cfg.TTL)}
	l.queue = append(l.queue, queued{key: key, cas: resp.CAS})
	if f != nil {
		l.markLeased(key, f, resp.CAS)
	}
	for len(l.records) > l.cfg.MaxRecords || len(l.queue)-l.qhead > 2*l.cfg.MaxRecords {
		l.popLocked()
	}
	l.mu.Unlock()
	if l.cfg.ForeignSet == ForeignCheck {
		return l.writeRecord(ctx, key, resp.CAS)
	}
	return true
}

// popLocked drops the oldest queue entry and its record if it is still
// the same lease.
func (l *leaser) popLocked() {
	q := l.queue[l.qhead]
	l.queue[l.qhead] = queued{}
	l.qhead++
	if r, ok := l.records[q.key]; ok && r.cas == q.cas {
		delete(l.records, q.key)
		l.unmarkLeased(q.key, q.cas)
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
		l.unmarkLeased(key, r.cas)
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

// checkedSet stores value only if key's item still has the leased CAS:
// an invalidation since (delete, or md I which bumps the CAS) or the
// lease's expiry makes memcached answer NF or EX, and the fill is refused.
func (l *leaser) checkedSet(ctx context.Context, key string, value []byte, flags uint32, exptime int64, cas uint64) (fillResult, error) {
	res, err := l.trySet(ctx, key, value, flags, exptime, cas)
	if err == nil && res == fillRefused {
		l.st.refused.Add(1)
	}
	return res, err
}

// trySet is checkedSet without counting a refusal.
func (l *leaser) trySet(ctx context.Context, key string, value []byte, flags uint32, exptime int64, cas uint64) (fillResult, error) {
	opt := setOptions(0, flags, exptime, cas)
	opt.ReturnCAS = true
	resp, err := l.be.MetaSet(ctx, key, value, opt)
	if err != nil {
		return 0, err
	}
	if resp.Status == mcpool.StatusHD {
		l.st.fills.Add(1)
		l.filled(key, item{value: value, flags: flags, cas: resp.CAS})
		return fillStored, nil
	}
	return fillRefused, nil
}

// record returns the memcached key of key's lease record,
// RecordPrefix+key (or RecordPrefix+"sha256:"+hex when that is longer
// than 250 bytes), and the server it is stored on: key's own (the On
// requests), not where its name would hash, so that a dead server fails
// only its own keys. Every proxy routes it the same way. (Finding a name
// that hashes there took N hashes for N servers, per set.)
func (l *leaser) record(key string) (name string, server int) {
	name = l.cfg.RecordPrefix + key
	if len(name) > MaxKeyBytes {
		sum := sha256.Sum256([]byte(key))
		name = l.cfg.RecordPrefix + "sha256:" + hex.EncodeToString(sum[:])
	}
	return name, l.be.Pick(key)
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
