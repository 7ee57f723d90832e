package lease

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/mcpool"
)

func newFakeServer(t testing.TB, cfg Config) (*Server, *fakeBackend) {
	t.Helper()
	be := newFakeBackend()
	s, err := New(cfg, be, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s, be
}

// TestRecordsBounded: lease records never exceed MaxRecords, however many
// leases are won and never filled.
func TestRecordsBounded(t *testing.T) {
	cfg := fakeConfig()
	cfg.Lease.MaxRecords = 10
	s, _ := newFakeServer(t, cfg)
	ctx := context.Background()
	for i := 0; i < 1000; i++ {
		r, err := s.l.get(ctx, "k"+strconv.Itoa(i))
		if err != nil || r.found {
			t.Fatalf("get: got %+v, %v; want a miss that wins", r, err)
		}
		if i%3 == 0 { // some are filled, which drops their record
			if res, err := s.l.fill(ctx, "k"+strconv.Itoa(i), boundLease{}, false, []byte("v"), 0, 0); err != nil || res != fillStored {
				t.Fatalf("fill: got %v, %v; want stored", res, err)
			}
		}
	}
	s.l.mu.Lock()
	n, q := len(s.l.records), len(s.l.queue)-s.l.qhead
	s.l.mu.Unlock()
	if n > 10 || q > 20 {
		t.Errorf("got %d records, %d queued; want at most 10 and 20", n, q)
	}
	// The newest lease is still checked.
	if res, _ := s.l.fill(ctx, "k998", boundLease{}, false, []byte("v"), 0, 0); res != fillStored {
		t.Errorf("fill of the newest lease: got %v; want stored", res)
	}
}

// TestStaleLeaseReleased: a lease on a stale item that is not filled in
// time is handed back, so the next reader can win it.
func TestStaleLeaseReleased(t *testing.T) {
	cfg := fakeConfig()
	cfg.Lease.TTL = time.Second
	s, be := newFakeServer(t, cfg)
	ctx := context.Background()
	if _, err := be.MetaSet(ctx, "k", []byte("old"), mcpool.SetOptions{}); err != nil {
		t.Fatal(err)
	}
	be.markStale("k")
	if r, _ := s.l.get(ctx, "k"); r.found {
		t.Fatalf("first reader: got %+v; want a miss that wins the refill", r)
	}
	if r, _ := s.l.get(ctx, "k"); !r.found || !r.stale || string(r.item.value) != "old" {
		t.Fatalf("second reader: got %+v; want the stale value", r)
	}
	for s.Stats().LeaseReleases == 0 {
		time.Sleep(10 * time.Millisecond)
	}
	if r, _ := s.l.get(ctx, "k"); r.found {
		t.Errorf("after the release: got %+v; want a miss that wins the refill", r)
	}
	if w := s.Stats().LeaseWins; w != 2 {
		t.Errorf("got %d wins; want 2", w)
	}
}

// TestPollErrorEndsWait: when the server fails while readers wait, they
// get a miss at once instead of at the end of their wait.
func TestPollErrorEndsWait(t *testing.T) {
	s, be := newFakeServer(t, fakeConfig())
	ctx := context.Background()
	if r, _ := s.l.get(ctx, "k"); r.found {
		t.Fatal("got a hit; want a miss")
	}
	got := make(chan getResult)
	go func() {
		r, _ := s.l.get(ctx, "k")
		got <- r
	}()
	for s.Stats().LeaseWaits == 0 {
		time.Sleep(time.Millisecond)
	}
	be.setErr(mcpool.ErrServerDown)
	if r := <-got; r.found {
		t.Errorf("got %+v; want a miss", r)
	}
	if s.Stats().BackendErrors == 0 {
		t.Error("got 0 backend errors; want the failed poll counted")
	}
}

// TestLeasesOff: with Lease.TTL 0 reads are plain; a stale item is a miss
// and its refill token is handed back.
func TestLeasesOff(t *testing.T) {
	cfg := fakeConfig()
	cfg.Lease.TTL = 0
	s, be := newFakeServer(t, cfg)
	ctx := context.Background()
	if r, _ := s.l.get(ctx, "k"); r.found {
		t.Fatal("got a hit; want a miss")
	}
	if _, ok := be.items["k"]; ok {
		t.Error("a miss created an item with leases off")
	}
	_, _ = be.MetaSet(ctx, "k", []byte("v"), mcpool.SetOptions{})
	be.markStale("k")
	if r, _ := s.l.get(ctx, "k"); r.found {
		t.Errorf("stale item: got %+v; want a miss", r)
	}
	if be.items["k"].tokenSent {
		t.Error("the refill token was kept")
	}
	if res, _ := s.l.fill(ctx, "k", boundLease{}, false, []byte("v"), 0, 0); res != fillPlain {
		t.Errorf("fill with leases off: got %v; want plain", res)
	}
}

func TestConfigValidate(t *testing.T) {
	tests := []struct {
		name string
		edit func(*Config)
	}{
		{"MaxConns", func(c *Config) { c.MaxConns = 0 }},
		{"MaxValueBytes", func(c *Config) { c.MaxValueBytes = 0 }},
		{"MaxLineBytes", func(c *Config) { c.MaxLineBytes = 100 }},
		{"MaxGetLineBytes", func(c *Config) { c.MaxGetLineBytes = 1000 }},
		{"IdleTimeout", func(c *Config) { c.IdleTimeout = -1 }},
		{"FlushAll", func(c *Config) { c.FlushAll = "maybe" }},
		{"Version", func(c *Config) { c.Version = "" }},
		{"Lease.TTL", func(c *Config) { c.Lease.TTL = 500 * time.Millisecond }},
		{"Lease.Wait", func(c *Config) { c.Lease.Wait = -1 }},
		{"Lease.PollMax", func(c *Config) { c.Lease.PollMax = time.Millisecond }},
		{"Lease.ForeignSet", func(c *Config) { c.Lease.ForeignSet = "trust" }},
		{"Lease.RecordPrefix", func(c *Config) { c.Lease.RecordPrefix = "a b" }},
		{"Lease.MaxRecords", func(c *Config) { c.Lease.MaxRecords = 0 }},
	}
	if err := DefaultConfig().Validate(); err != nil {
		t.Fatalf("DefaultConfig: got %v; want valid", err)
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := DefaultConfig()
			tt.edit(&cfg)
			if err := cfg.Validate(); !errors.Is(err, ErrConfig) {
				t.Errorf("got %v; want ErrConfig", err)
			}
		})
	}
}

// serveBytes feeds in to a fresh connection of s and returns what s
// answered before the connection ended.
func serveBytes(s *Server, in []byte) []byte {
	cli, srv := net.Pipe()
	s.accept(context.Background(), srv)
	out := make(chan []byte)
	go func() {
		var b bytes.Buffer
		_, _ = io.Copy(&b, cli)
		out <- b.Bytes()
	}()
	_ = cli.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, _ = cli.Write(in)
	_ = cli.Close()
	s.connWG.Wait()
	return <-out
}

// FuzzServer feeds arbitrary client bytes to a connection: the server
// never panics or stalls, and every reply line is well formed. The corpus
// is in testdata/fuzz/FuzzServer.
func FuzzServer(f *testing.F) {
	for _, s := range []string{
		"get a b\r\nset a 0 0 1\r\nx\r\nget a\r\n",
		"set k 0 0 10\r\nabc\r\nget foo\r\n",
		"set k 0 0 2\r\nab\r\nincr k 1\r\ndelete k\r\ntouch k 1\r\ngats 1 k\r\n",
		"mg k v c\r\nms k 1 T0\r\nx\r\nmd k\r\nmn\r\n",
		"\x80\x00", "flush_all\r\nstats\r\nversion\r\nverbosity 1\r\nquit\r\n",
	} {
		f.Add([]byte(s))
	}
	cfg := fakeConfig()
	cfg.FlushAll = FlushForward
	cfg.Lease.Wait = 0
	cfg.MaxValueBytes = 1 << 10
	s, err := New(cfg, newFakeBackend(), nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { _ = s.Close() })
	f.Fuzz(func(t *testing.T, in []byte) {
		out := serveBytes(s, in)
		for _, line := range bytes.SplitAfter(out, []byte("\r\n")) {
			if len(line) > 0 && !bytes.HasSuffix(line, []byte("\r\n")) {
				t.Fatalf("reply %q does not end with CRLF", out)
			}
		}
	})
}

// TestDrain: a drain stops accepting, closes idle connections at once,
// lets a command in flight finish and answer, then closes its connection.
func TestDrain(t *testing.T) {
	s, _ := newFakeServer(t, fakeConfig())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve(context.Background(), ln) }()
	addr := ln.Addr().String()
	winner, waiting, idle := dial(t, addr), dial(t, addr), dial(t, addr)
	if _, ok := winner.get1("k"); ok {
		t.Fatal("got a hit; want a miss")
	}
	idle.do("version")
	got := make(chan string, 1)
	go func() {
		vs, err := waiting.get("get k")
		if err != nil || len(vs) != 1 {
			got <- "error or miss"
			return
		}
		got <- vs[0].data
	}()
	for s.Stats().LeaseWaits == 0 {
		time.Sleep(time.Millisecond)
	}
	drained := make(chan error, 1)
	go func() { drained <- s.Drain(context.Background()) }()
	if _, err := idle.br.ReadByte(); !errors.Is(err, io.EOF) {
		t.Errorf("idle connection: got %v; want EOF", err)
	}
	// The winner's connection was idle too: it is closed. Its fill comes
	// through another path (another proxy) and ends the wait.
	if res, err := s.l.fill(context.Background(), "k", boundLease{}, false, []byte("v"), 0, 0); err != nil || res != fillStored {
		t.Fatalf("fill: got %v, %v", res, err)
	}
	if v := <-got; v != "v" {
		t.Errorf("command in flight: got %q; want %q", v, "v")
	}
	if _, err := waiting.br.ReadByte(); !errors.Is(err, io.EOF) {
		t.Errorf("after its command: got %v; want EOF", err)
	}
	if err := <-drained; err != nil {
		t.Errorf("Drain: %v", err)
	}
	if err := <-served; err != nil {
		t.Errorf("Serve: %v", err)
	}
	if _, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
		t.Error("a new connection was accepted after the drain")
	}
}

// TestCollector: the metrics carry the server's figures under the
// namespace.
func TestCollector(t *testing.T) {
	s, _ := newFakeServer(t, fakeConfig())
	ctx := context.Background()
	_, _ = s.l.get(ctx, "k")
	_, _ = s.l.fill(ctx, "k", boundLease{}, false, []byte("v"), 0, 0)
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewCollector("leaseproxy", s, func() []mcpool.ServerStats {
		return []mcpool.ServerStats{{Addr: "127.0.0.1:1", State: mcpool.BreakerOpen, Failures: 3,
			TimeoutsQueued: 5, TimeoutsLate: 7, TimeoutsAnswering: 11, TimeoutsSilent: 2}}
	}))
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "where" && m.GetCounter() != nil {
					got[mf.GetName()+"/"+l.GetValue()] = m.GetCounter().GetValue()
				}
			}
			switch {
			case m.GetCounter() != nil:
				got[mf.GetName()] += m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				got[mf.GetName()] += m.GetGauge().GetValue()
			}
		}
	}
	for name, want := range map[string]float64{
		"leaseproxy_lease_wins_total":                1,
		"leaseproxy_lease_fills_total":               1,
		"leaseproxy_server_errors_total":             3,
		"leaseproxy_server_breaker_state":            1,
		"leaseproxy_connections":                     0,
		"leaseproxy_server_timeouts_total/queued":    5,
		"leaseproxy_server_timeouts_total/late":      7,
		"leaseproxy_server_timeouts_total/answering": 11,
		"leaseproxy_server_timeouts_total/silent":    2,
	} {
		if v, ok := got[name]; !ok || v != want {
			t.Errorf("%s: got %v (present %v); want %v", name, v, ok, want)
		}
	}
}
