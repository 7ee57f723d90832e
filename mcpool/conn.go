package mcpool

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// ConnConfig configures one connection.
type ConnConfig struct {
	// MaxInFlight bounds the requests sent on the connection and not yet
	// answered. A request beyond it waits for a slot, within its ctx.
	MaxInFlight int
	// IOTimeout closes a connection whose write blocks for about this
	// long (half of it to all of it), or that has requests in flight and
	// receives nothing for this long; its requests then fail with
	// ErrServerDown. Detection takes between one and two IOTimeouts. It is
	// a liveness check, not a request deadline (that is the ctx's).
	IOTimeout time.Duration
	// MaxValueSize is the largest value, in bytes, accepted in a request
	// (ErrBadRequest) or a response (ErrProtocol, the connection closes).
	MaxValueSize int
	// minSilence is how long a request must have been written, with
	// nothing received since, for its timeout to be TimeoutSilent; one
	// written later is TimeoutLate. Pool sets it to Config.Timeout/2.
	minSilence time.Duration
}

// DefaultConnConfig returns MaxInFlight 1024, IOTimeout 2s and
// MaxValueSize 16 MiB.
func DefaultConnConfig() ConnConfig {
	return ConnConfig{MaxInFlight: 1024, IOTimeout: 2 * time.Second, MaxValueSize: 16 << 20}
}

// Validate checks the fields.
func (c ConnConfig) Validate() error {
	switch {
	case c.MaxInFlight < 1:
		return fmt.Errorf("%w: MaxInFlight (%d) must be at least 1", ErrConfig, c.MaxInFlight)
	case c.IOTimeout <= 0:
		return fmt.Errorf("%w: IOTimeout (%s) must be positive", ErrConfig, c.IOTimeout)
	case c.MaxValueSize < 1:
		return fmt.Errorf("%w: MaxValueSize (%d) must be positive", ErrConfig, c.MaxValueSize)
	}
	return nil
}

type result struct {
	resp Response
	err  error
	// abandoned: the request timed out (Config.Timeout) while still in
	// the pipeline; the reader holds it until its response comes.
	abandoned bool
}

// request is one request and, once sent, the place its result is
// delivered. Requests built by the build functions come from reqPool and
// go back to it once their caller has read the result (release); a
// request given up by its caller is left to the garbage collector, as the
// reader may still deliver to it.
type request struct {
	kind   byte
	quiet  bool
	pooled bool   // from reqPool: buf and done are reused
	buf    []byte // wire bytes, with "mn\r\n" after a quiet request
	err    error  // why the request could not be built
	done   chan result
	// due is the expiry tick at which the request times out while in
	// the pipeline (Config.Timeout; see expiry), 0 for none.
	due int64
	// seq is the request's place in its connection's wire order (1, 2,
	// ...; Conn.seq), 0 until it joins pending. Set and read under the
	// connection's mu.
	seq uint64
	// answered is set by the first of the reader, the drain and the
	// expiry to deliver a result: exactly one goes into done.
	answered atomic.Bool
	// chain is the number of quiet requests in a chain (kindChain): each
	// carries O<its index> and q, and one mn ends them all. The reader
	// fills fails with the answers that came other than successes (HD, and
	// NF: a delete of an absent key), which are not kept.
	chain int
	fails []chainFail
}

// chainFail is one answer within a chain: the index of the request it
// answers (-1 when the answer names none, as a server error line), and
// the response or error.
type chainFail struct {
	idx  int
	resp Response
	err  error
}

// deliver puts res into r.done unless r has had its result. It never
// blocks: done has room for the one result.
func (r *request) deliver(res result) {
	if r.answered.CompareAndSwap(false, true) {
		r.done <- res
	}
}

// chainBufs holds the write buffers of delete chains, which are larger
// than a pooled request keeps.
var chainBufs sync.Pool

var reqPool = sync.Pool{New: func() any {
	return &request{pooled: true, done: make(chan result, 1)}
}}

// newRequest returns a pooled request whose buf is empty, with room for
// about size bytes.
func newRequest(size int) *request {
	r := reqPool.Get().(*request)
	if cap(r.buf) < size {
		r.buf = make([]byte, 0, max(size, 128))
	}
	return r
}

// finish stores what w built into r.
func (r *request) finish(kind byte, w builder) *request {
	if w.err != nil {
		r.err = w.err
		return r
	}
	if w.quiet {
		w.b = append(w.b, noopRequest...)
	}
	r.kind, r.buf, r.quiet = kind, w.b, w.quiet
	return r
}

// release returns r to reqPool. Only the caller that read r's result (or
// that never sent r) may call it.
func (r *request) release() {
	if r == nil || !r.pooled {
		return
	}
	if cap(r.buf) > 4<<10 {
		// A chain's buffer goes back to chainBufs (up to 1 MiB); other
		// large buffers are left to the GC.
		if r.kind == kindChain && cap(r.buf) <= 1<<20 {
			b := r.buf[:0]
			chainBufs.Put(&b)
		}
		r.buf = nil
	}
	r.buf, r.err, r.quiet, r.kind, r.due, r.seq = r.buf[:0], nil, false, 0, 0, 0
	r.chain, r.fails = 0, r.fails[:0]
	r.answered.Store(false)
	reqPool.Put(r)
}

// fifo is a queue of requests in wire order.
type fifo struct {
	buf     []*request
	head, n int
}

func (q *fifo) push(r *request) {
	if q.n == len(q.buf) {
		nb := make([]*request, max(16, 2*len(q.buf)))
		for i := 0; i < q.n; i++ {
			nb[i] = q.buf[(q.head+i)%len(q.buf)]
		}
		q.buf, q.head = nb, 0
	}
	q.buf[(q.head+q.n)%len(q.buf)] = r
	q.n++
}

func (q *fifo) pop() *request {
	if q.n == 0 {
		return nil
	}
	r := q.buf[q.head]
	q.buf[q.head] = nil
	q.head = (q.head + 1) % len(q.buf)
	q.n--
	return r
}

// writeMark records one write: the last request it carried (hi, a seq),
// the bytes the reader had received when it began (rx), and when it
// began (at). A request that times out after its write counts as
// answered-to (TimeoutAnswering) when more bytes than rx have come since.
type writeMark struct {
	hi, rx uint64
	at     time.Time
}

// writeMarks is a queue of writeMarks in order of hi; the marks of
// requests no longer in pending are dropped as new ones come. It holds
// at most one mark per request in pending.
type writeMarks struct {
	buf  []writeMark
	head int
}

func (m *writeMarks) push(w writeMark) {
	switch {
	case m.head == len(m.buf):
		m.buf, m.head = m.buf[:0], 0
	case m.head > 0 && len(m.buf) == cap(m.buf):
		n := copy(m.buf, m.buf[m.head:])
		m.buf, m.head = m.buf[:n], 0
	}
	m.buf = append(m.buf, w)
}

// dropBelow drops the marks whose last request precedes seq.
func (m *writeMarks) dropBelow(seq uint64) {
	for m.head < len(m.buf) && m.buf[m.head].hi < seq {
		m.head++
	}
}

// find returns the mark of the write that carried request seq.
func (m *writeMarks) find(seq uint64) (writeMark, bool) {
	live := m.buf[m.head:]
	i, _ := slices.BinarySearchFunc(live, seq, func(w writeMark, s uint64) int { return cmp.Compare(w.hi, s) })
	if i == len(live) {
		return writeMark{}, false
	}
	return live[i], true
}

// rxCounter counts the bytes the reader receives from the server.
type rxCounter struct{ c *Conn }

func (r rxCounter) Read(p []byte) (int, error) {
	n, err := r.c.nc.Read(p)
	if n > 0 {
		r.c.rx.Add(uint64(n))
	}
	return n, err
}

// Conn is one connection to one memcached server with requests pipelined
// on it. Its methods are safe for concurrent use. A Conn does not
// reconnect: once broken (see Done and Err) every call fails with an error
// wrapping ErrServerDown, and the caller dials again (Pool does this).
//
// Writes are combined: a caller appends its request to the write buffer
// and, when no write is under way, yields once (runtime.Gosched, so that
// goroutines about to send join in) and writes the buffer itself, with
// the requests of every caller that joined meanwhile; after two writes it
// hands what is left to the connection's writer goroutine, so that no
// caller flushes for others for long. Compared with handing every request
// to a writer goroutine this saves a goroutine switch per request. When
// 16 requests pile up while the yielding caller or the writer goroutine
// has yet to run (thousands of runnable goroutines, as in a herd), the
// caller that adds the 16th writes them: a write never waits for the
// scheduler to come round. A reader goroutine matches
// responses to requests in order and hands each result to its caller.
// A caller may thus spend up to IOTimeout in a write to a server that
// stopped reading, whatever its ctx.
type Conn struct {
	addr string
	cfg  ConnConfig
	nc   net.Conn
	br   *bufio.Reader

	// inflight counts the requests sent and not yet answered, at most
	// MaxInFlight: a semaphore of atomics, so that the fast path takes
	// no lock (a channel's send and receive take one each). Callers
	// waiting for a slot register in waiting and are woken through
	// slotFree.
	inflight atomic.Int32
	waiting  atomic.Int32
	slotFree chan struct{}
	kick     chan struct{} // hands the flush to the writer goroutine
	// rx counts the bytes received from the server (rxCounter): a
	// request timed out after its write, while rx grew, was not one the
	// server left unanswered.
	rx atomic.Uint64

	mu sync.Mutex // guards the fields up to wdeadline
	// wbuf holds requests not yet written, in the order of pending.
	wbuf  []byte
	spare []byte
	// pending lists the requests written or in wbuf, in wire order.
	pending fifo
	// seq is the seq of the last request to join pending, wseq that of
	// the last one a completed write carried; marks has a mark per write
	// that may have carried a request still in pending. They tell where
	// a request that timed out was (timeoutWhereLocked).
	seq, wseq uint64
	marks     writeMarks
	// writing is set while a caller or the writer goroutine is in
	// flushLocked; yielding while a caller yields before writing; kicked
	// while the writer goroutine has a flush to take over. nq counts the
	// requests appended to wbuf since it was last taken.
	writing, yielding, kicked bool
	nq                        int
	// stopped is set, with err, when the connection stops: no request
	// joins pending after it.
	stopped   bool
	wdeadline time.Time // write deadline set on nc

	closing   chan struct{} // closed when the connection stops
	exited    chan struct{} // closed when both goroutines are gone
	closeOnce sync.Once
	err       error // why it stopped; written before closing is closed
	wg        sync.WaitGroup
}

// Dial connects to addr (host:port) and starts the connection's reader and
// writer goroutines, which Close stops and waits for.
func Dial(ctx context.Context, addr string, cfg ConnConfig) (*Conn, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%w: dial %s: %w", ErrServerDown, addr, err)
	}
	return newConn(nc, addr, cfg), nil
}

func newConn(nc net.Conn, addr string, cfg ConnConfig) *Conn {
	c := &Conn{
		addr:     addr,
		cfg:      cfg,
		nc:       nc,
		slotFree: make(chan struct{}, 1),
		kick:     make(chan struct{}, 1),
		wbuf:     make([]byte, 0, 4<<10),
		closing:  make(chan struct{}),
		exited:   make(chan struct{}),
	}
	c.br = bufio.NewReaderSize(rxCounter{c}, 64<<10)
	c.wg.Add(2)
	go c.writeLoop()
	go c.readLoop()
	go func() {
		c.wg.Wait()
		c.drain()
		close(c.exited)
	}()
	return c
}

// Addr returns the server address.
func (c *Conn) Addr() string { return c.addr }

// Done is closed when the connection has stopped, by Close or a failure.
func (c *Conn) Done() <-chan struct{} { return c.closing }

// Err returns nil while the connection works, then why it stopped: an
// error wrapping ErrClosed or ErrServerDown.
func (c *Conn) Err() error {
	select {
	case <-c.closing:
		return c.err
	default:
		return nil
	}
}

// InFlight returns the number of requests queued or awaiting a response.
func (c *Conn) InFlight() int { return int(c.inflight.Load()) }

// acquire takes a slot if one is free.
func (c *Conn) acquire() bool {
	for {
		n := c.inflight.Load()
		if int(n) >= c.cfg.MaxInFlight {
			return false
		}
		if c.inflight.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// releaseSlot frees a slot and wakes a caller waiting for one.
func (c *Conn) releaseSlot() {
	c.inflight.Add(-1)
	if c.waiting.Load() > 0 {
		c.wakeWaiter()
	}
}

// wakeWaiter wakes one caller waiting for a slot (a wake-up already
// pending does).
func (c *Conn) wakeWaiter() {
	select {
	case c.slotFree <- struct{}{}:
	default:
	}
}

// awaitSlot waits for a slot. A waiter registers before it looks again,
// so a slot freed after its look wakes it; one woken for a slot someone
// else took waits again. Having one, it passes the wake-up on while more
// are free, as the wake-up buffer holds one.
func (c *Conn) awaitSlot(ctx context.Context, expired <-chan struct{}) error {
	c.waiting.Add(1)
	defer c.waiting.Add(-1)
	for !c.acquire() {
		select {
		case <-c.slotFree:
		case <-ctx.Done():
			return ctxError(ctx, TimeoutQueued)
		case <-expired:
			return timeoutErrs[TimeoutQueued]
		case <-c.closing:
			return c.err
		}
	}
	if c.waiting.Load() > 1 && c.InFlight() < c.cfg.MaxInFlight {
		c.wakeWaiter()
	}
	return nil
}

// Close stops the connection and waits for its goroutines. Requests in
// flight fail with ErrClosed. It is safe to call more than once.
func (c *Conn) Close() error {
	c.stop(ErrClosed)
	<-c.exited
	return nil
}

// stop records why the connection stops (the first reason wins), and
// unblocks both goroutines and any caller in a write.
func (c *Conn) stop(err error) {
	c.closeOnce.Do(func() {
		if !errors.Is(err, ErrClosed) {
			err = fmt.Errorf("%w: %s: %w", ErrServerDown, c.addr, err)
		}
		c.mu.Lock()
		c.err = err
		c.stopped = true
		c.mu.Unlock()
		close(c.closing)
		_ = c.nc.Close()
	})
}

// drain fails every request left once both goroutines are gone. Nothing
// joins pending after stop, so this answers every request sent.
func (c *Conn) drain() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for r := c.pending.pop(); r != nil; r = c.pending.pop() {
		c.releaseSlot()
		r.deliver(result{err: c.err})
	}
}

// expire times out the requests in the pipeline whose due tick has come
// (tick >= due). They stay in pending: their responses are read and
// dropped. The whole pipeline is walked (at most MaxInFlight requests):
// a request that waited for a slot joins it after younger ones that did
// not, so due ticks are not in order. A request whose response the reader
// has begun to read is no longer in pending: the reader finishes it, or
// fails it within IOTimeout.
func (c *Conn) expire(tick int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	q := &c.pending
	var unread int8
	for i := 0; i < q.n; i++ {
		// due 0: its ctx has a deadline, not ours to end.
		if r := q.buf[(q.head+i)%len(q.buf)]; r.due != 0 && r.due <= tick && !r.answered.Load() {
			r.deliver(result{err: timeoutErrs[c.timeoutWhereLocked(r, &unread)], abandoned: true})
		}
	}
}

// timeoutWhereLocked says where r was when its deadline passed (c.mu
// held): not yet written (queued); written, with bytes received since or
// waiting in the kernel (answering); written less than minSilence ago,
// nothing since (late); or written earlier, nothing since (silent).
// unread caches, for one call of expire, whether the kernel holds bytes
// not yet read: 0 not asked, 1 yes, -1 no.
func (c *Conn) timeoutWhereLocked(r *request, unread *int8) TimeoutWhere {
	q := &c.pending
	switch {
	case r.seq == 0 || r.seq > c.wseq && (q.n > 0 && r.seq >= q.buf[q.head].seq):
		// Never joined the pipeline, or still in it and not written.
		return TimeoutQueued
	case q.n == 0 || r.seq < q.buf[q.head].seq:
		// Out of pending: the reader has begun to read its response.
		return TimeoutAnswering
	}
	m, ok := c.marks.find(r.seq)
	if ok && c.rx.Load() > m.rx {
		return TimeoutAnswering
	}
	if *unread == 0 {
		*unread = -1
		if unreadBytes(c.nc) {
			*unread = 1
		}
	}
	if *unread > 0 {
		// The server answered; the reader has yet to run.
		return TimeoutAnswering
	}
	if ok && time.Since(m.at) < c.cfg.minSilence {
		// Its deadline was spent queued: the server had it too briefly
		// for its silence to mean anything.
		return TimeoutLate
	}
	return TimeoutSilent
}

// timeoutError returns the error of r, whose ctx deadline passed (err).
func (c *Conn) timeoutError(r *request, err error) error {
	c.mu.Lock()
	var unread int8
	where := c.timeoutWhereLocked(r, &unread)
	c.mu.Unlock()
	return &TimeoutError{Where: where, Err: err}
}

// maxWriteBuf is the capacity beyond which a write buffer is not kept.
const maxWriteBuf = 256 << 10

// takeOver is the number of requests waiting in the write buffer at
// which a caller writes them itself rather than wait for a yielding
// caller or the writer goroutine to come back: with thousands of
// goroutines runnable (a herd), that could take long.
const takeOver = 16

// send appends r to the write buffer and to pending. Unless corked, it
// then writes the buffer if nobody else is due to: no write under way,
// no caller yielding, no hand-off pending (or takeOver requests waiting).
// A corked request waits for flush or the next write. The caller holds
// a slot (acquire). A nil error means r will be answered on r.done.
func (c *Conn) send(r *request, corked bool) error {
	c.mu.Lock()
	if c.stopped {
		c.mu.Unlock()
		return c.err
	}
	c.wbuf = append(c.wbuf, r.buf...)
	c.seq++
	r.seq = c.seq
	c.pending.push(r)
	c.nq++
	switch {
	case corked || c.writing:
	case c.yielding || c.kicked:
		if c.nq >= takeOver {
			c.flushLocked(2)
		}
	default:
		// Let callers that are about to send join this write: fewer,
		// larger writes under load.
		c.yielding = true
		c.mu.Unlock()
		runtime.Gosched()
		c.mu.Lock()
		c.yielding = false
		if !c.writing {
			c.flushLocked(2)
		}
	}
	c.mu.Unlock()
	return nil
}

// flush writes what corked requests left in the write buffer.
func (c *Conn) flush() {
	c.mu.Lock()
	if !c.writing {
		c.flushLocked(2)
	}
	c.mu.Unlock()
}

// flushLocked writes wbuf until it is empty, unlocking c.mu around each
// write. After rounds writes (rounds < 0: no limit) it hands the rest to
// the writer goroutine. c.mu is held and c.writing clear on entry.
func (c *Conn) flushLocked(rounds int) {
	c.writing = true
	defer func() { c.writing = false }()
	for len(c.wbuf) > 0 && !c.stopped {
		if rounds == 0 {
			if !c.kicked {
				c.kicked = true
				c.kick <- struct{}{} // never blocks: the writer clears kicked first
			}
			return
		}
		rounds--
		buf := c.wbuf
		c.wbuf, c.spare, c.nq = c.spare[:0], nil, 0
		// buf carries the requests up to c.seq.
		hi := c.seq
		if c.pending.n > 0 {
			c.marks.dropBelow(c.pending.buf[c.pending.head].seq)
		} else {
			c.marks.dropBelow(hi + 1)
		}
		now := time.Now()
		c.marks.push(writeMark{hi: hi, rx: c.rx.Load(), at: now})
		if c.wdeadline.Sub(now) < c.cfg.IOTimeout/2 {
			c.wdeadline = now.Add(c.cfg.IOTimeout)
			_ = c.nc.SetWriteDeadline(c.wdeadline)
		}
		c.mu.Unlock()
		_, err := c.nc.Write(buf)
		c.mu.Lock()
		if cap(buf) <= maxWriteBuf {
			c.spare = buf
		}
		if err != nil {
			c.mu.Unlock()
			c.stop(fmt.Errorf("write: %w", err))
			c.mu.Lock()
			return
		}
		c.wseq = hi
	}
}

// writeLoop takes over flushes that a caller handed off.
func (c *Conn) writeLoop() {
	defer c.wg.Done()
	for {
		select {
		case <-c.kick:
		case <-c.closing:
			return
		}
		c.mu.Lock()
		c.kicked = false
		if !c.writing {
			c.flushLocked(-1)
		}
		c.mu.Unlock()
	}
}

func (c *Conn) pendingLen() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pending.n
}

func (c *Conn) readLoop() {
	defer c.wg.Done()
	var deadline time.Time
	strikes := 0 // timeouts in a row with requests in flight
	for {
		// Each response gets at least half of IOTimeout; renewing only
		// then keeps the deadline off the fast path.
		if now := time.Now(); deadline.Sub(now) < c.cfg.IOTimeout/2 {
			deadline = now.Add(c.cfg.IOTimeout)
			_ = c.nc.SetReadDeadline(deadline)
		}
		if _, err := c.br.Peek(1); err != nil {
			if isTimeout(err) {
				// Idle, or the deadline was set long before the
				// requests now in flight: try once more.
				if n := c.pendingLen(); n == 0 || strikes == 0 {
					if n > 0 {
						strikes++
					}
					deadline = time.Time{}
					continue
				}
			}
			c.stop(fmt.Errorf("read: %w", err))
			return
		}
		strikes = 0
		c.mu.Lock()
		r := c.pending.pop()
		c.mu.Unlock()
		if r == nil {
			c.stop(fmt.Errorf("%w: data from the server with no request in flight", ErrProtocol))
			return
		}
		res, err := c.readOne(r)
		if err != nil {
			c.stop(err)
			res = result{err: c.err}
		}
		c.releaseSlot() // before the answer, so InFlight is exact once it is seen
		r.deliver(res)
		if err != nil {
			return
		}
	}
}

// readOne reads the response to r. A non-nil error means the connection
// is unusable; a server error line is a result.
func (c *Conn) readOne(r *request) (result, error) {
	resp, err := readResponse(c.br, c.cfg.MaxValueSize)
	if err != nil && !isServerError(err) {
		return result{}, fmt.Errorf("read: %w", err)
	}
	if r.kind == kindChain {
		return c.readChain(r, resp, err)
	}
	if !r.quiet {
		if r.kind == kindNop && err == nil && resp.Status != StatusMN {
			return result{}, fmt.Errorf("%w: %s in reply to mn", ErrProtocol, resp.Status)
		}
		return result{resp: resp, err: err}, nil
	}
	if err == nil && resp.Status == StatusMN {
		return result{resp: quietResponse(r.kind)}, nil
	}
	// The request's own response came; its mn follows.
	mn, err2 := readResponse(c.br, c.cfg.MaxValueSize)
	if err2 != nil {
		return result{}, fmt.Errorf("read: %w", err2)
	}
	if mn.Status != StatusMN {
		return result{}, fmt.Errorf("%w: %s where MN was due", ErrProtocol, mn.Status)
	}
	return result{resp: resp, err: err}, nil
}

// readChain reads the answers to a chain of quiet requests up to the mn
// that ends it; first is the first answer, already read. Each answer
// goes to r.fails by its opaque.
func (c *Conn) readChain(r *request, resp Response, err error) (result, error) {
	for answers := 0; ; answers++ {
		if err != nil && !isServerError(err) {
			return result{}, fmt.Errorf("read: %w", err)
		}
		if err == nil && resp.Status == StatusMN {
			return result{}, nil
		}
		if answers > r.chain {
			return result{}, fmt.Errorf("%w: more answers than requests in a quiet chain", ErrProtocol)
		}
		idx := -1
		if err == nil {
			if n, perr := strconv.Atoi(resp.Opaque); perr == nil && n >= 0 && n < r.chain {
				idx = n
			}
		}
		// A delete of a key that is not there (NF: memcached 1.6 does not
		// hide it in quiet mode) or a stray HD is a success: keeping it
		// would cost memory per absent key, a chain's worth when a
		// transaction's keys were never cached.
		if idx < 0 || (resp.Status != StatusNF && resp.Status != StatusHD) {
			r.fails = append(r.fails, chainFail{idx: idx, resp: resp, err: err})
		}
		resp, err = readResponse(c.br, c.cfg.MaxValueSize)
	}
}

func quietResponse(kind byte) Response {
	st := StatusHD
	if kind == kindGet || kind == kindDbg {
		st = StatusEN
	}
	return Response{Status: st, Quiet: true}
}

// isServerError reports whether err is a *ServerError: the server
// answered. (Its own function: errors.As's target escapes, and would cost
// an allocation per response where no error came.)
func isServerError(err error) bool {
	var se *ServerError
	return errors.As(err, &se)
}

func isTimeout(err error) bool {
	return errors.Is(err, os.ErrDeadlineExceeded)
}

// start sends r (see send for corked). It returns an error when r was
// not sent. expired, if not nil, is a deadline that applies besides
// ctx's.
func (c *Conn) start(ctx context.Context, expired <-chan struct{}, r *request, corked bool) error {
	if r.err != nil {
		return r.err
	}
	if r.done == nil {
		r.done = make(chan result, 1)
	}
	select {
	case <-c.closing:
		return c.err
	default:
	}
	if !c.acquire() {
		if corked {
			// The slots may all be held by this caller's corked
			// requests: they must go out before a slot can free up.
			c.flush()
		}
		if err := c.awaitSlot(ctx, expired); err != nil {
			return err
		}
	}
	if err := c.send(r, corked); err != nil {
		c.releaseSlot()
		return err
	}
	return nil
}

// wait returns r's result, or gives up when ctx is done. A request given
// up, or timed out by the expiry (r.due), has its response read and
// dropped; ok is false then, and r must not be released. With no ctx to
// watch (the proxy's case) this is a plain channel receive, not a select:
// that saves about 2% of the proxy's CPU.
func (c *Conn) wait(ctx context.Context, r *request) (resp Response, ok bool, err error) {
	done := ctx.Done()
	if done == nil {
		res := <-r.done
		return res.resp, !res.abandoned, res.err
	}
	select {
	case res := <-r.done:
		return res.resp, !res.abandoned, res.err
	case <-done:
		err = ctx.Err()
	}
	select {
	case res := <-r.done: // it raced in
		return res.resp, !res.abandoned, res.err
	default:
	}
	if errors.Is(err, context.DeadlineExceeded) {
		err = c.timeoutError(r, ctx.Err())
	}
	return Response{}, false, err
}

func (c *Conn) roundTrip(ctx context.Context, r *request) (Response, error) {
	if err := c.start(ctx, nil, r, false); err != nil {
		r.release()
		return Response{}, err
	}
	resp, ok, err := c.wait(ctx, r)
	if ok {
		r.release()
	}
	return resp, err
}

// ctxError returns ctx.Err(), a passed deadline as a *TimeoutError
// (ErrTimeout) saying where the request was.
func ctxError(ctx context.Context, where TimeoutWhere) error {
	err := ctx.Err()
	if errors.Is(err, context.DeadlineExceeded) {
		return &TimeoutError{Where: where, Err: err}
	}
	return err
}

// MetaGet sends "mg <key> <flags...>". Flags are single letters with
// optional tokens, as in protocol.txt: "v", "c", "t", "f", "s", "k",
// "N30", "R5", "T60", "O123", "q", "b", "h", "l", "u". A miss is StatusEN,
// not an error.
func (c *Conn) MetaGet(ctx context.Context, key string, flags ...string) (Response, error) {
	return c.roundTrip(ctx, buildGet(key, flags))
}

// MetaSet sends "ms <key> <len> <flags...>" and value. StatusHD is
// stored; NS, EX and NF are answers, not errors.
func (c *Conn) MetaSet(ctx context.Context, key string, value []byte, opt SetOptions) (Response, error) {
	return c.roundTrip(ctx, buildSet(key, value, opt, c.cfg.MaxValueSize))
}

// MetaDelete sends "md <key> <flags...>". StatusHD is deleted (or marked
// stale); NF and EX are answers, not errors.
func (c *Conn) MetaDelete(ctx context.Context, key string, opt DeleteOptions) (Response, error) {
	return c.roundTrip(ctx, buildDelete(key, opt))
}

// MetaArithmetic sends "ma <key> v <flags...>". StatusVA carries the new
// value; NF, NS and EX are answers, not errors.
func (c *Conn) MetaArithmetic(ctx context.Context, key string, opt ArithmeticOptions) (Response, error) {
	return c.roundTrip(ctx, buildArithmetic(key, opt))
}

// NoOp sends "mn" and waits for "MN": every request sent before it on this
// connection has been answered.
func (c *Conn) NoOp(ctx context.Context) error {
	_, err := c.roundTrip(ctx, &request{kind: kindNop, buf: noopRequest})
	return err
}

// Do sends a meta command (mg, ms, md, ma, mn or me) as the caller wrote
// it: request is the command line, with or without CRLF, and value the
// data block of an ms (without CRLF; its length must match the line's),
// empty otherwise. The line is checked (key, flag syntax, lengths) before
// it is sent; memcached checks the flags' meaning and answers
// CLIENT_ERROR, returned as a *ServerError. With the q flag the Response
// may be synthesized (Quiet). Keys with the b flag are sent as written.
func (c *Conn) Do(ctx context.Context, request, value []byte) (Response, error) {
	r, _ := buildRaw(request, value, c.cfg.MaxValueSize)
	return c.roundTrip(ctx, r)
}
