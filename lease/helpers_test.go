package lease

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/testenv"
)

// proxy is one Server under test, listening on Addr.
type proxy struct {
	*Server
	Addr string
	Pool *mcpool.Pool
}

// startProxy starts a Server on a fresh pool of servers and stops both
// when the test ends.
func startProxy(t testing.TB, cfg Config, servers []string) *proxy {
	t.Helper()
	pcfg := mcpool.DefaultConfig()
	pcfg.Servers = servers
	pcfg.Timeout = 5 * time.Second
	pool, err := mcpool.New(pcfg, zaptest.NewLogger(t).Named("mcpool"))
	if err != nil {
		t.Fatalf("mcpool.New: %v", err)
	}
	// Wait for every server's connections, so that a test's first request
	// does not race the pool's first dials.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		up := 0
		for _, st := range pool.Stats() {
			if st.Conns == pcfg.ConnsPerServer {
				up++
			}
		}
		if up == len(servers) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("mcpool: servers not connected after 10s: %+v", pool.Stats())
		}
	}
	p := startProxyOn(t, cfg, NewPoolBackend(pool))
	p.Pool = pool
	t.Cleanup(func() { _ = pool.Close() }) // runs after the server's Close
	return p
}

// startProxyOn starts a Server on be.
func startProxyOn(t testing.TB, cfg Config, be Backend) *proxy {
	t.Helper()
	var log = zaptest.NewLogger(t).Named("lease")
	if _, ok := t.(*testing.B); ok {
		log = nil
	}
	s, err := New(cfg, be, log)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background(), ln) }()
	t.Cleanup(func() {
		_ = s.Close()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return &proxy{Server: s, Addr: ln.Addr().String()}
}

func memcachedAddrs(t testing.TB, n int) ([]string, []*testenv.Memcached) {
	t.Helper()
	mcs := testenv.NewMemcacheds(t, n)
	addrs := make([]string, len(mcs))
	for i, m := range mcs {
		addrs[i] = m.Addr
	}
	return addrs, mcs
}

// testConfig is DefaultConfig with generous waits: tests must not depend
// on how fast a loaded machine schedules.
func testConfig() Config {
	cfg := DefaultConfig()
	cfg.FlushAll = FlushForward
	cfg.Lease.TTL = 10 * time.Second
	cfg.Lease.Wait = 30 * time.Second
	return cfg
}

// client speaks the text protocol to a proxy.
type client struct {
	t  testing.TB
	nc net.Conn
	br *bufio.Reader
}

func dial(t testing.TB, addr string) *client {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { _ = nc.Close() })
	_ = nc.SetDeadline(time.Now().Add(2 * time.Minute))
	return &client{t: t, nc: nc, br: bufio.NewReader(nc)}
}

func (c *client) send(s string) {
	c.t.Helper()
	if _, err := io.WriteString(c.nc, s); err != nil {
		c.t.Fatalf("send %q: %v", s, err)
	}
}

func (c *client) line() string {
	c.t.Helper()
	l, err := c.br.ReadString('\n')
	if err != nil {
		c.t.Fatalf("read line: %v (got %q)", err, l)
	}
	return strings.TrimSuffix(l, "\r\n")
}

// do sends one command line and returns the first reply line.
func (c *client) do(cmd string) string {
	c.t.Helper()
	c.send(cmd + "\r\n")
	return c.line()
}

// set stores value and returns the reply line.
func (c *client) set(key, value string) string {
	c.t.Helper()
	return c.do(fmt.Sprintf("set %s 0 0 %d\r\n%s", key, len(value), value))
}

// value is one VALUE of a retrieval reply.
type value struct {
	key   string
	flags uint32
	data  string
	cas   uint64
}

// get sends a retrieval line and reads the reply up to END.
func (c *client) get(line string) ([]value, error) {
	c.send(line + "\r\n")
	return readValues(c.br)
}

func readValues(br *bufio.Reader) ([]value, error) {
	var out []value
	for {
		l, err := br.ReadString('\n')
		if err != nil {
			return out, err
		}
		l = strings.TrimSuffix(l, "\r\n")
		if l == "END" {
			return out, nil
		}
		f := strings.Fields(l)
		if len(f) < 4 || f[0] != "VALUE" {
			return out, fmt.Errorf("unexpected line %q", l)
		}
		flags, _ := strconv.ParseUint(f[2], 10, 32)
		n, err := strconv.Atoi(f[3])
		if err != nil {
			return out, fmt.Errorf("bad length in %q", l)
		}
		v := value{key: f[1], flags: uint32(flags)}
		if len(f) > 4 {
			v.cas, _ = strconv.ParseUint(f[4], 10, 64)
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(br, buf); err != nil {
			return out, err
		}
		if string(buf[n:]) != "\r\n" {
			return out, errors.New("value not followed by CRLF")
		}
		v.data = string(buf[:n])
		out = append(out, v)
	}
}

// get1 reads one key: its value and whether it was found.
func (c *client) get1(key string) (string, bool) {
	c.t.Helper()
	vs, err := c.get("get " + key)
	if err != nil {
		c.t.Fatalf("get %s: %v", key, err)
	}
	if len(vs) == 0 {
		return "", false
	}
	return vs[0].data, true
}
