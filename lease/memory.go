package lease

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/pgcache/pgcache/mcpool"
)

// This file is the proxy's memory of leases, which lets it refuse a fill
// that began before an invalidation however late the fill arrives
// (within Lease.Memory), on any proxy. See "Late fills" in the package
// documentation.

// leaseRecord is the value of a lease record in memcached (RecordPrefix
// + key, on the key's server): the last lease handed out for the key,
// when, and whether an earlier lease of the key was superseded before
// its fill came (broken), in which case a set that cannot be tied to a
// lease might be that earlier fill.
type leaseRecord struct {
	cas uint64 // the lease: the CAS of the item memcached gave W for
	won int64  // Unix seconds when it was handed out
	// brokenUntil (Unix seconds; 0: not broken): until then, a set not
	// tied to a lease by its connection is refused.
	brokenUntil int64
	// consumed: the lease's fill came on the connection that got the
	// lease (stored or refused).
	consumed bool
}

// appendRecord encodes r as "<cas> <won> <brokenUntil> <0|1>".
func (r leaseRecord) append(b []byte) []byte {
	b = strconv.AppendUint(b, r.cas, 10)
	b = append(b, ' ')
	b = strconv.AppendInt(b, r.won, 10)
	b = append(b, ' ')
	b = strconv.AppendInt(b, r.brokenUntil, 10)
	if r.consumed {
		return append(b, " 1"...)
	}
	return append(b, " 0"...)
}

// parseRecord decodes a lease record. A bare "<cas>" (written by an older
// proxy) is a lease handed out at now.
func parseRecord(b []byte, now int64) (leaseRecord, bool) {
	var f, buf [4][]byte
	n := 0
	for _, t := range tokenize(b, buf[:0]) {
		if n == len(f) {
			return leaseRecord{}, false
		}
		f[n] = t
		n++
	}
	var r leaseRecord
	var ok bool
	switch n {
	case 1:
		if r.cas, ok = parseUint(f[0], 64); !ok || r.cas == 0 {
			return leaseRecord{}, false
		}
		r.won = now
		return r, true
	case 4:
	default:
		return leaseRecord{}, false
	}
	if r.cas, ok = parseUint(f[0], 64); !ok || r.cas == 0 {
		return leaseRecord{}, false
	}
	won, ok1 := parseUint(f[1], 63)
	until, ok2 := parseUint(f[2], 63)
	if !ok1 || !ok2 || (string(f[3]) != "0" && string(f[3]) != "1") {
		return leaseRecord{}, false
	}
	r.won, r.brokenUntil, r.consumed = int64(won), int64(until), string(f[3]) == "1"
	return r, true
}

// outstanding reports whether r's lease may still be filled: not
// consumed, and handed out less than mem seconds before now.
func (r leaseRecord) outstanding(now, mem int64) bool {
	return !r.consumed && r.won+mem > now
}

// writeRecord writes the record of the lease cas, just won for key, to
// memcached (ForeignCheck). If the key's previous lease is still
// outstanding, its fill may yet come and cannot be told from the new
// lease's fill on another connection: the record is marked broken until
// that lease's memory ends. It is first an add, which stores the record
// when the key has none (the common case: one round trip, which the
// lease's winner waits for before it gets its miss); when there is one,
// a read and a compare-and-swap, retried when another proxy wrote in
// between. It reports whether the record was written.
func (l *leaser) writeRecord(ctx context.Context, key string, cas uint64) bool {
	rk, at := l.record(key)
	now, mem := l.now().Unix(), l.cfg.memorySeconds()
	var buf [64]byte
	resp, err := l.be.MetaSetOn(ctx, at, rk, leaseRecord{cas: cas, won: now}.append(buf[:0]),
		mcpool.SetOptions{Mode: 'E', TTL: time.Duration(mem) * time.Second})
	switch {
	case err != nil:
		l.recordFailed("write lease record", key, err)
		return false
	case resp.Status == mcpool.StatusHD:
		return true
	}
	// NS: the key has a record; read it, and replace it.
	for range 4 {
		resp, err := l.be.MetaGetOn(ctx, at, rk, "v", "c")
		if err != nil {
			l.recordFailed("read lease record", key, err)
			return false
		}
		rec := leaseRecord{cas: cas, won: now}
		opt := mcpool.SetOptions{}
		if resp.Status == mcpool.StatusVA {
			opt.CAS = resp.CAS
			old, ok := parseRecord(resp.Value, now)
			switch {
			case !ok:
				rec.brokenUntil = now + mem // unreadable: assume the worst
			default:
				if old.brokenUntil > now {
					rec.brokenUntil = old.brokenUntil
				}
				if old.cas != cas && old.outstanding(now, mem) {
					rec.brokenUntil = max(rec.brokenUntil, old.won+mem)
				}
			}
		} else {
			opt.Mode = 'E' // add: another proxy may be writing one
		}
		opt.TTL = time.Duration(max(mem, rec.brokenUntil-now)) * time.Second
		resp, err = l.be.MetaSetOn(ctx, at, rk, rec.append(buf[:0]), opt)
		if err != nil {
			l.recordFailed("write lease record", key, err)
			return false
		}
		if resp.Status == mcpool.StatusHD {
			if rec.brokenUntil > now {
				l.st.broken.Add(1)
			}
			return true
		}
		// EX, NS, NF: another proxy wrote the record meanwhile.
	}
	l.st.backendErrors.Add(1)
	l.log.Debug("write lease record: lost every compare-and-swap", zap.String("key", key))
	return false
}

func (l *leaser) recordFailed(what, key string, err error) {
	l.st.backendErrors.Add(1)
	l.log.Debug(what, zap.String("key", key), zap.Error(err))
}

// readRecord reads key's lease record: ok false when there is none (or it
// is unreadable, which counts as none: it was written by no proxy).
func (l *leaser) readRecord(ctx context.Context, key string) (leaseRecord, bool, error) {
	rk, at := l.record(key)
	resp, err := l.be.MetaGetOn(ctx, at, rk, "v")
	if err != nil {
		return leaseRecord{}, false, err
	}
	if resp.Status != mcpool.StatusVA {
		return leaseRecord{}, false, nil
	}
	rec, ok := parseRecord(resp.Value, l.now().Unix())
	return rec, ok, nil
}

// consumeRecord marks the lease cas of key as consumed in its record,
// once its fill came on the connection that got it: the next lease of
// the key then does not break. A record that is not broken is removed.
// It runs in the background: the client has its answer.
func (l *leaser) consumeRecord(key string, cas uint64) {
	if l.cfg.ForeignSet != ForeignCheck {
		return
	}
	l.mu.Lock()
	if l.stopped.Load() {
		l.mu.Unlock()
		return
	}
	l.wg.Add(1)
	l.mu.Unlock()
	go func() {
		defer l.wg.Done()
		ctx := context.Background()
		rk, at := l.record(key)
		resp, err := l.be.MetaGetOn(ctx, at, rk, "v", "c")
		if err != nil || resp.Status != mcpool.StatusVA {
			return
		}
		now := l.now().Unix()
		rec, ok := parseRecord(resp.Value, now)
		if !ok || rec.cas != cas || rec.consumed {
			return
		}
		if rec.brokenUntil <= now {
			_, _ = l.be.MetaDeleteOn(ctx, at, rk, mcpool.DeleteOptions{CAS: resp.CAS})
			return
		}
		rec.consumed = true
		var buf [64]byte
		_, _ = l.be.MetaSetOn(ctx, at, rk, rec.append(buf[:0]), mcpool.SetOptions{
			CAS: resp.CAS, TTL: time.Duration(rec.brokenUntil-now) * time.Second})
	}()
}

// boundLease is the lease a connection's client got for a key: its CAS
// (0: none), and whether its record could not be written. Or, with
// waited, no lease: the client's read of the key got a miss because its
// wait for another client's fill ran out (Lease.Wait).
type boundLease struct {
	cas        uint64
	unrecorded bool
	// waited: the client got a miss at the end of its wait for another
	// client's lease or read of the key (Lease.Wait ran out, or the read
	// or poll it waited for failed). Its set of the key within Lease.TTL
	// of that miss is refused at once (see fill).
	waited bool
}

// fill stores value for a set (add: an add) of key if a lease governs
// it. bound is the lease the client's connection got for key.
// It returns fillPlain when no lease is known, and the caller stores as
// usual.
//
// A fill on the connection that got the lease is stored only if the
// item is still the lease's (ms C<cas>), or, when that fails, if the key
// has not been invalidated since (see chained). Any other set of a key
// with an outstanding lease (another connection, another proxy, a
// write-through) is stored only if the key has not been invalidated
// since the lease and no earlier lease of it is still outstanding
// (record not broken): otherwise it may be a fill that began before an
// invalidation, and it is refused.
func (l *leaser) fill(ctx context.Context, key string, bound boundLease, add bool, value []byte, flags uint32, exptime int64) (fillResult, error) {
	if !l.enabled() {
		return fillPlain, nil
	}
	if bound.waited {
		// The client waited for another client's fill, got a miss at the
		// end of its wait (Lease.Wait ran out, or the read or poll it
		// waited for failed), and filled itself: its set is not the
		// lease's fill, which the lease's winner is making (a herd whose
		// fill is slower than Lease.Wait). It is refused here, with no
		// request to memcached: a herd of N such sets would otherwise
		// cost N record reads and stores on the key's server, enough to
		// time out its connection and open its breaker.
		l.st.refused.Add(1)
		l.st.refusedWaited.Add(1)
		return fillRefused, nil
	}
	local, hadLocal := l.take(key)
	if bound.cas != 0 {
		return l.boundFill(ctx, key, bound, add, value, flags, exptime)
	}
	switch l.cfg.ForeignSet {
	case ForeignPlain:
		return fillPlain, nil
	case ForeignRefuse:
		if !hadLocal {
			l.st.refused.Add(1)
			return fillRefused, nil
		}
		return l.chained(ctx, key, local.cas, add, value, flags, exptime)
	}
	// Checked against the lease record, with the sets of the key that
	// arrive meanwhile (setgroups.go).
	return l.groupedFill(ctx, key, hadLocal, local.cas, add, value, flags, exptime)
}

// boundFill stores the fill of the lease that key's client got on this
// connection.
func (l *leaser) boundFill(ctx context.Context, key string, bound boundLease, add bool, value []byte, flags uint32, exptime int64) (fillResult, error) {
	cas := bound.cas
	res, err := l.trySet(ctx, key, value, flags, exptime, cas)
	if err != nil || res == fillStored {
		if err == nil {
			l.consumeRecord(key, cas)
		}
		return res, err
	}
	// The item is no longer the lease's. Without records (ForeignSet
	// other than check) nothing tells why: refused.
	if l.cfg.ForeignSet != ForeignCheck {
		l.st.refused.Add(1)
		return fillRefused, nil
	}
	rec, ok, err := l.readRecord(ctx, key)
	switch {
	case err != nil:
		l.st.checkFailed.Add(1)
		l.st.refused.Add(1)
		return fillRefused, fmt.Errorf("read lease record: %w", err)
	case !ok && bound.unrecorded:
		// It was never written: nothing tells why the item changed.
		l.st.refused.Add(1)
		return fillRefused, nil
	case !ok:
		// The record went with the item: flush_all (through any proxy),
		// or evicted. The set is an ordinary write, as after a flush in
		// memcached.
		return fillPlain, nil
	case rec.cas != cas:
		// A newer lease: this one was invalidated or expired.
		l.st.refused.Add(1)
		return fillRefused, nil
	}
	res, err = l.chained(ctx, key, cas, add, value, flags, exptime)
	if err == nil {
		l.consumeRecord(key, cas)
	}
	return res, err
}

// chained stores value for key if the key has not been invalidated since
// the lease cas was handed out: its item is still the lease's empty item,
// or a value stored over it since (by a set through a proxy), neither
// stale nor deleted. It compares and swaps against the item it read, so
// a change in between refuses it. An add finds a value there and is not
// stored, as in memcached.
func (l *leaser) chained(ctx context.Context, key string, cas uint64, add bool, value []byte, flags uint32, exptime int64) (fillResult, error) {
	resp, err := l.be.MetaGet(ctx, key, "s", "f", "c")
	if err != nil {
		return 0, err
	}
	if resp.Status != mcpool.StatusHD {
		l.st.refused.Add(1) // deleted (or expired, evicted): refused
		return fillRefused, nil
	}
	if resp.Win && resp.Stale {
		// This read took the stale item's refill token: hand it back.
		l.release(ctx, key, resp.CAS, true)
	}
	stub := resp.Size == 0 && resp.ClientFlags == 0 && (resp.Claimed || resp.Win)
	switch {
	case resp.Stale, stub && resp.CAS != cas:
		l.st.refused.Add(1)
		return fillRefused, nil
	case add && !stub:
		return fillRefused, nil // add of a key that holds a value
	}
	return l.checkedSet(ctx, key, value, flags, exptime, resp.CAS)
}

// maxBindings bounds the leases one connection remembers. Beyond it, the
// fill of a lease that was not remembered is checked as one from another
// connection: it may be refused, never wrongly stored.
const maxBindings = 128

// binding is a lease a connection got, when, and the flush epoch it
// belongs to.
type binding struct {
	boundLease
	at    int64 // UnixNano
	epoch uint64
}

// bind remembers that this connection's client got the lease b for key.
func (c *conn) bind(key string, b boundLease) {
	l := c.s.l
	now := l.now().UnixNano()
	if c.leases == nil {
		c.leases = make(map[string]binding)
	}
	if len(c.leases) >= maxBindings {
		mem := int64(l.cfg.memory())
		for k, b := range c.leases {
			if now-b.at >= mem || b.epoch != l.epoch.Load() {
				delete(c.leases, k)
			}
		}
		for k := range c.leases {
			if len(c.leases) < maxBindings {
				break
			}
			delete(c.leases, k)
		}
	}
	c.leases[key] = binding{boundLease: b, at: now, epoch: l.epoch.Load()}
}

// takeBinding removes and returns the lease this connection got for key,
// if it is still remembered: within Lease.Memory and not before a
// flush_all through this proxy.
func (c *conn) takeBinding(key string) boundLease {
	if c.leases == nil {
		return boundLease{}
	}
	b, ok := c.leases[key]
	if !ok {
		return boundLease{}
	}
	delete(c.leases, key)
	l := c.s.l
	keep := l.cfg.memory()
	if b.waited {
		keep = l.cfg.TTL // the lease it waited for is over by then
	}
	if b.epoch != l.epoch.Load() || l.now().UnixNano()-b.at >= int64(keep) {
		return boundLease{}
	}
	return b.boundLease
}

// unbindWaited forgets that this connection's client got a miss after a
// wait for key (boundLease.waited), when a later read of key answered
// otherwise: its set is then an ordinary one again. A lease it got is
// kept.
func (c *conn) unbindWaited(key string) {
	if len(c.leases) == 0 {
		return
	}
	if b, ok := c.leases[key]; ok && b.waited {
		delete(c.leases, key)
	}
}

// flushed forgets every lease this proxy handed out, after a flush_all
// it forwarded: memcached dropped their items and records, and a set
// that follows is an ordinary write, as in memcached.
func (l *leaser) flushed() {
	l.epoch.Add(1)
	l.mu.Lock()
	for k, r := range l.records {
		l.unmarkLeased(k, r.cas)
	}
	clear(l.records)
	clear(l.queue)
	l.queue, l.qhead = l.queue[:0], 0
	l.mu.Unlock()
}
