package lease

import (
	"bufio"
	"errors"
	"io"
	"net"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// readAll reads what the proxy sends until it closes the connection or
// stays silent for quiet.
func readAll(nc net.Conn, quiet time.Duration) (string, bool) {
	var sb strings.Builder
	buf := make([]byte, 4096)
	for {
		_ = nc.SetReadDeadline(time.Now().Add(quiet))
		n, err := nc.Read(buf)
		sb.Write(buf[:n])
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return sb.String(), false
			}
			return sb.String(), true // closed
		}
	}
}

// readReply reads until the proxy has sent at least len(want) bytes, closed
// the connection, or max has passed, then for a short quiet time more, to
// catch extra bytes. Waiting for the expected length rather than for
// silence keeps a slow (shared, loaded) machine from cutting a reply.
func readReply(nc net.Conn, want string, max time.Duration) (string, bool) {
	var sb strings.Builder
	buf := make([]byte, 4096)
	deadline := time.Now().Add(max)
	for sb.Len() < len(want) {
		_ = nc.SetReadDeadline(deadline)
		n, err := nc.Read(buf)
		sb.Write(buf[:n])
		if err != nil {
			var ne net.Error
			return sb.String(), !(errors.As(err, &ne) && ne.Timeout())
		}
	}
	rest, closed := readAll(nc, 100*time.Millisecond)
	return sb.String() + rest, closed
}

// TestBadInput sends bad input and checks the reply, and whether the
// connection is closed or still answers.
func TestBadInput(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 1)
	cfg := testConfig()
	cfg.IdleTimeout = 2 * time.Second
	p := startProxy(t, cfg, addrs)
	long := strings.Repeat("x", 10<<10)
	tests := []struct {
		name   string
		send   string
		want   string
		closed bool
	}{
		{"garbage", "hello world\r\n", "ERROR\r\n", false},
		{"empty line", "\r\n", "ERROR\r\n", false},
		{"binary protocol", "\x80\x01\x00\x03\x00\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00foo",
			replyBinary + "\r\n", true},
		{"10 KB line without newline", long, "CLIENT_ERROR line too long\r\n", true},
		{"3 KB line with newline", "set " + long[:3000] + "\r\n", "CLIENT_ERROR line too long\r\n", false},
		{"negative length", "set k 0 0 -1\r\n", "CLIENT_ERROR bad command line format\r\n", false},
		{"length larger than the data sent", "set k 0 0 10\r\nabc\r\n", "CLIENT_ERROR bad data chunk\r\n", true},
		{"data longer than the length", "set k 0 0 10\r\nabc\r\nget foo\r\n", "CLIENT_ERROR bad data chunk\r\nERROR\r\n", false},
		{"value too large", "set k 0 0 2000000\r\n" + strings.Repeat("v", 2000000) + "\r\n",
			"SERVER_ERROR object too large for cache\r\n", false},
		{"key too long", "get " + strings.Repeat("k", 251) + "\r\n", "CLIENT_ERROR bad command line format\r\n", false},
		{"key too long in set (data swallowed)", "set " + strings.Repeat("k", 251) + " 0 0 5\r\nhello\r\n",
			"CLIENT_ERROR bad command line format\r\n", false},
		{"NUL in key", "get a\x00b\r\n", "CLIENT_ERROR bad command line format\r\n", false},
		{"get without key", "get\r\n", "ERROR\r\n", false},
		{"too many tokens", "set k 0 0 1 2 3 4\r\n", "ERROR\r\n", false},
		{"bad flags", "set k x 0 1\r\na\r\n", "CLIENT_ERROR bad command line format\r\n", false},
		{"flags over 32 bits", "set k 4294967296 0 1\r\na\r\n", "CLIENT_ERROR bad command line format\r\n", false},
		{"bad delta", "incr k abc\r\n", "CLIENT_ERROR invalid numeric delta argument\r\n", false},
		{"bad exptime", "touch k soon\r\n", "CLIENT_ERROR invalid exptime argument\r\n", false},
		{"bad delete", "delete k 5\r\n", replyBadDelete + "\r\n", false},
		{"bad meta", "mg\r\n", "CLIENT_ERROR bad command line format\r\n", false},
		{"unknown stats group", "stats slabs\r\n", "ERROR\r\n", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nc, err := net.Dial("tcp", p.Addr)
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			if _, err := io.WriteString(nc, tt.send); err != nil {
				t.Fatal(err)
			}
			got, closed := readReply(nc, tt.want, 10*time.Second)
			if got != tt.want {
				t.Errorf("got reply %q; want %q", got, tt.want)
			}
			if tt.closed && !closed {
				// Closed at once, or after the idle timeout.
				_, closed = readAll(nc, 10*time.Second)
			}
			if closed != tt.closed {
				t.Errorf("got closed %v; want %v", closed, tt.closed)
			}
			if !closed {
				// The connection is still in step.
				_, _ = io.WriteString(nc, "version\r\n")
				want := "VERSION " + cfg.Version + "\r\n"
				if got, _ := readReply(nc, want, 10*time.Second); got != want {
					t.Errorf("after the bad input: got %q; want the version", got)
				}
			}
		})
	}
	if p.Stats().ProtocolErrors == 0 {
		t.Error("got 0 protocol errors counted; want some")
	}
}

// TestMaxConns: beyond MaxConns a connection is refused with a clear
// error; once one closes, a new one is served.
func TestMaxConns(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 1)
	cfg := testConfig()
	cfg.MaxConns = 2
	p := startProxy(t, cfg, addrs)
	a, b := dial(t, p.Addr), dial(t, p.Addr)
	for _, c := range []*client{a, b} {
		if got := c.do("version"); !strings.HasPrefix(got, "VERSION ") {
			t.Fatalf("got %q; want VERSION", got)
		}
	}
	nc, err := net.Dial("tcp", p.Addr)
	if err != nil {
		t.Fatal(err)
	}
	got, closed := readAll(nc, 5*time.Second)
	nc.Close()
	if got != replyTooManyConns+"\r\n" || !closed {
		t.Errorf("third connection: got %q, closed %v; want %q and closed", got, closed, replyTooManyConns)
	}
	a.send("quit\r\n")
	if _, err := a.br.ReadByte(); err == nil {
		t.Fatal("quit: connection still open")
	}
	for p.Stats().Conns > 1 {
		time.Sleep(time.Millisecond)
	}
	if got := dial(t, p.Addr).do("version"); !strings.HasPrefix(got, "VERSION ") {
		t.Errorf("after a slot freed: got %q; want VERSION", got)
	}
	if s := p.Stats(); s.RefusedConns != 1 {
		t.Errorf("got %d refused connections; want 1", s.RefusedConns)
	}
}

// TestIdleTimeout: an idle connection is closed.
func TestIdleTimeout(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 1)
	cfg := testConfig()
	cfg.IdleTimeout = 100 * time.Millisecond
	p := startProxy(t, cfg, addrs)
	c := dial(t, p.Addr)
	c.do("version")
	if _, err := c.br.ReadByte(); !errors.Is(err, io.EOF) {
		t.Errorf("got %v; want EOF after the idle timeout", err)
	}
}

// casRE matches a CAS value in an expected reply.
var casRE = regexp.MustCompile(`<cas>`)

// exchange is one step of a protocol script: what to send and what must
// come back (<cas> stands for any CAS value).
type exchange struct {
	send, want string
}

func runScript(t *testing.T, c *client, script []exchange) {
	t.Helper()
	for _, x := range script {
		c.send(x.send)
		want := regexp.MustCompile("^" + casRE.ReplaceAllString(regexp.QuoteMeta(x.want), `[0-9]+`) + "$")
		var got strings.Builder
		for !want.MatchString(got.String()) && got.Len() < len(x.want)+64 {
			_ = c.nc.SetReadDeadline(time.Now().Add(2 * time.Second))
			l, err := c.br.ReadString('\n')
			got.WriteString(l)
			if err != nil {
				break
			}
		}
		if !want.MatchString(got.String()) {
			t.Errorf("sent %q: got %q; want %q", x.send, got.String(), x.want)
		}
	}
}

// TestCommands runs every text-protocol command through the proxy to real
// memcached.
func TestCommands(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 2)
	p := startProxy(t, testConfig(), addrs)
	c := dial(t, p.Addr)
	runScript(t, c, []exchange{
		{"set a 5 0 1\r\nA\r\n", "STORED\r\n"},
		{"set b 6 0 2\r\nBB\r\n", "STORED\r\n"},
		{"set c 0 0 0\r\n\r\n", "STORED\r\n"},
		{"get b nosuch a c\r\n", "VALUE b 6 2\r\nBB\r\nVALUE a 5 1\r\nA\r\nVALUE c 0 0\r\n\r\nEND\r\n"},
		{"gets a\r\n", "VALUE a 5 1 <cas>\r\nA\r\nEND\r\n"},
		{"cas a 7 0 1 999999\r\nX\r\n", "EXISTS\r\n"},
		{"cas nosuch2 0 0 1 99\r\nX\r\n", "NOT_FOUND\r\n"},
		{"add a 0 0 1\r\nZ\r\n", "NOT_STORED\r\n"},
		{"add d 0 0 1\r\nD\r\n", "STORED\r\n"},
		{"replace d 1 0 2\r\nDD\r\n", "STORED\r\n"},
		{"replace nosuch3 0 0 1\r\nX\r\n", "NOT_STORED\r\n"},
		{"append d 0 0 1\r\n>\r\n", "STORED\r\n"},
		{"prepend d 0 0 1\r\n<\r\n", "STORED\r\n"},
		{"get d\r\n", "VALUE d 1 4\r\n<DD>\r\nEND\r\n"},
		{"append nosuch4 0 0 1\r\nX\r\n", "NOT_STORED\r\n"},
		{"set n 0 0 2\r\n10\r\n", "STORED\r\n"},
		{"incr n 5\r\n", "15\r\n"},
		{"decr n 100\r\n", "0\r\n"},
		{"incr n 0\r\n", "0\r\n"},
		{"incr nosuch5 1\r\n", "NOT_FOUND\r\n"},
		{"incr a 1\r\n", "CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"},
		{"touch a 100\r\n", "TOUCHED\r\n"},
		{"touch nosuch6 100\r\n", "NOT_FOUND\r\n"},
		{"gat 100 a b\r\n", "VALUE a 5 1\r\nA\r\nVALUE b 6 2\r\nBB\r\nEND\r\n"},
		{"gats 0 a\r\n", "VALUE a 5 1 <cas>\r\nA\r\nEND\r\n"},
		{"delete a\r\n", "DELETED\r\n"},
		{"delete a\r\n", "NOT_FOUND\r\n"},
		{"delete b 0\r\n", "DELETED\r\n"},
		{"version\r\n", "VERSION 1.6.18-leaseproxy\r\n"},
		{"verbosity 1\r\n", "OK\r\n"},
		// A miss leaves the empty item of a lease in memcached: commands
		// that need an existing item see the key as absent.
		{"get leased\r\n", "END\r\n"},
		{"replace leased 0 0 1\r\nX\r\n", "NOT_STORED\r\n"},
		{"append leased 0 0 1\r\nX\r\n", "NOT_STORED\r\n"},
		{"prepend leased 0 0 1\r\nX\r\n", "NOT_STORED\r\n"},
		{"incr leased 1\r\n", "NOT_FOUND\r\n"},
		{"touch leased 10\r\n", "NOT_FOUND\r\n"},
		{"delete leased\r\n", "NOT_FOUND\r\n"},
		{"get leased\r\n", "END\r\n"},
		{"set leased 0 0 1\r\nL\r\n", "STORED\r\n"},
		{"get leased\r\n", "VALUE leased 0 1\r\nL\r\nEND\r\n"},
		// noreply everywhere: only the version after them answers.
		{"set q 0 0 1 noreply\r\nQ\r\nadd q 0 0 1 noreply\r\nX\r\nreplace q 0 0 1 noreply\r\nR\r\n" +
			"append q 0 0 1 noreply\r\n+\r\nprepend q 0 0 1 noreply\r\n-\r\ncas q 0 0 1 1 noreply\r\nX\r\n" +
			"set qn 0 0 1 noreply\r\n1\r\nincr qn 2 noreply\r\ndecr qn 1 noreply\r\ntouch q 100 noreply\r\n" +
			"delete nosuch7 noreply\r\nverbosity 1 noreply\r\nflush_all 100 noreply\r\nversion\r\n",
			"VERSION 1.6.18-leaseproxy\r\n"},
		{"get q qn\r\n", "VALUE q 0 3\r\n-R+\r\nVALUE qn 0 1\r\n2\r\nEND\r\n"},
		// keys with control bytes (memcaslap's) go to memcached in base64
		{"set \x10\x10ctl 3 0 1\r\nC\r\n", "STORED\r\n"},
		{"get \x10\x10ctl\r\n", "VALUE \x10\x10ctl 3 1\r\nC\r\nEND\r\n"},
		{"get \x10\x10ctl2\r\n", "END\r\n"},
		{"set \x10\x10ctl2 0 0 1\r\nD\r\n", "STORED\r\n"},
		{"incr \x10\x10ctl 1\r\n", "CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"},
		{"delete \x10\x10ctl\r\n", "DELETED\r\n"},
		{"get \x10\x10ctl \x10\x10ctl2\r\n", "VALUE \x10\x10ctl2 0 1\r\nD\r\nEND\r\n"},
		// meta passthrough
		{"ms m 2 F3 T0\r\nhi\r\n", "HD\r\n"},
		{"mg m v f k\r\n", "VA 2 f3 km\r\nhi\r\n"},
		{"mg m s t\r\n", "HD s2 t-1\r\n"},
		{"mg nosuch8 v q\r\nmn\r\n", "MN\r\n"},
		{"mg nosuch8 v\r\n", "EN\r\n"},
		{"ma cnt N0 J5 v\r\n", "VA 1\r\n5\r\n"},
		{"md m q\r\nmn\r\n", "MN\r\n"},
		{"md m\r\n", "NF\r\n"},
		{"mn\r\n", "MN\r\n"},
		{"flush_all\r\n", "OK\r\n"},
		{"get q qn d\r\n", "END\r\n"},
	})
	c.send("stats\r\n")
	seen := map[string]string{}
	for {
		l := c.line()
		if l == "END" {
			break
		}
		f := strings.Fields(l)
		if len(f) != 3 || f[0] != "STAT" {
			t.Fatalf("stats: got line %q; want STAT <name> <value>", l)
		}
		seen[f[1]] = f[2]
	}
	for _, name := range []string{"pid", "uptime", "curr_connections", "cmd_get", "get_hits", "lease_wins", "lease_refused_fills"} {
		if _, ok := seen[name]; !ok {
			t.Errorf("stats: no %s", name)
		}
	}
	if n, _ := strconv.Atoi(seen["get_hits"]); n < 5 {
		t.Errorf("stats: got get_hits %d; want at least 5", n)
	}
	c.send("quit\r\n")
	if _, err := c.br.ReadByte(); err == nil {
		t.Error("quit: connection still open")
	}
}

// TestFlushRefused: with FlushRefuse, flush_all is answered with an error
// and nothing is flushed.
func TestFlushRefused(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 1)
	cfg := testConfig()
	cfg.FlushAll = FlushRefuse
	p := startProxy(t, cfg, addrs)
	runScript(t, dial(t, p.Addr), []exchange{
		{"set a 0 0 1\r\nA\r\n", "STORED\r\n"},
		{"flush_all\r\n", replyFlushRefused + "\r\n"},
		{"get a\r\n", "VALUE a 0 1\r\nA\r\nEND\r\n"},
	})
}

// TestDeadServer: a dead server costs only its own keys (a fast miss or
// error); keys on the other server are served.
func TestDeadServer(t *testing.T) {
	addrs, mcs := memcachedAddrs(t, 2)
	p := startProxy(t, testConfig(), addrs)
	c := dial(t, p.Addr)
	// One key on each server.
	var onDead, onLive string
	for i := 0; onDead == "" || onLive == ""; i++ {
		k := "k" + strconv.Itoa(i)
		if p.Pool.Pick(k) == 0 {
			onDead = k
		} else {
			onLive = k
		}
	}
	runScript(t, c, []exchange{
		{"set " + onLive + " 0 0 1\r\nL\r\n", "STORED\r\n"},
		{"set " + onDead + " 0 0 1\r\nD\r\n", "STORED\r\n"},
	})
	if err := mcs[0].Kill(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		vs, err := c.get("get " + onDead + " " + onLive)
		if err != nil {
			t.Fatal(err)
		}
		if len(vs) != 1 || vs[0].key != onLive || vs[0].data != "L" {
			t.Fatalf("get with a dead server: got %+v; want only %s=L", vs, onLive)
		}
	}
	if got := c.set(onDead, "x"); !strings.HasPrefix(got, "SERVER_ERROR ") {
		t.Errorf("set on the dead server: got %q; want SERVER_ERROR", got)
	}
	if got := c.set(onLive, "y"); got != "STORED" {
		t.Errorf("set on the live server: got %q; want STORED", got)
	}
}

// TestMemccapable runs libmemcached's memccapable ASCII tests against the
// proxy. Its binary tests are skipped (-a): the proxy refuses the binary
// protocol by design.
func TestMemccapable(t *testing.T) {
	bin, err := exec.LookPath("memccapable")
	if err != nil {
		t.Fatalf("memccapable not found (install libmemcached-tools): %v", err)
	}
	addrs, _ := memcachedAddrs(t, 2)
	p := startProxy(t, testConfig(), addrs)
	host, port, _ := net.SplitHostPort(p.Addr)
	out, err := exec.Command(bin, "-a", "-v", "-t", "10", "-h", host, "-p", port).CombinedOutput()
	passed := 0
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		l := sc.Text()
		switch {
		case strings.HasSuffix(l, "[pass]"):
			passed++
		case strings.Contains(l, "[FAIL]") || strings.Contains(l, "[fail]"):
			t.Errorf("memccapable: %s", l)
		}
	}
	if err != nil || passed == 0 {
		t.Errorf("memccapable: %v; %d passed; output:\n%s", err, passed, out)
	}
	t.Logf("memccapable -a: %d tests passed", passed)
}
