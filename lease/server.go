package lease

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// readBufSize is a connection's read buffer. A line with no newline within
// it (or within MaxLineBytes, if larger) ends the connection.
const readBufSize = 4096

// Server answers memcached's text protocol on its listeners and serves
// keys from a Backend, with leases. Serve runs it; Drain stops it softly
// and Close hard. Its methods are safe for concurrent use.
type Server struct {
	cfg   Config
	be    Backend
	log   *zap.Logger
	l     *leaser
	st    *counters
	start time.Time
	// replies is the budget of multi-key retrievals' values
	// (Config.ReplyBytes).
	replies *budget

	draining atomic.Bool

	mu sync.Mutex // guards lns, conns, closed
	// lns are the listeners Serve accepts on.
	lns map[net.Listener]struct{}
	// conns are the open client connections.
	conns  map[*conn]struct{}
	closed bool

	connWG    sync.WaitGroup // connection handlers
	closeOnce sync.Once
}

// New validates cfg and returns a Server on be. log may be nil.
func New(cfg Config, be Backend, log *zap.Logger) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if be == nil {
		return nil, errors.Join(ErrConfig, errors.New("nil Backend"))
	}
	if log == nil {
		log = zap.NewNop()
	}
	st := newCounters()
	return &Server{
		cfg:     cfg,
		be:      be,
		log:     log,
		st:      st,
		l:       newLeaser(cfg.Lease, be, log, st),
		start:   time.Now(),
		replies: newBudget(cfg.ReplyBytes),
		lns:     make(map[net.Listener]struct{}),
		conns:   make(map[*conn]struct{}),
	}, nil
}

// Stats returns the server's figures.
func (s *Server) Stats() Stats { return s.st.snapshot() }

// Serve accepts connections on ln and serves them until Drain or Close
// closes ln (it then returns nil) or ctx is cancelled, which is a hard
// stop: Serve closes the server and returns ctx.Err(). Serve may be
// called for several listeners.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	s.mu.Lock()
	if s.closed || s.draining.Load() {
		s.mu.Unlock()
		_ = ln.Close()
		return nil
	}
	s.lns[ln] = struct{}{}
	s.mu.Unlock()

	stop := context.AfterFunc(ctx, func() { _ = s.Close() })
	defer stop()

	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if s.stopping() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Out of file descriptors and the like: wait and retry.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("accept failed", zap.Error(err), zap.Duration("retry_in", backoff))
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				return ctx.Err()
			}
			continue
		}
		backoff = 0
		s.accept(ctx, nc)
	}
}

func (s *Server) stopping() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed || s.draining.Load()
}

func (s *Server) accept(ctx context.Context, nc net.Conn) {
	if s.st.conns.Load() >= int64(s.cfg.MaxConns) {
		s.st.refusedConns.Add(1)
		s.log.Warn("connection refused: too many open", zap.Int("max_conns", s.cfg.MaxConns),
			zap.Stringer("remote", nc.RemoteAddr()))
		_ = nc.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = nc.Write([]byte(replyTooManyConns + "\r\n"))
		_ = nc.Close()
		return
	}
	c := &conn{s: s, nc: nc}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		_ = nc.Close()
		return
	}
	s.conns[c] = struct{}{}
	s.connWG.Add(1)
	s.mu.Unlock()
	s.st.conns.Add(1)
	s.st.totalConns.Add(1)
	go func() {
		defer s.connWG.Done()
		defer func() {
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
			s.st.conns.Add(-1)
			_ = nc.Close()
		}()
		c.serve(ctx)
	}()
}

// Drain is the soft stop: it stops accepting, lets every connection
// finish the command it is running, answers it, and closes it; an idle
// connection is closed at once. It waits for them until ctx is done,
// then closes what is left. Either way the server is closed when Drain
// returns; the error is ctx's if the drain did not finish in time.
func (s *Server) Drain(ctx context.Context) error {
	s.mu.Lock()
	s.draining.Store(true)
	for ln := range s.lns {
		_ = ln.Close()
	}
	for c := range s.conns {
		c.nudge()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() {
		s.connWG.Wait()
		close(done)
	}()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
	}
	_ = s.Close()
	return err
}

// Close is the hard stop: it closes the listeners and every connection,
// gives waiting readers a miss, and waits for the server's goroutines.
// It is safe to call twice. It does not close the Backend.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.draining.Store(true)
		for ln := range s.lns {
			_ = ln.Close()
		}
		for c := range s.conns {
			_ = c.nc.Close()
		}
		s.mu.Unlock()
		s.l.close()
	})
	s.connWG.Wait()
	s.l.close()
	return nil
}

// conn is one client connection.
type conn struct {
	s   *Server
	nc  net.Conn
	br  *bufio.Reader
	bw  *bufio.Writer
	out []byte // reply being built
	// long accumulates a line longer than the read buffer.
	long []byte
	// deadline is the read deadline set for the idle timeout.
	deadline time.Time
	// wdeadline is the write deadline set for the write timeout.
	wdeadline time.Time
	// werr is the first write to the client that failed: the connection
	// is closed.
	werr error
	// hdr holds a VALUE line being written.
	hdr []byte
	// leases are the leases this connection's client got and has not
	// filled (see bind), at most maxBindings.
	leases map[string]binding
}

// nudge wakes a connection blocked reading its next command, so that it
// sees the drain. (Its deadline field is left alone: the connection only
// needs to see draining once awake.)
func (c *conn) nudge() { _ = c.nc.SetReadDeadline(time.Now()) }

func (c *conn) serve(ctx context.Context) {
	cfg := &c.s.cfg
	c.br = bufio.NewReaderSize(c.nc, max(readBufSize, min(cfg.MaxLineBytes, 64<<10)))
	c.bw = bufio.NewWriterSize(c.nc, 16<<10)
	for {
		if c.werr != nil {
			c.writeFailed()
			return
		}
		if c.br.Buffered() == 0 {
			// One clock reading for both deadlines: the one of the idle
			// timeout may be a Gosched early, which its lazy renewal
			// absorbs.
			var now time.Time
			if cfg.IdleTimeout > 0 || cfg.WriteTimeout > 0 {
				now = time.Now()
			}
			if c.bw.Buffered() > 0 {
				c.renewWrite(now)
				if err := c.bw.Flush(); err != nil {
					c.werr = err
					c.writeFailed()
					return
				}
				// The client has only now got its reply: its next
				// request cannot be here yet. Let the other runnable
				// connections go first, so that the read below more often
				// finds it than fails with EAGAIN and parks (0.16 failed
				// reads per request instead of 0.68 under memcaslap; about
				// 2% more throughput, BENCHMARKS.md).
				runtime.Gosched()
			}
			// Order matters against Drain: deadline first, then the check,
			// so a drain that nudged before this deadline is still seen.
			// The idle deadline is renewed only when less than half of it
			// is left: an idle connection is closed after IdleTimeout/2 to
			// IdleTimeout, and the fast path skips a timer update.
			if cfg.IdleTimeout > 0 {
				if c.deadline.Sub(now) < cfg.IdleTimeout/2 {
					c.deadline = now.Add(cfg.IdleTimeout)
					_ = c.nc.SetReadDeadline(c.deadline)
				}
			}
			if c.s.draining.Load() {
				return
			}
		}
		first, err := c.br.Peek(1)
		if err != nil {
			c.readFailed(err, false)
			return
		}
		if first[0] == binaryMagic {
			c.s.st.protocolErrors.Add(1)
			c.s.log.Info("binary protocol client refused", zap.Stringer("remote", c.nc.RemoteAddr()))
			c.fail(replyBinary)
			return
		}
		line, err := c.readLine()
		if err != nil {
			var pe *ProtocolError
			if !errors.As(err, &pe) {
				c.readFailed(err, false)
				return
			}
			c.s.st.protocolErrors.Add(1)
			if pe.Close {
				c.fail(pe.Reply)
				return
			}
			c.write(appendLine(c.out[:0], pe.Reply))
			continue
		}
		cmd, err := ParseCommand(line, cfg.MaxValueBytes)
		if cap(c.long) > 64<<10 {
			c.long = nil
		}
		if err != nil {
			pe := err.(*ProtocolError)
			c.s.st.protocolErrors.Add(1)
			c.out = appendLine(c.out[:0], pe.Reply)
			if pe.Close {
				c.fail(pe.Reply)
				return
			}
			c.write(c.out)
			if pe.Swallow > 0 {
				if _, err := c.br.Discard(pe.Swallow); err != nil {
					c.readFailed(err, false)
					return
				}
			}
			continue
		}
		var value []byte
		if cmd.Op.IsStorage() || cmd.Op == OpMetaSet {
			value, err = c.readData(cmd.Bytes)
			if errors.Is(err, ErrBadDataChunk) {
				c.s.st.protocolErrors.Add(1)
				c.write(appendLine(c.out[:0], replyBadChunk))
				continue
			}
			if err != nil {
				c.readFailed(err, true)
				return
			}
		}
		if quit := c.exec(ctx, &cmd, value); quit {
			c.renewWrite(time.Now())
			_ = c.bw.Flush()
			return
		}
	}
}

// readFailed ends a connection whose read failed. A timeout in the middle
// of a data block is answered, so the client knows why it is closed.
func (c *conn) readFailed(err error, midBlock bool) {
	var ne net.Error
	if midBlock && errors.As(err, &ne) && ne.Timeout() && !c.s.draining.Load() {
		c.s.st.protocolErrors.Add(1)
		c.fail(replyBadChunk)
		return
	}
	c.renewWrite(time.Now())
	_ = c.bw.Flush()
	if !errors.Is(err, io.EOF) && !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, net.ErrClosed) {
		c.s.log.Debug("client read failed", zap.Error(err))
	}
}

// fail sends a last error line and gives up on the connection.
func (c *conn) fail(reply string) {
	_, _ = c.bw.Write(appendLine(c.out[:0], reply))
	_ = c.nc.SetWriteDeadline(time.Now().Add(time.Second))
	_ = c.bw.Flush()
}

// readLine returns the next command line, CRLF included. Its bytes are
// valid until the next read. A line over the limit is a *ProtocolError:
// recoverable when it ended (the stream is still in step), with Close set
// when no newline came within the limit.
func (c *conn) readLine() ([]byte, error) {
	line, err := c.br.ReadSlice('\n')
	if err == nil {
		return c.checkLength(line)
	}
	if !errors.Is(err, bufio.ErrBufferFull) {
		return nil, err
	}
	limit := c.lineLimit(line)
	c.long = append(c.long[:0], line...)
	for {
		if len(c.long) > limit+2 {
			return nil, &ProtocolError{Err: ErrLineTooLong, Reply: replyLineTooLong, Close: true}
		}
		more, err := c.br.ReadSlice('\n')
		c.long = append(c.long, more...)
		if err == nil {
			return c.checkLength(c.long)
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			return nil, err
		}
	}
}

// checkLength refuses a complete line over the limit.
func (c *conn) checkLength(line []byte) ([]byte, error) {
	if len(line) > c.lineLimit(line)+2 {
		return nil, protoErr(ErrLineTooLong, replyLineTooLong)
	}
	return line, nil
}

// lineLimit is the length limit of a line that starts with line.
func (c *conn) lineLimit(line []byte) int {
	for _, p := range [...]string{"get ", "gets ", "gat ", "gats "} {
		if len(line) >= len(p) && string(line[:len(p)]) == p {
			return c.s.cfg.MaxGetLineBytes
		}
	}
	return c.s.cfg.MaxLineBytes
}

// dataChunk is the most a data block's buffer holds before its bytes
// arrive: a client that announces a large block and sends nothing costs
// this much, not the block's length.
const dataChunk = 16 << 10

// readData reads a data block of n bytes and its CRLF. Its buffer grows
// as the bytes arrive (doubling, from dataChunk), so that it is never
// much larger than what the client sent.
func (c *conn) readData(n int) ([]byte, error) {
	if n+2 <= dataChunk {
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(c.br, buf); err != nil {
			return nil, err
		}
		return checkBlock(buf, n)
	}
	buf := make([]byte, 0, dataChunk)
	for len(buf) < n+2 {
		if len(buf) == cap(buf) {
			grown := make([]byte, len(buf), min(2*cap(buf), n+2))
			copy(grown, buf)
			buf = grown
		}
		m, err := c.br.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+m]
		if err != nil && len(buf) < n+2 {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
	}
	return checkBlock(buf, n)
}

func checkBlock(buf []byte, n int) ([]byte, error) {
	if buf[n] != '\r' || buf[n+1] != '\n' {
		return nil, ErrBadDataChunk
	}
	return buf[:n:n], nil
}

// write queues p for the client. A write that will reach the socket
// (p does not fit in the buffer) renews the write deadline first. A
// failed write is kept in werr, and later writes are dropped.
func (c *conn) write(p []byte) {
	if c.werr != nil {
		return
	}
	if len(p) > c.bw.Available() {
		c.renewWrite(time.Now())
	}
	if _, err := c.bw.Write(p); err != nil {
		c.werr = err
	}
}

// renewWrite renews the write deadline when less than half of
// WriteTimeout is left, so that the fast path skips a timer update.
func (c *conn) renewWrite(now time.Time) {
	wt := c.s.cfg.WriteTimeout
	if wt > 0 && c.wdeadline.Sub(now) < wt/2 {
		c.wdeadline = now.Add(wt)
		_ = c.nc.SetWriteDeadline(c.wdeadline)
	}
}

// writeFailed ends a connection whose write failed: a client that did not
// take its replies within WriteTimeout is counted and logged.
func (c *conn) writeFailed() {
	if errors.Is(c.werr, os.ErrDeadlineExceeded) {
		c.s.st.writeTimeouts.Add(1)
		c.s.log.Info("client closed: it did not read its replies", zap.Duration("write_timeout", c.s.cfg.WriteTimeout),
			zap.Stringer("remote", c.nc.RemoteAddr()))
		return
	}
	if !errors.Is(c.werr, net.ErrClosed) {
		c.s.log.Debug("client write failed", zap.Error(c.werr))
	}
}
