package mcpool

import (
	"bufio"
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"
)

// fakeServer accepts one connection and hands it to the test, which plays
// memcached by hand.
func fakeServer(t *testing.T) (addr string, conns <-chan net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			ch <- c
		}
	}()
	t.Cleanup(func() { l.Close() })
	return l.Addr().String(), ch
}

func dialFake(t *testing.T, cfg ConnConfig) (*Conn, net.Conn, *bufio.Reader) {
	t.Helper()
	addr, conns := fakeServer(t)
	c, err := Dial(testCtx(t), addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	srv := <-conns
	t.Cleanup(func() { srv.Close() })
	return c, srv, bufio.NewReader(srv)
}

func readLineT(t *testing.T, br *bufio.Reader) string {
	t.Helper()
	line, err := br.ReadString('\n')
	if err != nil {
		t.Fatalf("server read: %v", err)
	}
	return strings.TrimSuffix(line, "\r\n")
}

type got struct {
	resp Response
	err  error
}

func goGet(c *Conn, ctx context.Context, key string, flags ...string) <-chan got {
	ch := make(chan got, 1)
	go func() {
		r, err := c.MetaGet(ctx, key, flags...)
		ch <- got{r, err}
	}()
	return ch
}

// TestConnBrokenMidFlight: the server reads two requests, answers one and
// drops the connection; the other fails with ErrServerDown and the
// connection reports why.
func TestConnBrokenMidFlight(t *testing.T) {
	c, srv, br := dialFake(t, DefaultConnConfig())
	ctx := testCtx(t)
	a := goGet(c, ctx, "a", "v")
	if l := readLineT(t, br); l != "mg a v" {
		t.Fatalf("server got %q; want %q", l, "mg a v")
	}
	b := goGet(c, ctx, "b", "v")
	if l := readLineT(t, br); l != "mg b v" {
		t.Fatalf("server got %q; want %q", l, "mg b v")
	}
	if _, err := srv.Write([]byte("VA 1\r\nx\r\n")); err != nil {
		t.Fatal(err)
	}
	if r := <-a; r.err != nil || string(r.resp.Value) != "x" {
		t.Fatalf("a got %+v, %v; want VA x", r.resp, r.err)
	}
	srv.Close()
	if r := <-b; !errors.Is(r.err, ErrServerDown) || !Retryable(r.err) {
		t.Fatalf("b got %v; want ErrServerDown", r.err)
	}
	<-c.Done()
	if !errors.Is(c.Err(), ErrServerDown) {
		t.Fatalf("Err got %v; want ErrServerDown", c.Err())
	}
	if _, err := c.MetaGet(ctx, "c"); !errors.Is(err, ErrServerDown) {
		t.Fatalf("mg on a broken conn got %v; want ErrServerDown", err)
	}
}

// TestConnGarbage: a response that is not meta protocol breaks the
// connection with ErrProtocol, and so does data nobody asked for.
func TestConnGarbage(t *testing.T) {
	for _, tt := range []struct {
		name, reply string
		ask         bool
	}{
		{"text protocol reply", "VALUE a 0 1\r\nx\r\nEND\r\n", true},
		{"oversized value", "VA 2048\r\n", true},
		{"unsolicited", "HD\r\n", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c, srv, br := dialFake(t, ConnConfig{MaxInFlight: 4, IOTimeout: 10 * time.Second, MaxValueSize: 1024})
			ctx := testCtx(t)
			var a <-chan got
			if tt.ask {
				a = goGet(c, ctx, "a", "v")
				readLineT(t, br)
			}
			if _, err := srv.Write([]byte(tt.reply)); err != nil {
				t.Fatal(err)
			}
			if a != nil {
				if r := <-a; !errors.Is(r.err, ErrProtocol) || !errors.Is(r.err, ErrServerDown) {
					t.Fatalf("got %+v, %v; want ErrProtocol", r.resp, r.err)
				}
			}
			<-c.Done()
			if !errors.Is(c.Err(), ErrProtocol) {
				t.Fatalf("Err got %v; want ErrProtocol", c.Err())
			}
		})
	}
}

// TestConnMaxInFlight: with MaxInFlight 2 and a silent server, a third
// request waits, times out without being sent, and the pipeline stays in
// step when the server answers the first two.
func TestConnMaxInFlight(t *testing.T) {
	c, srv, br := dialFake(t, ConnConfig{MaxInFlight: 2, IOTimeout: 10 * time.Second, MaxValueSize: 1024})
	ctx := testCtx(t)
	a := goGet(c, ctx, "a")
	b := goGet(c, ctx, "b")
	seen := map[string]bool{readLineT(t, br): true, readLineT(t, br): true}
	if !seen["mg a"] || !seen["mg b"] {
		t.Fatalf("server got %v; want mg a and mg b", seen)
	}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if _, err := c.MetaGet(short, "third"); !errors.Is(err, ErrTimeout) {
		t.Fatalf("third request got %v; want ErrTimeout", err)
	}
	if n := c.InFlight(); n != 2 {
		t.Fatalf("InFlight got %d; want 2", n)
	}
	if _, err := srv.Write([]byte("HD kone\r\nHD ktwo\r\n")); err != nil {
		t.Fatal(err)
	}
	ra, rb := <-a, <-b
	if ra.err != nil || rb.err != nil || ra.resp.Key+rb.resp.Key != "onetwo" && ra.resp.Key+rb.resp.Key != "twoone" {
		t.Fatalf("got %+v %v / %+v %v", ra.resp, ra.err, rb.resp, rb.err)
	}
	d := goGet(c, ctx, "d")
	if l := readLineT(t, br); l != "mg d" {
		t.Fatalf("server got %q after the timed-out request; want %q (the third was never sent)", l, "mg d")
	}
	srv.Write([]byte("EN\r\n"))
	if r := <-d; r.err != nil || r.resp.Status != StatusEN {
		t.Fatalf("d got %+v, %v; want EN", r.resp, r.err)
	}
}

// TestConnCloseInFlight: Close fails requests in flight with ErrClosed,
// waits for its goroutines, and can be called twice.
func TestConnCloseInFlight(t *testing.T) {
	c, _, br := dialFake(t, DefaultConnConfig())
	a := goGet(c, context.Background(), "a")
	readLineT(t, br)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if r := <-a; !errors.Is(r.err, ErrClosed) || Retryable(r.err) {
		t.Fatalf("got %v; want ErrClosed", r.err)
	}
	if _, err := c.MetaGet(context.Background(), "b"); !errors.Is(err, ErrClosed) {
		t.Fatalf("mg after Close got %v; want ErrClosed", err)
	}
}

// TestConnIOTimeout: a server that reads but never answers is detected by
// IOTimeout even when the request has no deadline.
func TestConnIOTimeout(t *testing.T) {
	c, _, br := dialFake(t, ConnConfig{MaxInFlight: 4, IOTimeout: 100 * time.Millisecond, MaxValueSize: 1024})
	a := goGet(c, context.Background(), "a")
	readLineT(t, br)
	if r := <-a; !errors.Is(r.err, ErrServerDown) {
		t.Fatalf("got %v; want ErrServerDown", r.err)
	}
}

func TestBuildRequests(t *testing.T) {
	tests := []struct {
		name string
		r    *request
		want string
	}{
		{"mg", buildGet("k", []string{"v", "c", "N30"}), "mg k v c N30\r\n"},
		{"mg quiet", buildGet("k", []string{"v", "q"}), "mg k v q\r\nmn\r\n"},
		{"ms", buildSet("k", []byte("hi"), SetOptions{Mode: 'E', CAS: 7, TTL: 1500 * time.Millisecond, ClientFlags: 3, Invalidate: true, ReturnCAS: true, Flags: []string{"O1"}}, 100),
			"ms k 2 ME C7 T2 F3 I c O1\r\nhi\r\n"},
		{"ms plain", buildSet("k", nil, SetOptions{}, 100), "ms k 0\r\n\r\n"},
		{"ms expired", buildSet("k", nil, SetOptions{TTL: -time.Second}, 100), "ms k 0 T-1\r\n\r\n"},
		{"md", buildDelete("k", DeleteOptions{}), "md k\r\n"},
		{"md stale", buildDelete("k", DeleteOptions{Invalidate: true, TTL: 30 * time.Second, Quiet: true}), "md k I T30 q\r\nmn\r\n"},
		{"md ttl without I", buildDelete("k", DeleteOptions{TTL: time.Second}), "md k\r\n"},
		{"ma", buildArithmetic("k", ArithmeticOptions{Decrement: true, Delta: 5, Create: true, CreateTTL: time.Minute, Initial: 9, TTL: time.Second, CAS: 4}),
			"ma k v MD D5 N60 J9 T1 C4\r\n"},
		{"ma default", buildArithmetic("k", ArithmeticOptions{}), "ma k v\r\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.r.err != nil || string(tt.r.buf) != tt.want {
				t.Fatalf("got %q, %v; want %q", tt.r.buf, tt.r.err, tt.want)
			}
		})
	}
	for _, tt := range []struct {
		name string
		r    *request
		err  error
	}{
		{"empty key", buildGet("", nil), ErrBadKey},
		{"long key", buildGet(strings.Repeat("k", 251), nil), ErrBadKey},
		{"space in key", buildGet("a b", nil), ErrBadKey},
		{"newline in key", buildDelete("a\r\nmd b", DeleteOptions{}), ErrBadKey},
		{"empty flag", buildGet("k", []string{""}), ErrBadRequest},
		{"flag with space", buildGet("k", []string{"v c"}), ErrBadRequest},
		{"flag with CRLF", buildGet("k", []string{"v\r\nmd"}), ErrBadRequest},
		{"flag not a letter", buildGet("k", []string{"1"}), ErrBadRequest},
		{"value too large", buildSet("k", make([]byte, 101), SetOptions{}, 100), ErrBadRequest},
		{"bad mode", buildSet("k", nil, SetOptions{Mode: 'Z'}, 100), ErrBadRequest},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if !errors.Is(tt.r.err, tt.err) {
				t.Fatalf("got %v; want %v", tt.r.err, tt.err)
			}
		})
	}
	if got := ttlSeconds(31 * 24 * time.Hour); got < time.Now().Unix() {
		t.Fatalf("a TTL over 30 days got %d; want an absolute Unix time", got)
	}
}
