package lease

import (
	"testing"
)

// TestFlushThenSet: with flush_all forwarded, a set of a key that missed
// (and so won a lease) just before the flush_all is an ordinary write,
// as in memcached: STORED, and read back. Whether the miss, the flush
// and the set go through one connection, two, or two proxies.
func TestFlushThenSet(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 2)
	cfg := testConfig()
	cfg.FlushAll = FlushForward
	p1, p2 := startProxy(t, cfg, addrs), startProxy(t, cfg, addrs)
	tests := []struct {
		name              string
		miss, flush, set  *proxy
		sameConn, setConn bool // flush on the miss's connection; set on it
	}{
		{"one-connection", p1, p1, p1, true, true},
		{"flush-on-another-connection", p1, p1, p1, false, true},
		{"set-on-another-connection", p1, p1, p1, true, false},
		{"flush-through-another-proxy", p1, p2, p1, false, true},
		{"set-through-another-proxy", p1, p1, p2, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			key := "flush:" + tt.name
			a := dial(t, tt.miss.Addr)
			if _, ok := a.get1(key); ok {
				t.Fatal("got a hit; want a miss")
			}
			f := a
			if !tt.sameConn {
				f = dial(t, tt.flush.Addr)
			}
			if got := f.do("flush_all"); got != "OK" {
				t.Fatalf("flush_all: got %q; want OK", got)
			}
			s := a
			if !tt.setConn {
				s = dial(t, tt.set.Addr)
			}
			if got := s.set(key, "10"); got != "STORED" {
				t.Fatalf("set after flush_all: got %q; want STORED (as memcached)", got)
			}
			if got := s.do("incr " + key + " 5"); got != "15" {
				t.Errorf("incr: got %q; want 15", got)
			}
			if v, ok := dial(t, p2.Addr).get1(key); !ok || v != "15" {
				t.Errorf("got %q (found %v); want %q", v, ok, "15")
			}
		})
	}
}
