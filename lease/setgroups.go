package lease

import (
	"context"
	"fmt"

	"github.com/pgcache/pgcache/mcpool"
)

// This file combines the sets of one key that no lease ties to their
// connection and that arrive together (Lease.ForeignSet "check"), so that
// N of them cost the key's server a few requests, not 2N or 3N: a herd
// whose clients pool connections (their set goes out on another
// connection than their get) sends N such sets at once when its fill is
// slower than Lease.Wait. Uncombined, those requests queue on the one
// connection to the key's server past the pool's timeout, and the
// timeouts open the breaker of a healthy server.
//
// The sets of a key form groups. A set that finds no check of its key
// under way runs alone, as before: one read of the lease record, then its
// store. A set that finds one under way joins the next group, which
// starts when the check under way ends: so every request a group sends is
// sent after all its members arrived. A group reads the lease record
// once, and then:
//
//   - record broken, or unreadable: every member is refused (with the
//     error, if any), as each would have been;
//   - an outstanding lease: the key is checked once (chained) and one
//     member's value is compared and swapped against the item read (the
//     last set to arrive, else the last add); the others are answered
//     NOT_STORED once it is answered. Each of them would have compared
//     against the same item, so at most one could have been stored, and
//     the one sent decides whether any is;
//   - no outstanding lease: with two or more plain sets, only the last
//     one's value is stored, and they are all answered as it is, once it
//     is. The others count as stored just before it, overwritten at once:
//     they were all sent before it (concurrent with it), which memcached
//     may order that way too. Adds store one by one, as without groups.
//
// No reply is given before the request that decides it is answered.

// setReq is one member of a group: a set or add of the group's key.
type setReq struct {
	add     bool
	value   []byte
	flags   uint32
	exptime int64
	res     fillResult
	err     error
}

// setGroup is the sets of one key checked together.
type setGroup struct {
	members []*setReq // guarded by the shard's mu until the group runs
	// ready is closed when the group's turn comes: its first member
	// then runs it.
	ready chan struct{}
	// done is closed once every member has its res and err.
	done chan struct{}
}

// keySets is what a key has under way: a check running (a lone set's or
// a group's), and the group forming meanwhile (nil: none). It exists
// while a check runs.
type keySets struct {
	next *setGroup
}

// maxFreeSets bounds a shard's recycled keySets.
const maxFreeSets = 8

// groupedFill checks and stores a set (add: an add) of key not tied to a
// lease, with the sets of key that arrive meanwhile. It returns
// fillPlain when the caller is to store it as an ordinary write.
func (l *leaser) groupedFill(ctx context.Context, key string, hadLocal bool, localCAS uint64, add bool, value []byte, flags uint32, exptime int64) (fillResult, error) {
	sh := l.shardOf(key)
	sh.mu.Lock()
	ks := sh.sets[key]
	if ks == nil {
		// No check of key under way: this set runs alone, as without
		// groups, with nothing allocated.
		if n := len(sh.freeSets); n > 0 {
			ks = sh.freeSets[n-1]
			sh.freeSets = sh.freeSets[:n-1]
		} else {
			ks = new(keySets)
		}
		if sh.sets == nil {
			sh.sets = make(map[string]*keySets)
		}
		sh.sets[key] = ks
		sh.mu.Unlock()
		res, err := l.checkOne(ctx, key, hadLocal, localCAS, add, value, flags, exptime)
		l.nextGroup(sh, key, ks)
		return res, err
	}
	me := &setReq{add: add, value: value, flags: flags, exptime: exptime}
	g := ks.next
	if g == nil {
		g = &setGroup{members: []*setReq{me}, ready: make(chan struct{}), done: make(chan struct{})}
		ks.next = g
		sh.mu.Unlock()
		<-g.ready
		// The group's turn: no member joins it any more.
		sh.mu.Lock()
		members := g.members
		sh.mu.Unlock()
		l.runGroup(ctx, key, members, hadLocal, localCAS)
		l.nextGroup(sh, key, ks)
		close(g.done)
		return me.res, me.err
	}
	g.members = append(g.members, me)
	l.st.groupedSets.Add(1)
	sh.mu.Unlock()
	<-g.done
	return me.res, me.err
}

// nextGroup ends the check of key that ran: the group that formed
// meanwhile, if any, runs next; else key has nothing under way.
func (l *leaser) nextGroup(sh *shard, key string, ks *keySets) {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if g := ks.next; g != nil {
		ks.next = nil
		close(g.ready)
		return
	}
	delete(sh.sets, key)
	if len(sh.freeSets) < maxFreeSets {
		sh.freeSets = append(sh.freeSets, ks)
	}
}

// checkOne checks and stores a lone set (add: an add) of key not tied to
// a lease: it is stored only if the key has no outstanding lease (then
// fillPlain: the caller stores), or if it was not invalidated since.
func (l *leaser) checkOne(ctx context.Context, key string, hadLocal bool, localCAS uint64, add bool, value []byte, flags uint32, exptime int64) (fillResult, error) {
	rec, ok, err := l.readRecord(ctx, key)
	if err != nil {
		// Without the record the set cannot be checked: refusing costs a
		// miss, storing might store a stale value (I2). The client gets
		// the error.
		l.st.checkFailed.Add(1)
		l.st.refused.Add(1)
		return fillRefused, fmt.Errorf("read lease record: %w", err)
	}
	now := l.now().Unix()
	switch {
	case ok && rec.brokenUntil > now:
		l.st.refused.Add(1)
		l.st.refusedBroken.Add(1)
		return fillRefused, nil
	case !ok || !rec.outstanding(now, l.cfg.memorySeconds()):
		return fillPlain, nil
	}
	if !hadLocal || localCAS != rec.cas {
		l.st.foreignFills.Add(1)
	}
	return l.chained(ctx, key, rec.cas, add, value, flags, exptime)
}

// runGroup checks and stores the members of a group (see the file's
// comment), setting each one's res and err. A member left with
// fillPlain stores itself.
func (l *leaser) runGroup(ctx context.Context, key string, members []*setReq, hadLocal bool, localCAS uint64) {
	all := func(res fillResult, err error) {
		for _, m := range members {
			m.res, m.err = res, err
		}
	}
	rec, ok, err := l.readRecord(ctx, key)
	if err != nil {
		// Without the record the sets cannot be checked: refusing costs a
		// miss, storing might store a stale value (I2). The clients get
		// the error.
		l.st.checkFailed.Add(1)
		l.st.refused.Add(uint64(len(members)))
		all(fillRefused, fmt.Errorf("read lease record: %w", err))
		return
	}
	now := l.now().Unix()
	switch {
	case ok && rec.brokenUntil > now:
		l.st.refused.Add(uint64(len(members)))
		l.st.refusedBroken.Add(uint64(len(members)))
		all(fillRefused, nil)
		return
	case !ok || !rec.outstanding(now, l.cfg.memorySeconds()):
		l.plainGroup(ctx, key, members)
		return
	}
	if !hadLocal || localCAS != rec.cas {
		l.st.foreignFills.Add(1)
	}
	pick := chosen(members)
	res, err := l.chained(ctx, key, rec.cas, pick.add, pick.value, pick.flags, pick.exptime)
	for _, m := range members {
		switch {
		case m == pick:
			m.res, m.err = res, err
		case err != nil:
			m.res, m.err = fillRefused, err
		default:
			l.st.refused.Add(1)
			m.res = fillRefused
		}
	}
}

// chosen is the member of a group whose value is sent: the last set, else
// the last add (a set may replace a value, where an add is refused).
func chosen(members []*setReq) *setReq {
	for i := len(members) - 1; i >= 0; i-- {
		if !members[i].add {
			return members[i]
		}
	}
	return members[len(members)-1]
}

// plainGroup stores the members of a group whose key has no outstanding
// lease: with two or more sets, the last one's value for them all; adds
// (and a lone set) are left to store themselves (fillPlain).
func (l *leaser) plainGroup(ctx context.Context, key string, members []*setReq) {
	var last *setReq
	sets := 0
	for _, m := range members {
		m.res = fillPlain
		if !m.add {
			last = m
			sets++
		}
	}
	if sets < 2 {
		return
	}
	resp, err := l.be.MetaSet(ctx, key, last.value, setOptions(0, last.flags, last.exptime, 0))
	res := fillRefused
	if err == nil && resp.Status == mcpool.StatusHD {
		res = fillStored
	}
	for _, m := range members {
		if !m.add {
			m.res, m.err = res, err
		}
	}
}
