// Package lease is a memcached text-protocol server that proxies one
// datacenter's memcached pool and turns a thundering herd into one
// database fill, with memcached's leases. Routing, connections and
// breakers are left to the Backend (an mcpool.Pool); what a key maps to
// in the database is left to the clients.
//
// # Protocol
//
// Any memcached client works unchanged: get, gets, gat, gats (many keys,
// fetched in parallel, answered in request order), set, add, replace,
// append, prepend, cas, delete, incr, decr, touch, version, stats (the
// proxy's own figures), flush_all (forwarded to every server or refused,
// see Config.FlushAll), verbosity and quit, with noreply everywhere. Meta
// commands (mg, ms, md, ma, me, mn) are passed through to the key's
// server unchanged; clients that speak them handle leases themselves.
// Errors are memcached's: ERROR, CLIENT_ERROR, SERVER_ERROR. A bad line
// that leaves the stream in step (a storage line with a known length has
// its data block discarded) does not close the connection. A line with no
// newline within the limit, a stalled data block and a binary-protocol
// client (first byte 0x80) get an error line and are closed.
//
// # Leases
//
// A read sends "mg <key> v f c t N<memory>". memcached creates an empty
// item on a miss and gives W (won) to exactly one reader across all
// proxies; the others see Z. The winner's client gets a miss and is expected to
// fill the key from the database and set it. Readers that see Z wait up
// to Lease.Wait: per key and proxy, one poller reads the key again
// (PollMin, doubling up to PollMax) and hands the value to every waiter,
// so N waiters cost one poll per interval, not N. When the poller finds
// the lease gone (taken over, or invalidated by a delete) it wins a new one
// and hands it to the longest waiter, which fills. A waiter still without
// a value at the end of Lease.Wait gets a miss. A lease older than
// Lease.TTL is taken over (see Late fills).
//
// An item the purger marked stale (md I) is returned with X; memcached
// gives W to one reader, who refills, and Z to the rest. With Lease.Stale
// those get the stale value at once; without it they wait as on a miss.
//
// # One read per key and proxy
//
// A herd of N readers of one key costs a proxy O(1) requests, not N: a
// read of a key for which this proxy already has something under way
// (a flight) sends nothing and joins it, with its own Lease.Wait counted
// from its arrival. A flight is one of:
//
//   - a read in flight: another client's mg for the key whose answer has
//     not come. Those who joined get what it gets: its value on a hit;
//     the stale value at once on X with Lease.Stale, whether the first
//     reader won the refill or saw Z; its error if it failed. On W or Z
//     (and on X without Lease.Stale, or of an empty lease item) they wait
//     for the fill with the poller.
//   - a poller with waiters: they wait with it.
//   - a lease this proxy handed to one of its clients (W) that it has not
//     seen filled: they wait for the fill, and the first of them starts
//     the poller. The mark goes with the lease record (fill, expiry, or
//     MaxRecords); a lease on a stale item whose readers are served stale
//     is not marked, as they need memcached's answer to be served at once.
//
// Flights live in a table of 64 shards, each under its own lock, so a
// hit costs one short lock of its shard before and after its mg. A flight
// ends with one outcome for all its waiters, by closing a channel: the
// hand-off to 10,000 waiters is one close, not 10,000 sends.
//
// Memcached still arbitrates between proxies (W and Z), fills are still
// checked with C<cas> (I2), and a waiter still gets a miss at the end of
// its wait. What a joined reader gets is never older than memcached's
// value at the moment it joined by more than one round trip: a value
// handed to it comes from a read (a client's mg or a poll) answered
// after it joined. Either that read was sent after it joined, so
// memcached answered with a value at least as new as the one it held at
// the join; or the read was already in flight, and then memcached read
// the item between the read's sending and its answer, so at most one
// round trip of that read before the join. A joined reader never gets a
// value remembered from an earlier read: a flight ends when its outcome
// is handed out, and the next read asks memcached again. A lease mark
// only makes readers wait for the poller's reads, which are sent after
// they joined; a fill through another proxy is seen at the first poll.
// A fill stored through this proxy (ms C<cas> answered HD) is handed to
// the key's waiters at once, with the CAS memcached gave it: it was
// memcached's value when the fill was answered, after they joined.
// A write of a key through this proxy (set, delete, incr, ms, ...)
// detaches the key's read or poll in flight once answered, so that a
// client that reads after its write does not join a read sent before it:
// it reads its own writes, as without the proxy.
//
// The proxy records each lease it hands out (key to the CAS of the item
// it won), on the connection whose client got it (at most 128 per
// connection) and in a record in memcached (see below), both for
// Lease.Memory (a minute by default), far longer than Lease.TTL. A set
// or add of that key on that connection is the fill: it is sent as
// "ms <key> <len> C<cas>", so memcached stores it only if the item is
// still the leased one. An invalidation in between (the item deleted,
// or marked stale, which bumps its CAS) makes memcached answer NF or EX,
// and the client gets NOT_STORED: a value read before the invalidation
// cannot be stored after it (invariant I2). The next reader wins a new
// lease.
//
// # Late fills
//
// A fill is refused however late it comes, within Lease.Memory of its
// miss, if its key was invalidated since. The empty item of a lease is
// created with Lease.Memory as its TTL (mg N<memory>), so that a slow
// fill finds it (and is stored) unless an invalidation deleted it or
// marked it stale. The lease itself still lasts Lease.TTL: a reader
// that finds another client's empty item (Z) older than that (mg t: less
// than Memory - TTL left) takes it over: it marks it stale (md I
// C<cas>), which bumps its CAS, and memcached gives W to the next
// reader. The fill of a lease taken over is refused, as after an
// invalidation, so on a key read often a fill slower than Lease.TTL is
// refused and the new winner's stored: set Lease.TTL above the slowest
// fill. A set later than Lease.Memory after its miss is no longer known
// as a fill and is stored as a plain write.
//
// A set (or add) on a connection whose client got a miss at the end of a
// wait for another client's lease or read of the key (Lease.Wait ran
// out, or the read or poll it waited for failed), within Lease.TTL of
// that miss, is refused at once (NOT_STORED, counted in
// lease_refused_waited_total), with no request to memcached: it is not
// the lease's fill, which the winner is making. A herd whose fill is
// slower than Lease.Wait thus costs memcached nothing more when its
// clients, all missing, set what they read. A later read of the key on
// that connection that answers otherwise (a hit, a lease) ends this.
//
// A set that the proxy cannot tie to a lease by its connection (another
// connection: clients pool them; another proxy; a write-through of a
// fresh value) is checked against the key's lease record in memcached
// (Lease.ForeignSet "check", the default). With no record, or a record
// whose lease is older than Lease.Memory, it is a plain write. With an
// outstanding lease, it is stored only if the key was not invalidated
// since the lease: its item is still the lease's empty item, or a value
// that a set through a proxy stored over it since, neither stale nor
// gone; it is then a compare-and-swap against that item. When a lease
// is won while the key's previous lease is still outstanding (it was
// invalidated or expired before its fill came), the record is marked
// broken until that lease's memory ends: the earlier fill may yet come,
// and nothing tells it from the new lease's fill on another connection,
// so every set not tied to a lease by its connection is refused
// (NOT_STORED, counted in lease_refused_broken_total) until then. Fills
// on the connection that got the lease are exact and unaffected.
//
// Such sets of one key that arrive together are checked in groups (see
// setgroups.go): a set that finds another set of its key being checked
// joins the next group, which starts when that check ends, so that a
// group's requests are all sent after its members arrived. A group reads
// the record once. With an outstanding lease it compares and swaps one
// member's value (the last set, else the last add) against the item it
// read, and answers the others NOT_STORED once that is answered: each
// would have compared against the same item, so at most one could be
// stored. Without one, two or more plain sets are stored as one, the
// last one's value, and all answered as it is: they were concurrent
// with it. So N sets of one key cost O(1) requests per round trip, not
// 2N or 3N (counted in lease_grouped_sets_total): a herd of clients that
// pool connections cannot queue its server's connection past the pool's
// timeout and open the breaker of a healthy server.
//
// flush_all (forwarded) drops memcached's lease items and records, and
// the proxy forgets the leases it handed out: a set after it is an
// ordinary write, as in memcached. A fill whose lease was flushed through
// another proxy finds its record gone and is stored as a plain write.
//
// # A fill at another proxy
//
// A client may get the lease through proxy A and send its set to proxy B.
// B has no record of the lease, and cannot tell a fill from a plain
// write. Lease.ForeignSet decides:
//
//   - "check" (default): on a win, A also writes the lease record to
//     memcached, under RecordPrefix+key, on the key's own server (not
//     where that name would hash: a dead server fails only its keys):
//     "<cas> <won> <broken until> <consumed>", for Lease.Memory. B
//     checks a set against it as above. If the record cannot be read
//     (its server is down), B refuses the set (NOT_STORED): a refused
//     fill costs one miss, a wrongly stored one serves stale data until
//     its TTL. The fill on the winner's connection marks the record
//     consumed (removes it, unless broken). Cost: a read and a
//     compare-and-swap of the record per lease won, one extra read per
//     set without a lease on its connection, and about 170 bytes of
//     memcached memory per key leased within Lease.Memory.
//   - "plain": B stores as usual. Fast, but such a fill is not checked:
//     it can store a value read before an invalidation (breaks I2 for
//     clients that spread one get/set pair over proxies).
//   - "refuse": B answers NOT_STORED to every set and add without a
//     lease on its connection or a local lease record. Safe, but plain
//     writes (write-through, counters) are refused too; only for
//     deployments where every set is a fill and each client sticks to
//     one proxy.
//
// Under "check", the record read of a set not tied to a lease is a round
// trip before the set's own. It cannot be skipped or sent together with
// the store. The record and the item are two keys, and memcached has no
// store conditional on another key. Neither what the proxy saw earlier nor the item itself can stand in for a read of the
// record made after the set arrived: a lease's record is written after
// memcached gave W, so a proxy that found no record may have read it
// before a lease won earlier had its record written; and a record marked
// broken refuses a set that a compare-and-swap against an unchanged item
// would store (the broken lease's late fill). A store sent with the read,
// guarded by the item's CAS, would thus store a fill that the check
// refuses (I2). The check's cost is that round trip: on one core it costs
// a set one more turn of the proxy's scheduler (the answer to a request is
// taken when the run queue empties), 4-7% of memcaslap's 9:1 throughput
// against "plain" on this project's 2-core host (BENCHMARKS.md).
//
// Commands that act on an existing item only (delete, replace, append,
// prepend, incr, decr, touch) first read the key's state (mg s f c): the
// empty item of an outstanding lease is absent to them (NOT_FOUND,
// NOT_STORED), though delete still removes it, which refuses the lease's
// fill. That costs them one more round trip while leases are on.
//
// Keys are 1 to 250 bytes and may hold any byte but space, CR, LF and
// NUL: memcached 1.6.18 stores keys with other control bytes (memcaslap's
// start with 0x10), though protocol.txt says keys hold none, and so does
// nutcracker; refusing them would break such clients. mcpool sends them in
// base64 with the meta protocol's b flag (as written when too long for
// base64, which memcached also accepts) and places them by their raw
// bytes, where nutcracker, libmemcached and the purger put them too.
//
// # Memory
//
// What a client sends cannot make the proxy's memory grow without bound:
//
//   - A retrieval's values are written to the client as they come. A
//     multi-key get is read in batches of MultiGetParallel keys, each
//     written out before the next is read; before a batch goes out,
//     MaxValueBytes per key read is reserved from ReplyBytes, shared by
//     all connections, and released once the batch is written. A
//     retrieval that finds the budget spent waits for it. One connection
//     holds at most MultiGetParallel x MaxValueBytes of values.
//   - A data block's buffer starts at 16 KiB and doubles as its bytes
//     arrive: a client that announces a large value and sends nothing
//     costs 16 KiB, not the announced length.
//   - A client that does not read its replies is closed when a write to
//     it blocks for WriteTimeout (counted in WriteTimeouts).
//
// Go's own memory limit (GOMEMLIMIT) is the command's business.
//
// Known limits: a real value of 0 bytes with client flags 0 that another
// client is refreshing through mg R looks like an empty lease item, so
// readers wait for it instead of taking it. A lease on a stale item that
// nobody fills is handed back when its record expires (md I C<cas>); if
// the proxy that handed it out dies first, memcached keeps the token
// until the item's TTL, so the purger should mark stale with a TTL (md I
// T<ttl>). touch, gat and gats re-store the value with a CAS compare
// rather than sending mg T, which would also extend an empty lease item.
package lease
