package mcpool

import (
	"bufio"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pgcache/pgcache/testenv"
)

// TestKeyWireForm: printable keys go as written; keys with control bytes
// go in base64 with b while that fits in 250 bytes, as written beyond;
// space, CR, LF and NUL are refused; a key the caller sends with b is
// sent as written.
func TestKeyWireForm(t *testing.T) {
	long := "\x10" + strings.Repeat("k", 199) // base64 would be 268 bytes
	tests := []struct {
		name  string
		r     *request
		want  string
		noKey bool
	}{
		{"printable", buildGet("post:1", []string{"v"}), "mg post:1 v\r\n", false},
		{"control bytes", buildGet("\x10\x10k", []string{"v"}), "mg EBBr b v\r\n", false},
		{"tab, padding", buildGet("a\tb!", nil), "mg YQliIQ== b\r\n", false},
		{"DEL", buildDelete("x\x7f", DeleteOptions{}), "md eH8= b\r\n", false},
		{"186 bytes in base64", buildGet("\x01"+strings.Repeat("k", 185), nil),
			"mg " + base64.StdEncoding.EncodeToString([]byte("\x01"+strings.Repeat("k", 185))) + " b\r\n", false},
		{"187 bytes as written", buildGet("\x01"+strings.Repeat("k", 186), nil), "mg \x01" + strings.Repeat("k", 186) + "\r\n", false},
		{"too long for base64", buildGet(long, nil), "mg " + long + "\r\n", false},
		{"caller's base64", buildGet("EBBr", []string{"b", "v"}), "mg EBBr b v\r\n", false},
		{"ms with control bytes", buildSet("\x01k", []byte("hi"), SetOptions{Flags: []string{"T5"}}, 100), "ms AWs= 2 b T5\r\nhi\r\n", false},
		{"ma with control bytes", buildArithmetic("\x01k", ArithmeticOptions{}), "ma AWs= b v\r\n", false},
		{"space", buildGet("a b", nil), "", true},
		{"NUL", buildGet("a\x00b", nil), "", true},
		{"CR", buildGet("a\rb", nil), "", true},
		{"251 bytes", buildGet(strings.Repeat("\x01", 251), nil), "", true},
		{"caller's base64 not printable", buildGet("a\x01", []string{"b"}), "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.noKey {
				if !errors.Is(tt.r.err, ErrBadKey) {
					t.Fatalf("got %q, %v; want ErrBadKey", tt.r.buf, tt.r.err)
				}
				return
			}
			if tt.r.err != nil || string(tt.r.buf) != tt.want {
				t.Fatalf("got %q, %v; want %q", tt.r.buf, tt.r.err, tt.want)
			}
		})
	}
	if got, want := placementKey("EBBr", true), "\x10\x10k"; got != want {
		t.Fatalf("placementKey of base64 got %q; want %q", got, want)
	}
	if got, want := placementKey("not base64!", true), "not base64!"; got != want {
		t.Fatalf("placementKey of bad base64 got %q; want %q", got, want)
	}
}

// textGet reads key from memcached at addr with the text protocol, as
// clients that bypass the pool (and nutcracker) do.
func textGet(t *testing.T, addr, key string) (string, bool) {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer nc.Close()
	_ = nc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(nc, "get %s\r\n", key); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(nc)
	line, err := br.ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	if line == "END\r\n" {
		return "", false
	}
	f := strings.Split(strings.TrimSuffix(line, "\r\n"), " ") // keys may hold tabs
	if len(f) != 4 || f[0] != "VALUE" || f[1] != key {
		t.Fatalf("get %q: bad line %q", key, line)
	}
	n, err := strconv.Atoi(f[3])
	if err != nil {
		t.Fatalf("get %q: bad line %q", key, line)
	}
	buf := make([]byte, n+2)
	if _, err := io.ReadFull(br, buf); err != nil {
		t.Fatal(err)
	}
	if end, _ := br.ReadString('\n'); end != "END\r\n" {
		t.Fatalf("get %q: got %q after the value; want END", key, end)
	}
	return string(buf[:n]), true
}

// TestBinaryKeys: keys with control bytes stored through the pool are the
// items a text-protocol client sees under the same bytes, on the server
// the raw key hashes to (where nutcracker and the readers look), and the
// caller's own base64 form (b flag) reaches the same item.
func TestBinaryKeys(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 3)
	pool := newTestPool(t, addrsOf(mcs), nil)
	ctx := testCtx(t)
	keys := []string{
		"\x10\x10post:1", "a\tb", "x\x7f", "\x01",
		"\x01" + strings.Repeat("k", 185), // longest base64 key
		"\x01" + strings.Repeat("k", 230), // too long for base64: as written
	}
	for i := 0; i < 20; i++ {
		keys = append(keys, fmt.Sprintf("\x10\x10bin:%d", i))
	}
	for i, k := range keys {
		val := fmt.Sprintf("v%d", i)
		if resp, err := pool.MetaSet(ctx, k, []byte(val), SetOptions{}); err != nil || resp.Status != StatusHD {
			t.Fatalf("ms %q: %+v, %v", k, resp, err)
		}
		home := pool.Pick(k)
		for s, m := range mcs {
			got, ok := textGet(t, m.Addr, k)
			if s == home && (!ok || got != val) {
				t.Fatalf("text get %q on its server %d: got %q, %v; want %q", k, s, got, ok, val)
			}
			if s != home && ok {
				t.Fatalf("text get %q: found on server %d; want only on %d", k, s, home)
			}
		}
		if base64.StdEncoding.EncodedLen(len(k)) <= MaxKeyLen {
			b64 := base64.StdEncoding.EncodeToString([]byte(k))
			resp, err := pool.MetaGet(ctx, b64, "b", "v")
			if err != nil || string(resp.Value) != val {
				t.Fatalf("mg %s b: %+v, %v; want %q", b64, resp, err, val)
			}
			resp, err = pool.Do(ctx, []byte("mg "+b64+" b v"), nil)
			if err != nil || string(resp.Value) != val {
				t.Fatalf("Do mg %s b: %+v, %v; want %q", b64, resp, err, val)
			}
		}
		resp, err := pool.MetaGet(ctx, k, "v")
		if err != nil || string(resp.Value) != val {
			t.Fatalf("mg %q: %+v, %v; want %q", k, resp, err, val)
		}
		if err := pool.Delete(ctx, k); err != nil {
			t.Fatalf("delete %q: %v", k, err)
		}
		if _, ok := textGet(t, mcs[home].Addr, k); ok {
			t.Fatalf("text get %q after Delete: found", k)
		}
	}
}

// TestFreshPoolHammer: many goroutines use a pool the moment New returns,
// before any connection is up. Every request to a live server succeeds
// (none fails "not connected" because its dial was still under way), and
// requests to a server that is down from the start fail with
// ErrServerDown instead of hanging. Run with -race.
func TestFreshPoolHammer(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 3)
	const deadAddr = "127.0.0.1:1" // nothing listens on port 1: dials are refused
	for round := 0; round < 5; round++ {
		for _, conns := range []int{1, 2, 4} {
			t.Run(fmt.Sprintf("round%d/conns%d", round, conns), func(t *testing.T) {
				servers := append(addrsOf(mcs), deadAddr)
				pool := newTestPool(t, servers, func(c *Config) { c.ConnsPerServer = conns })
				ctx := testCtx(t)
				const workers, each = 64, 10
				var wg sync.WaitGroup
				errs := make(chan error, workers*each)
				start := make(chan struct{})
				for w := 0; w < workers; w++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						<-start
						for i := 0; i < each; i++ {
							k := fmt.Sprintf("hammer:%d:%d:%d", round, w, i)
							_, err := pool.MetaSet(ctx, k, []byte(k), SetOptions{})
							if pool.Pick(k) == len(servers)-1 {
								if !errors.Is(err, ErrServerDown) && !errors.Is(err, ErrBreakerOpen) {
									errs <- fmt.Errorf("ms %s on the dead server: %v; want ErrServerDown or ErrBreakerOpen", k, err)
								}
								continue
							}
							if err != nil {
								errs <- fmt.Errorf("ms %s: %w", k, err)
								continue
							}
							resp, err := pool.MetaGet(ctx, k, "v")
							if err != nil || string(resp.Value) != k {
								errs <- fmt.Errorf("mg %s: got %+v, %v; want %q", k, resp, err, k)
							}
						}
					}()
				}
				close(start)
				wg.Wait()
				close(errs)
				n := 0
				for err := range errs {
					if n++; n <= 5 {
						t.Error(err)
					}
				}
				if n > 0 {
					t.Fatalf("%d of %d requests failed", n, workers*each)
				}
			})
		}
	}
}

// TestMetaGetMulti: a pipelined multi-get answers every key in order
// across servers, including keys with control bytes, more keys than
// MaxInFlight on one connection (the corked requests must go out for
// slots to free up), and keys on a dead server, which fail alone.
func TestMetaGetMulti(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 2)
	const deadAddr = "127.0.0.1:1" // nothing listens on port 1: dials are refused
	servers := append(addrsOf(mcs), deadAddr)
	pool := newTestPool(t, servers, func(c *Config) {
		c.ConnsPerServer = 1
		c.MaxInFlight = 8
		c.Breaker.Failures = 1 << 20 // the dead server's keys fail as down, not as rejected
	})
	ctx := testCtx(t)
	var keys []string
	for i := 0; i < 300; i++ {
		k := fmt.Sprintf("multi:%d", i)
		if i%3 == 0 {
			k = "\x10\x10" + k
		}
		keys = append(keys, k)
		if pool.Pick(k) == 2 || i%4 == 0 {
			continue // dead server, or left absent
		}
		if _, err := pool.MetaSet(ctx, k, []byte("v"+k), SetOptions{}); err != nil {
			t.Fatalf("ms %q: %v", k, err)
		}
	}
	resps, errs := pool.MetaGetMulti(ctx, keys, "v")
	if len(resps) != len(keys) || len(errs) != len(keys) {
		t.Fatalf("got %d responses, %d errors; want %d each", len(resps), len(errs), len(keys))
	}
	for i, k := range keys {
		switch {
		case pool.Pick(k) == 2:
			if !errors.Is(errs[i], ErrServerDown) {
				t.Fatalf("key %q on the dead server: got %+v, %v; want ErrServerDown", k, resps[i], errs[i])
			}
		case i%4 == 0:
			if errs[i] != nil || resps[i].Status != StatusEN {
				t.Fatalf("absent key %q: got %+v, %v; want EN", k, resps[i], errs[i])
			}
		default:
			if errs[i] != nil || string(resps[i].Value) != "v"+k {
				t.Fatalf("key %q: got %+v, %v; want its value", k, resps[i], errs[i])
			}
		}
	}
	for _, st := range pool.Stats()[:2] {
		if st.InFlight != 0 {
			t.Fatalf("%s: %d requests still in flight after the multi-get", st.Addr, st.InFlight)
		}
	}
}
