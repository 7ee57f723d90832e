package testenv

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Link is a TCP proxy in front of one network link between datacenters (a
// NATS gateway connection, a replica's replication connection). Cut drops
// every connection and refuses new ones until Heal; SetLatency delays every
// chunk of data in both directions.
type Link struct {
	Name   string
	Addr   string // where clients connect: 127.0.0.1:port
	Target string // where the link leads

	ln net.Listener
	wg sync.WaitGroup

	mu      sync.Mutex // guards cut, latency, conns, closed
	cut     bool
	latency time.Duration
	conns   map[net.Conn]struct{}
	closed  bool
}

// StartLink listens on a free loopback port and forwards to target.
func StartLink(name, target string) (*Link, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("link %s: %w", name, err)
	}
	l := &Link{Name: name, Addr: ln.Addr().String(), Target: target, ln: ln, conns: map[net.Conn]struct{}{}}
	l.wg.Add(1)
	go l.accept()
	return l, nil
}

func (l *Link) accept() {
	defer l.wg.Done()
	for {
		c, err := l.ln.Accept()
		if err != nil {
			return
		}
		l.mu.Lock()
		if l.cut || l.closed {
			l.mu.Unlock()
			c.Close()
			continue
		}
		l.mu.Unlock()
		l.wg.Add(1)
		go l.serve(c)
	}
}

func (l *Link) serve(in net.Conn) {
	defer l.wg.Done()
	out, err := net.DialTimeout("tcp", l.Target, 2*time.Second)
	if err != nil {
		in.Close()
		return
	}
	if !l.track(in, out) {
		in.Close()
		out.Close()
		return
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); l.pipe(out, in) }()
	go func() { defer wg.Done(); l.pipe(in, out) }()
	wg.Wait()
	l.untrack(in, out)
}

func (l *Link) track(cs ...net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cut || l.closed {
		return false
	}
	for _, c := range cs {
		l.conns[c] = struct{}{}
	}
	return true
}

func (l *Link) untrack(cs ...net.Conn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range cs {
		delete(l.conns, c)
	}
}

type chunk struct {
	at   time.Time
	data []byte
}

// pipe copies src to dst; with latency each chunk is held until its time.
// Either side closing closes both.
func (l *Link) pipe(dst, src net.Conn) {
	defer dst.Close()
	defer src.Close()
	q := make(chan chunk, 256)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for c := range q {
			if d := time.Until(c.at.Add(l.Latency())); d > 0 {
				time.Sleep(d)
			}
			if _, err := dst.Write(c.data); err != nil {
				src.Close()
				for range q { //nolint:revive // drain so the reader is not stuck
				}
				return
			}
		}
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			q <- chunk{at: time.Now(), data: append([]byte(nil), buf[:n]...)}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				dst.Close()
			}
			break
		}
	}
	close(q)
	<-done
}

// Cut drops all connections through the link and refuses new ones.
func (l *Link) Cut() {
	l.mu.Lock()
	l.cut = true
	conns := make([]net.Conn, 0, len(l.conns))
	for c := range l.conns {
		conns = append(conns, c)
	}
	l.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

// Heal lets connections through again.
func (l *Link) Heal() {
	l.mu.Lock()
	l.cut = false
	l.mu.Unlock()
}

// IsCut reports whether the link is cut.
func (l *Link) IsCut() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.cut
}

// SetLatency delays data in each direction by d (0 removes the delay).
func (l *Link) SetLatency(d time.Duration) {
	l.mu.Lock()
	l.latency = d
	l.mu.Unlock()
}

// Latency is the delay set by SetLatency.
func (l *Link) Latency() time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.latency
}

// Conns is the number of connections open through the link.
func (l *Link) Conns() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.conns) / 2
}

// Close stops the listener, drops every connection and waits for its
// goroutines. It is safe to call twice.
func (l *Link) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	l.mu.Unlock()
	l.ln.Close()
	l.Cut()
	l.wg.Wait()
	return nil
}
