package wal

import (
	"sync"
	"sync/atomic"

	"github.com/jackc/pglogrepl"
)

// Ack is one part of a committed transaction's acknowledgement. Run hands
// one to Handler.Commit; whoever holds it calls Done once the part of the
// transaction it took is durable elsewhere (its keys acked by JetStream,
// its counter deltas committed). A consumer that hands the transaction on
// to several others gives each its own part with Split before it lets go
// of its own.
//
// The slot's confirmed position moves to the end of a transaction only
// when every part of it, and of every transaction before it, is done: the
// Stream is the only code that confirms (invariant I1). Done may be
// called from any goroutine, and again (a second call of one part is
// ignored). A part that is never done holds the slot back, so every path
// of a consumer must end in Done, or in the process stopping.
type Ack struct {
	rec  *ackRecord
	done atomic.Bool
}

// Split returns a new part of the same transaction. Call it while this
// part is not done yet.
func (a *Ack) Split() *Ack {
	if a == nil || a.rec == nil {
		return &Ack{}
	}
	a.rec.parts.Add(1)
	return &Ack{rec: a.rec}
}

// Done resolves this part.
func (a *Ack) Done() {
	if a == nil || a.rec == nil || !a.done.CompareAndSwap(false, true) {
		return
	}
	if a.rec.parts.Add(-1) == 0 {
		a.rec.t.resolve(a.rec)
	}
}

// NoAck returns a part that belongs to no transaction: Done and Split do
// nothing with it. For tests, and for callers that feed consumers outside
// a Stream.
func NoAck() *Ack { return &Ack{} }

// ackRecord is one delivered transaction waiting for its parts.
type ackRecord struct {
	t     *ackTracker
	end   pglogrepl.LSN
	parts atomic.Int32
	// resolved and abandoned are guarded by t.mu.
	resolved  bool
	abandoned bool // its Commit failed: it is delivered again, and this record confirms nothing
}

// ackTracker keeps the delivered transactions in WAL order and confirms
// the end of the oldest ones whose every part is done.
type ackTracker struct {
	confirm func(pglogrepl.LSN)

	mu    sync.Mutex // guards queue and the records' resolved and abandoned
	queue []*ackRecord
	head  int
}

func newAckTracker(confirm func(pglogrepl.LSN)) *ackTracker {
	return &ackTracker{confirm: confirm}
}

// open records a transaction ending at end, delivered now, and returns
// its first part.
func (t *ackTracker) open(end pglogrepl.LSN) *Ack {
	r := &ackRecord{t: t, end: end}
	r.parts.Store(1)
	t.mu.Lock()
	t.queue = append(t.queue, r)
	t.mu.Unlock()
	return &Ack{rec: r}
}

// abandon drops r: its Commit failed, so it is delivered again (or Run
// stops), and parts of it that are done later confirm nothing.
func (t *ackTracker) abandon(r *ackRecord) {
	t.mu.Lock()
	r.abandoned = true
	t.advance()
	t.mu.Unlock()
}

func (t *ackTracker) resolve(r *ackRecord) {
	t.mu.Lock()
	r.resolved = true
	t.advance()
	t.mu.Unlock()
}

// advance pops the resolved (or abandoned) records at the head and
// confirms the last resolved one. Called with t.mu held.
func (t *ackTracker) advance() {
	var last pglogrepl.LSN
	for t.head < len(t.queue) {
		r := t.queue[t.head]
		if !r.resolved && !r.abandoned {
			break
		}
		if r.resolved && !r.abandoned {
			last = max(last, r.end)
		}
		t.queue[t.head] = nil
		t.head++
	}
	if t.head == len(t.queue) {
		t.queue, t.head = t.queue[:0], 0
	} else if t.head > 1024 && t.head > len(t.queue)/2 {
		n := copy(t.queue, t.queue[t.head:])
		clear(t.queue[n:])
		t.queue, t.head = t.queue[:n], 0
	}
	if last > 0 {
		t.confirm(last)
	}
}

// pending returns the number of delivered transactions not yet resolved.
func (t *ackTracker) pending() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.queue) - t.head
}
