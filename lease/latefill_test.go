package lease

import (
	"context"
	"fmt"
	"testing"
	"time"
	"unsafe"

	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/mcpool"
)

// TestLateFill: a client misses (it wins the lease), the key is
// invalidated on its server as the purger does it (md, or md I T30), and
// the client's fill arrives 5s later, after lease.ttl (2s), as a slow
// query's would. The fill is refused and its value never served: on the
// connection that got the lease, on another connection of the proxy, and
// on another proxy; alone, and after a reader that came after the
// invalidation won a new lease and filled it (its fresh value stays).
func TestLateFill(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 2)
	cfg := testConfig()
	cfg.Lease.TTL = 2 * time.Second
	cfg.Lease.Wait = 250 * time.Millisecond
	cfg.Lease.Memory = time.Minute
	p1, p2 := startProxy(t, cfg, addrs), startProxy(t, cfg, addrs)
	const late = 5 * time.Second
	if late <= cfg.Lease.TTL {
		t.Fatal("the fill must come after lease.ttl")
	}
	invs := []invalidation{
		{"md", func(p *proxy, key string) error { return p.Pool.Delete(context.Background(), key) }},
		{"mdI-T30", func(p *proxy, key string) error { return p.Pool.MarkStale(context.Background(), key, 30*time.Second) }},
	}
	// Every case first misses, is invalidated (and, for some, a new
	// lease is won and filled); then, once the slowest query would be
	// done, every case's fill arrives.
	type lateCase struct {
		name, key, at string
		a             *client // got the lease
		want          string  // what readers get at the end
	}
	var cases []*lateCase
	var last time.Time
	for _, inv := range invs {
		for _, at := range []string{"same-connection", "other-connection", "other-proxy"} {
			for _, between := range []bool{false, true} {
				lc := &lateCase{name: inv.name + "/" + at, at: at}
				if between {
					lc.name += "/after-a-new-lease-filled"
				}
				lc.key = "late:" + lc.name
				lc.a = dial(t, p1.Addr)
				if _, ok := lc.a.get1(lc.key); ok {
					t.Fatalf("%s: got a hit; want a miss that wins the lease", lc.name)
				}
				last = time.Now()
				// A reads the database (old row)... the commit's
				// invalidation is applied...
				if err := inv.run(p1, lc.key); err != nil {
					t.Fatalf("%s: invalidate: %v", lc.name, err)
				}
				if between {
					// ... a reader after the invalidation wins a new
					// lease and fills with the new row ...
					b := dial(t, p2.Addr)
					if v, ok := b.get1(lc.key); ok {
						t.Fatalf("%s: reader after the invalidation: got %q; want a miss", lc.name, v)
					}
					if got := b.set(lc.key, "new-row"); got != "STORED" {
						t.Fatalf("%s: fresh fill: got %q; want STORED", lc.name, got)
					}
					lc.want = "new-row"
				}
				cases = append(cases, lc)
			}
		}
	}
	// ... and A's fill arrives late.
	time.Sleep(late - time.Since(last))
	for _, lc := range cases {
		t.Run(lc.name, func(t *testing.T) {
			var setter *client
			switch lc.at {
			case "same-connection":
				setter = lc.a
			case "other-connection":
				setter = dial(t, p1.Addr)
			default:
				setter = dial(t, p2.Addr)
			}
			if got := setter.set(lc.key, "old-row"); got != "NOT_STORED" {
				t.Fatalf("fill after the invalidation: got %q; want NOT_STORED", got)
			}
			for _, p := range []*proxy{p1, p2} {
				if v, _ := dial(t, p.Addr).get1(lc.key); v != lc.want {
					t.Errorf("read at %s: got %q; want %q", p.Addr, v, lc.want)
				}
			}
		})
	}
}

// TestLateFillNoInvalidation: without an invalidation, a fill is stored
// however slow (5s here, lease.ttl 2s), on the connection that got the
// lease or through another proxy, and a set that follows a fill is an
// ordinary write. If another reader came after lease.ttl, it took the
// lease over: the slow fill is refused and the new winner's stored.
func TestLateFillNoInvalidation(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 2)
	cfg := testConfig()
	cfg.Lease.TTL = 2 * time.Second
	p1, p2 := startProxy(t, cfg, addrs), startProxy(t, cfg, addrs)
	const late = 5 * time.Second
	type slowCase struct {
		name      string
		setAt     *proxy
		takenOver bool
		key       string
		a, b      *client // a got the lease; b took it over
	}
	cases := []*slowCase{
		{name: "same-connection", setAt: p1},
		{name: "other-proxy", setAt: p2},
		{name: "taken-over", setAt: p1, takenOver: true},
	}
	start := time.Now()
	for _, sc := range cases {
		sc.key = "late:none:" + sc.name
		sc.a = dial(t, p1.Addr)
		if _, ok := sc.a.get1(sc.key); ok {
			t.Fatalf("%s: got a hit; want a miss", sc.name)
		}
	}
	// After lease.ttl, another reader takes one lease over.
	time.Sleep(3500*time.Millisecond - time.Since(start))
	for _, sc := range cases {
		if sc.takenOver {
			sc.b = dial(t, p2.Addr)
			if v, ok := sc.b.get1(sc.key); ok {
				t.Fatalf("%s: reader after lease.ttl: got %q; want a miss that takes the lease over", sc.name, v)
			}
		}
	}
	time.Sleep(late - time.Since(start))
	for _, sc := range cases {
		t.Run(sc.name, func(t *testing.T) {
			c := sc.a
			if sc.setAt == p2 {
				c = dial(t, p2.Addr)
			}
			got := c.set(sc.key, "slow-row")
			if sc.takenOver {
				if got != "NOT_STORED" {
					t.Fatalf("fill of the lease taken over: got %q; want NOT_STORED", got)
				}
				if got := sc.b.set(sc.key, "new-row"); got != "STORED" {
					t.Errorf("new winner's fill: got %q; want STORED", got)
				}
				if v, _ := dial(t, p1.Addr).get1(sc.key); v != "new-row" {
					t.Errorf("got %q; want %q", v, "new-row")
				}
				return
			}
			if got != "STORED" {
				t.Fatalf("slow fill, no invalidation: got %q; want STORED", got)
			}
			if got := dial(t, sc.setAt.Addr).set(sc.key, "v2"); got != "STORED" {
				t.Fatalf("write after the fill: got %q; want STORED", got)
			}
			if v, _ := dial(t, p2.Addr).get1(sc.key); v != "v2" {
				t.Errorf("got %q; want %q", v, "v2")
			}
		})
	}
}

// memcachedStat reads one figure of "stats" from the memcached at addr.
func memcachedStat(t *testing.T, addr, name string) int64 {
	t.Helper()
	c := dial(t, addr)
	c.send("stats\r\n")
	var v int64 = -1
	for {
		l := c.line()
		if l == "END" {
			break
		}
		var k string
		var n int64
		if _, err := fmt.Sscanf(l, "STAT %s %d", &k, &n); err == nil && k == name {
			v = n
		}
	}
	if v < 0 {
		t.Fatalf("memcached %s: no stat %q", addr, name)
	}
	return v
}

// TestLeaseMemoryCost measures what remembering leases costs: in
// memcached, one record per key leased within Lease.Memory; in the
// proxy, at most maxBindings leases per connection.
func TestLeaseMemoryCost(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 1)
	p := startProxy(t, testConfig(), addrs)
	const n = 2000
	before := memcachedStat(t, addrs[0], "bytes")
	c := dial(t, p.Addr)
	line := "get"
	for i := range n {
		line += fmt.Sprintf(" cost:%06d", i)
		if (i+1)%100 == 0 {
			if vs, err := c.get(line); err != nil || len(vs) != 0 {
				t.Fatalf("get: got %d values, %v; want misses", len(vs), err)
			}
			line = "get"
		}
	}
	if w := p.Stats().LeaseWins; w != n {
		t.Fatalf("got %d lease wins; want %d", w, n)
	}
	perKey := float64(memcachedStat(t, addrs[0], "bytes")-before) / n
	// Each lease leaves its empty item (until lease.ttl) and its record
	// (until lease.memory) in memcached.
	t.Logf("memcached: %.0f bytes per leased key (empty item and record, keys of 11 bytes)", perKey)
	if perKey > 400 {
		t.Errorf("got %.0f bytes per leased key in memcached; want at most 400", perKey)
	}
	// The proxy's side: one connection's bindings, at most maxBindings
	// however many leases it gets.
	cn := &conn{s: p.Server}
	for i := range n {
		cn.bind(fmt.Sprintf("cost:%06d", i), boundLease{cas: uint64(i + 1)})
	}
	if len(cn.leases) > maxBindings {
		t.Errorf("a connection remembers %d leases; want at most %d", len(cn.leases), maxBindings)
	}
	// A map entry is the key's header and a binding, plus the key's bytes
	// (at most 250) and the map's overhead (under 2x).
	entry := int(unsafe.Sizeof("")+unsafe.Sizeof(binding{})) + MaxKeyBytes
	t.Logf("proxy: %d leases kept of %d on one connection; at most %d x %d bytes x 2 = %d KiB per connection",
		len(cn.leases), n, maxBindings, entry, maxBindings*entry*2>>10)
}

// TestParseRecord: lease records round-trip, an older proxy's bare CAS
// reads as a lease handed out now, and anything else is no record.
func TestParseRecord(t *testing.T) {
	tests := []struct {
		in   string
		want leaseRecord
		ok   bool
	}{
		{"12 1700000000 0 0", leaseRecord{cas: 12, won: 1700000000}, true},
		{"12 1700000000 1700000060 1", leaseRecord{cas: 12, won: 1700000000, brokenUntil: 1700000060, consumed: true}, true},
		{"12", leaseRecord{cas: 12, won: 99}, true},
		{"0 1 0 0", leaseRecord{}, false},
		{"12 1 0 2", leaseRecord{}, false},
		{"12 1 0", leaseRecord{}, false},
		{"12 1 0 0 0", leaseRecord{}, false},
		{"x", leaseRecord{}, false},
		{"", leaseRecord{}, false},
	}
	for _, tt := range tests {
		got, ok := parseRecord([]byte(tt.in), 99)
		if ok != tt.ok || got != tt.want {
			t.Errorf("parseRecord(%q): got %+v, %v; want %+v, %v", tt.in, got, ok, tt.want, tt.ok)
		}
		if ok {
			if back, _ := parseRecord(got.append(nil), 99); back != got {
				t.Errorf("round trip of %+v: got %+v", got, back)
			}
		}
	}
}

// FuzzParseRecord: a lease record read from memcached never panics the
// parser, and what it accepts round-trips.
func FuzzParseRecord(f *testing.F) {
	for _, s := range []string{"12 1700000000 0 0", "12", "1 2 3 1", "", "  7  ", "18446744073709551615 9223372036854775807 0 0"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, ok := parseRecord(b, 5)
		if !ok {
			return
		}
		if back, ok := parseRecord(r.append(nil), 5); !ok || back != r {
			t.Fatalf("round trip of %q: got %+v, %v; want %+v", b, back, ok, r)
		}
	})
}

// noRecords is a fakeBackend on which lease records cannot be written.
type noRecords struct{ *fakeBackend }

func (noRecords) MetaSetOn(context.Context, int, string, []byte, mcpool.SetOptions) (mcpool.Response, error) {
	return mcpool.Response{}, mcpool.ErrServerDown
}

// TestUnrecordedLeaseFill: when a lease's record could not be written,
// its fill after an invalidation is refused: the missing record does not
// read as a flush.
func TestUnrecordedLeaseFill(t *testing.T) {
	be := noRecords{newFakeBackend()}
	s, err := New(fakeConfig(), be, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	ctx := context.Background()
	r, err := s.l.get(ctx, "k")
	if err != nil || r.found || r.lease == 0 || !r.unrecorded {
		t.Fatalf("get: got %+v, %v; want a miss that wins an unrecorded lease", r, err)
	}
	if _, err := be.MetaDelete(ctx, "k", mcpool.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	res, err := s.l.fill(ctx, "k", boundLease{cas: r.lease, unrecorded: true}, false, []byte("old"), 0, 0)
	if err != nil || res != fillRefused {
		t.Errorf("fill after an invalidation: got %v, %v; want refused", res, err)
	}
}
