package lease

import (
	"sync/atomic"
	"time"
)

// Stats are a Server's figures. Counters only grow; Conns is current.
type Stats struct {
	Conns        int64  // client connections open now
	TotalConns   uint64 // client connections accepted
	RefusedConns uint64 // connections refused beyond Config.MaxConns

	CmdGet    uint64 // keys read by get, gets, gat, gats
	CmdSet    uint64 // storage commands (set, add, replace, append, prepend, cas)
	CmdTouch  uint64 // touch, gat and gats keys
	CmdDelete uint64
	CmdArith  uint64 // incr, decr
	CmdFlush  uint64
	CmdMeta   uint64 // meta commands passed through
	GetHits   uint64
	GetMisses uint64

	LeaseWins         uint64 // leases handed to clients (they fill)
	LeaseWaits        uint64 // reads that waited for another client's fill (or for a read of the key in flight)
	LeaseJoins        uint64 // of those, reads that joined a read, wait or lease of the key under way on this proxy, sending nothing
	LeaseWaitTimeouts uint64 // waits that ended with a miss
	LeasePolls        uint64 // polls made for waiters
	LeaseReleases     uint64 // leases handed back unfilled
	LeaseTakeovers    uint64 // leases of other clients taken over after Lease.TTL unfilled
	StaleServes       uint64 // stale values served during a refill
	Fills             uint64 // fills stored under a lease
	ForeignFills      uint64 // of those tried, fills checked against another proxy's lease record
	RefusedFills      uint64 // fills refused: invalidated, expired, or not checkable
	CheckFailures     uint64 // lease record lookups that failed (fill refused)
	BrokenLeases      uint64 // leases won while an earlier lease of the key was still outstanding (its record marked broken)
	RefusedBroken     uint64 // of the refused fills, sets refused because the key's record was broken
	RefusedWaited     uint64 // of the refused fills, sets refused at once because their client got a miss at the end of a wait for another client's fill
	GroupedSets       uint64 // sets not tied to a lease answered with another set of their key that was under way, without a request of their own

	ProtocolErrors uint64 // bad command lines
	BackendErrors  uint64 // pool requests that failed
	WriteTimeouts  uint64 // connections closed because their client did not read its replies within Config.WriteTimeout
}

// counters are the live figures behind Stats.
type counters struct {
	conns                                                            atomic.Int64
	totalConns, refusedConns                                         atomic.Uint64
	cmdGet, cmdSet, cmdTouch, cmdDelete, cmdArith, cmdFlush, cmdMeta atomic.Uint64
	hits, misses                                                     atomic.Uint64
	wins, waits, joins, waitTimeouts, polls, releases, staleServes   atomic.Uint64
	fills, foreignFills, refused, checkFailed                        atomic.Uint64
	broken, refusedBroken, refusedWaited, groupedSets, takeovers     atomic.Uint64
	protocolErrors, backendErrors, writeTimeouts                     atomic.Uint64

	// waitBuckets[i] counts waits of at most waitBounds[i]; the last one
	// counts the rest. waitNanos sums them all.
	waitBuckets [len(waitBounds) + 1]atomic.Uint64
	waitNanos   atomic.Int64
}

// waitBounds are the upper bounds of the wait histogram's buckets.
var waitBounds = [...]time.Duration{
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond, 10 * time.Millisecond,
	25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond, 250 * time.Millisecond,
	500 * time.Millisecond, time.Second, 2500 * time.Millisecond, 5 * time.Second,
}

func newCounters() *counters { return &counters{} }

func (c *counters) observeWait(d time.Duration) {
	i := 0
	for i < len(waitBounds) && d > waitBounds[i] {
		i++
	}
	c.waitBuckets[i].Add(1)
	c.waitNanos.Add(int64(d))
}

func (c *counters) snapshot() Stats {
	return Stats{
		Conns:             c.conns.Load(),
		TotalConns:        c.totalConns.Load(),
		RefusedConns:      c.refusedConns.Load(),
		CmdGet:            c.cmdGet.Load(),
		CmdSet:            c.cmdSet.Load(),
		CmdTouch:          c.cmdTouch.Load(),
		CmdDelete:         c.cmdDelete.Load(),
		CmdArith:          c.cmdArith.Load(),
		CmdFlush:          c.cmdFlush.Load(),
		CmdMeta:           c.cmdMeta.Load(),
		GetHits:           c.hits.Load(),
		GetMisses:         c.misses.Load(),
		LeaseWins:         c.wins.Load(),
		LeaseWaits:        c.waits.Load(),
		LeaseJoins:        c.joins.Load(),
		LeaseWaitTimeouts: c.waitTimeouts.Load(),
		LeasePolls:        c.polls.Load(),
		LeaseReleases:     c.releases.Load(),
		LeaseTakeovers:    c.takeovers.Load(),
		StaleServes:       c.staleServes.Load(),
		Fills:             c.fills.Load(),
		ForeignFills:      c.foreignFills.Load(),
		RefusedFills:      c.refused.Load(),
		CheckFailures:     c.checkFailed.Load(),
		BrokenLeases:      c.broken.Load(),
		RefusedBroken:     c.refusedBroken.Load(),
		RefusedWaited:     c.refusedWaited.Load(),
		GroupedSets:       c.groupedSets.Load(),
		ProtocolErrors:    c.protocolErrors.Load(),
		BackendErrors:     c.backendErrors.Load(),
		WriteTimeouts:     c.writeTimeouts.Load(),
	}
}

// statLines returns the "stats" answer: name and value pairs in order.
func (s Stats) statLines() [][2]string {
	u := func(v uint64) string { return formatUint(v) }
	return [][2]string{
		{"curr_connections", formatInt(s.Conns)},
		{"total_connections", u(s.TotalConns)},
		{"rejected_connections", u(s.RefusedConns)},
		{"cmd_get", u(s.CmdGet)},
		{"cmd_set", u(s.CmdSet)},
		{"cmd_touch", u(s.CmdTouch)},
		{"cmd_delete", u(s.CmdDelete)},
		{"cmd_arith", u(s.CmdArith)},
		{"cmd_flush", u(s.CmdFlush)},
		{"cmd_meta", u(s.CmdMeta)},
		{"get_hits", u(s.GetHits)},
		{"get_misses", u(s.GetMisses)},
		{"lease_wins", u(s.LeaseWins)},
		{"lease_waits", u(s.LeaseWaits)},
		{"lease_joins", u(s.LeaseJoins)},
		{"lease_wait_timeouts", u(s.LeaseWaitTimeouts)},
		{"lease_polls", u(s.LeasePolls)},
		{"lease_releases", u(s.LeaseReleases)},
		{"lease_takeovers", u(s.LeaseTakeovers)},
		{"lease_stale_serves", u(s.StaleServes)},
		{"lease_fills", u(s.Fills)},
		{"lease_foreign_fills", u(s.ForeignFills)},
		{"lease_refused_fills", u(s.RefusedFills)},
		{"lease_check_failures", u(s.CheckFailures)},
		{"lease_broken", u(s.BrokenLeases)},
		{"lease_refused_broken", u(s.RefusedBroken)},
		{"lease_refused_waited", u(s.RefusedWaited)},
		{"lease_grouped_sets", u(s.GroupedSets)},
		{"protocol_errors", u(s.ProtocolErrors)},
		{"backend_errors", u(s.BackendErrors)},
		{"write_timeouts", u(s.WriteTimeouts)},
	}
}
