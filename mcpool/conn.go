package mcpool

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// ConnConfig configures one connection.
type ConnConfig struct {
	// MaxInFlight bounds the requests sent on the connection and not yet
	// answered. A request beyond it waits for a slot, within its ctx.
	MaxInFlight int
	// IOTimeout closes a connection whose write blocks this long, or that
	// has requests in flight and receives nothing for this long; its
	// requests then fail with ErrServerDown. Detection takes between one
	// and two IOTimeouts. It is a liveness check, not a request deadline
	// (that is the ctx's).
	IOTimeout time.Duration
	// MaxValueSize is the largest value, in bytes, accepted in a request
	// (ErrBadRequest) or a response (ErrProtocol, the connection closes).
	MaxValueSize int
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

// request states
const (
	stateQueued    int32 = iota // in the writer's queue
	stateWritten                // taken by the writer: its response will be read
	stateAbandoned              // given up by its caller before the writer took it
)

type result struct {
	resp Response
	err  error
}

type request struct {
	kind  byte
	quiet bool
	buf   []byte // wire bytes, with "mn\r\n" after a quiet request
	err   error  // why the request could not be built
	state atomic.Int32
	done  chan result // capacity 1
}

func newRequest(kind byte, w builder) *request {
	if w.err != nil {
		return &request{err: w.err}
	}
	if w.quiet {
		w.b = append(w.b, noopRequest...)
	}
	return &request{kind: kind, buf: w.b, quiet: w.quiet}
}

// Conn is one connection to one memcached server with requests pipelined
// on it. Its methods are safe for concurrent use. A Conn does not
// reconnect: once broken (see Done and Err) every call fails with an error
// wrapping ErrServerDown, and the caller dials again (Pool does this).
type Conn struct {
	addr string
	cfg  ConnConfig
	nc   net.Conn
	br   *bufio.Reader

	reqs    chan *request // callers -> writer
	pending chan *request // writer -> reader, in wire order
	slots   chan struct{} // a token per request in reqs or pending

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
		addr:    addr,
		cfg:     cfg,
		nc:      nc,
		br:      bufio.NewReaderSize(nc, 64<<10),
		reqs:    make(chan *request, cfg.MaxInFlight),
		pending: make(chan *request, cfg.MaxInFlight),
		slots:   make(chan struct{}, cfg.MaxInFlight),
		closing: make(chan struct{}),
		exited:  make(chan struct{}),
	}
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
func (c *Conn) InFlight() int { return len(c.slots) }

// Close stops the connection and waits for its goroutines. Requests in
// flight fail with ErrClosed. It is safe to call more than once.
func (c *Conn) Close() error {
	c.stop(ErrClosed)
	<-c.exited
	return nil
}

// stop records why the connection stops (the first reason wins), and
// unblocks both goroutines.
func (c *Conn) stop(err error) {
	c.closeOnce.Do(func() {
		if !errors.Is(err, ErrClosed) {
			err = fmt.Errorf("%w: %s: %w", ErrServerDown, c.addr, err)
		}
		c.err = err
		close(c.closing)
		_ = c.nc.Close()
	})
}

// drain fails every request left once both goroutines are gone.
func (c *Conn) drain() {
	for {
		select {
		case r := <-c.pending:
			r.done <- result{err: c.err}
		case r := <-c.reqs:
			if r.state.CompareAndSwap(stateQueued, stateAbandoned) {
				r.done <- result{err: c.err}
			}
		default:
			return
		}
	}
}

const writeBatch = 64 << 10

func (c *Conn) writeLoop() {
	defer c.wg.Done()
	buf := make([]byte, 0, writeBatch)
	for {
		var r *request
		select {
		case r = <-c.reqs:
		case <-c.closing:
			return
		}
		buf = buf[:0]
		yielded := false
		for r != nil {
			if r.state.CompareAndSwap(stateQueued, stateWritten) {
				buf = append(buf, r.buf...)
				c.pending <- r // never blocks: a slot is held per request
			} else {
				<-c.slots // abandoned before it was sent
			}
			r = nil
			if len(buf) < writeBatch {
				select {
				case r = <-c.reqs:
				default:
					if !yielded {
						// Let callers that are about to send join this
						// write: fewer, larger writes under load.
						yielded = true
						runtime.Gosched()
						select {
						case r = <-c.reqs:
						default:
						}
					}
				}
			}
		}
		if len(buf) == 0 {
			continue
		}
		_ = c.nc.SetWriteDeadline(time.Now().Add(c.cfg.IOTimeout))
		if _, err := c.nc.Write(buf); err != nil {
			c.stop(fmt.Errorf("write: %w", err))
			return
		}
		if cap(buf) > 4*writeBatch {
			buf = make([]byte, 0, writeBatch)
		}
	}
}

func (c *Conn) readLoop() {
	defer c.wg.Done()
	var deadline time.Time
	for {
		var r *request
		select {
		case r = <-c.pending:
		case <-c.closing:
			return
		default:
		}
		if r == nil {
			// Idle: wait for data (a response to a request being written
			// now, or EOF) and wake up now and then to look at pending.
			deadline = time.Now().Add(c.cfg.IOTimeout)
			_ = c.nc.SetReadDeadline(deadline)
			if _, err := c.br.Peek(1); err != nil {
				if isTimeout(err) {
					continue
				}
				c.stop(fmt.Errorf("read: %w", err))
				return
			}
			select {
			case r = <-c.pending:
			case <-c.closing:
				return
			default:
				c.stop(fmt.Errorf("%w: data from the server with no request in flight", ErrProtocol))
				return
			}
		}
		// Each response gets at least half of IOTimeout; renewing only
		// then keeps the deadline off the fast path.
		if now := time.Now(); deadline.Sub(now) < c.cfg.IOTimeout/2 {
			deadline = now.Add(c.cfg.IOTimeout)
			_ = c.nc.SetReadDeadline(deadline)
		}
		res, err := c.readOne(r)
		if err != nil {
			c.pending <- r // a slot is still held for it: drain answers it
			c.stop(err)
			return
		}
		<-c.slots // before the answer, so InFlight is exact once it is seen
		r.done <- res
	}
}

// readOne reads the response to r. A non-nil error means the connection
// is unusable; a server error line is a result.
func (c *Conn) readOne(r *request) (result, error) {
	resp, err := readResponse(c.br, c.cfg.MaxValueSize)
	var se *ServerError
	switch {
	case errors.As(err, &se):
	case err != nil:
		return result{}, fmt.Errorf("read: %w", err)
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

func quietResponse(kind byte) Response {
	st := StatusHD
	if kind == kindGet || kind == kindDbg {
		st = StatusEN
	}
	return Response{Status: st, Quiet: true}
}

func isTimeout(err error) bool {
	return errors.Is(err, os.ErrDeadlineExceeded)
}

// start queues r. It returns an error when r was not queued. expired, if
// not nil, is a deadline that applies besides ctx's.
func (c *Conn) start(ctx context.Context, expired <-chan time.Time, r *request) error {
	if r.err != nil {
		return r.err
	}
	r.done = make(chan result, 1)
	select {
	case <-c.closing:
		return c.err
	default:
	}
	select {
	case c.slots <- struct{}{}:
	case <-ctx.Done():
		return ctxError(ctx)
	case <-expired:
		return errDefaultTimeout
	case <-c.closing:
		return c.err
	}
	c.reqs <- r // never blocks: reqs has a place per slot
	return nil
}

// wait returns r's result, or gives up when ctx is done. A request given
// up after it was written still has its response read and dropped.
func (c *Conn) wait(ctx context.Context, expired <-chan time.Time, r *request) (Response, error) {
	var err error
	select {
	case res := <-r.done:
		return res.resp, res.err
	case <-c.exited:
		// Answered by drain, unless it was queued after drain ran.
		if r.state.CompareAndSwap(stateQueued, stateAbandoned) {
			return Response{}, c.err
		}
		res := <-r.done
		return res.resp, res.err
	case <-ctx.Done():
		err = ctxError(ctx)
	case <-expired:
		err = errDefaultTimeout
	}
	if r.state.CompareAndSwap(stateQueued, stateAbandoned) {
		return Response{}, err
	}
	select {
	case res := <-r.done: // it raced in
		return res.resp, res.err
	default:
	}
	return Response{}, err
}

func (c *Conn) roundTrip(ctx context.Context, r *request) (Response, error) {
	if err := c.start(ctx, nil, r); err != nil {
		return Response{}, err
	}
	return c.wait(ctx, nil, r)
}

// errDefaultTimeout is the error of a request that outlived
// Config.Timeout, its ctx having no deadline.
var errDefaultTimeout = fmt.Errorf("%w: %w", ErrTimeout, context.DeadlineExceeded)

// ctxError wraps ctx.Err(): a passed deadline is also ErrTimeout.
func ctxError(ctx context.Context) error {
	err := ctx.Err()
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w: %w", ErrTimeout, err)
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
