package mcpool

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/bradfitz/gomemcache/memcache"
	"github.com/pgcache/pgcache/testenv"
)

func TestParseServer(t *testing.T) {
	tests := []struct {
		spec string
		want Server
		err  bool
	}{
		{"127.0.0.1:11211", Server{Addr: "127.0.0.1:11211", Weight: 1, Name: "127.0.0.1"}, false},
		{"127.0.0.1:11212", Server{Addr: "127.0.0.1:11212", Weight: 1, Name: "127.0.0.1:11212"}, false},
		{"127.0.0.1:11212:3", Server{Addr: "127.0.0.1:11212", Weight: 3, Name: "127.0.0.1:11212"}, false},
		{"127.0.0.1:11211:2", Server{Addr: "127.0.0.1:11211", Weight: 2, Name: "127.0.0.1"}, false},
		{"mc1.example:11212:1 cache-a", Server{Addr: "mc1.example:11212", Weight: 1, Name: "cache-a"}, false},
		{"  mc1:11211  ", Server{Addr: "mc1:11211", Weight: 1, Name: "mc1"}, false},
		{"[::1]:11212", Server{Addr: "[::1]:11212", Weight: 1, Name: "[::1]:11212"}, false},
		{"[::1]:11212:2 v6", Server{Addr: "[::1]:11212", Weight: 2, Name: "v6"}, false},
		{"", Server{}, true},
		{"localhost", Server{}, true},
		{":11211", Server{}, true},
		{"h:0", Server{}, true},
		{"h:70000", Server{}, true},
		{"h:11211:0", Server{}, true},
		{"h:11211:-1", Server{}, true},
		{"h:11211:x", Server{}, true},
		{"h:11211:1 a b", Server{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.spec, func(t *testing.T) {
			got, err := ParseServer(tt.spec)
			if tt.err {
				if !errors.Is(err, ErrConfig) {
					t.Fatalf("ParseServer(%q) got %+v, %v; want ErrConfig", tt.spec, got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ParseServer(%q) got %+v, %v; want %+v", tt.spec, got, err, tt.want)
			}
		})
	}
}

func TestNewRingErrors(t *testing.T) {
	tests := []struct {
		name    string
		hash    string
		servers []string
	}{
		{"no servers", HashKetama, nil},
		{"unknown hash", "crc", []string{"a:1"}},
		{"modula weight", HashModula, []string{"a:1:2"}},
		{"bad spec", HashKetama, []string{"a"}},
		{"name too long for twemproxy", HashKetama, []string{"a:1:1 " + strings.Repeat("n", 84)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := NewRing(tt.hash, tt.servers); !errors.Is(err, ErrConfig) {
				t.Fatalf("NewRing got error %v; want ErrConfig", err)
			}
		})
	}
}

// TestModulaMatchesGomemcache compares Pick with gomemcache's ServerList
// for 10k keys and several server counts.
func TestModulaMatchesGomemcache(t *testing.T) {
	keys := placementKeys()
	keys = append(keys, string(make([]byte, 300))) // beyond gomemcache's 256-byte buffer
	for _, n := range []int{1, 2, 3, 5, 8} {
		t.Run(strconv.Itoa(n), func(t *testing.T) {
			servers := make([]string, n)
			for i := range servers {
				servers[i] = "127.0.0.1:" + strconv.Itoa(20000+i)
			}
			var sl memcache.ServerList
			if err := sl.SetServers(servers...); err != nil {
				t.Fatal(err)
			}
			ring, err := NewRing(HashModula, servers)
			if err != nil {
				t.Fatal(err)
			}
			for _, k := range keys {
				addr, err := sl.PickServer(k)
				if err != nil {
					t.Fatal(err)
				}
				if got := servers[ring.Pick(k)]; got != addr.String() {
					t.Fatalf("key %q: Pick got %s; gomemcache picks %s", k, got, addr)
				}
			}
		})
	}
}

// TestKetamaSpread checks that points are spread by weight: a server with
// weight 2 gets about twice the keys of one with weight 1.
func TestKetamaSpread(t *testing.T) {
	ring, err := NewRing(HashKetama, []string{"10.0.0.1:11211:1", "10.0.0.2:11211:1", "10.0.0.3:11211:2"})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := len(ring.points), 160*3; got != want {
		t.Fatalf("points got %d; want %d", got, want)
	}
	counts := make([]int, 3)
	for i := 0; i < 40000; i++ {
		counts[ring.Pick("k"+strconv.Itoa(i))]++
	}
	for i, want := range []int{10000, 10000, 20000} {
		if d := counts[i] - want; d < -want/4 || d > want/4 {
			t.Fatalf("server %d got %d keys; want about %d (counts %v)", i, counts[i], want, counts)
		}
	}
}

// TestSelector checks that gomemcache with NewSelector and a Pool agree:
// what gomemcache stores, the pool finds, for both hashes.
func TestSelector(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 3)
	servers := []string{mcs[0].Addr, mcs[1].Addr, mcs[2].Addr}
	for _, hash := range []string{HashKetama, HashModula} {
		t.Run(hash, func(t *testing.T) {
			ring, err := NewRing(hash, servers)
			if err != nil {
				t.Fatal(err)
			}
			sel, err := NewSelector(ring)
			if err != nil {
				t.Fatal(err)
			}
			var each []string
			if err := sel.Each(func(a net.Addr) error { each = append(each, a.String()); return nil }); err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(each) != fmt.Sprint(servers) {
				t.Fatalf("Each got %v; want %v", each, servers)
			}
			mc := memcache.NewFromSelector(sel)
			pool := newTestPool(t, servers, func(c *Config) { c.Hash = hash })
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			for i := 0; i < 500; i++ {
				k := hash + ":sel:" + strconv.Itoa(i)
				if err := mc.Set(&memcache.Item{Key: k, Value: []byte(k)}); err != nil {
					t.Fatal(err)
				}
				resp, err := pool.MetaGet(ctx, k, "v")
				if err != nil {
					t.Fatal(err)
				}
				if resp.Status != StatusVA || string(resp.Value) != k {
					t.Fatalf("key %q: pool got %s %q; want VA %q", k, resp.Status, resp.Value, k)
				}
			}
		})
	}
}

func ExampleRing_Pick() {
	ring, err := NewRing(HashKetama, []string{"10.0.0.1:11211", "10.0.0.2:11211", "10.0.0.3:11211"})
	if err != nil {
		panic(err)
	}
	for _, k := range []string{"post:1", "post:2", "user_posts:42"} {
		fmt.Println(k, ring.Server(ring.Pick(k)).Addr)
	}
	// Output:
	// post:1 10.0.0.2:11211
	// post:2 10.0.0.3:11211
	// user_posts:42 10.0.0.3:11211
}
