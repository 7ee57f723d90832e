package wal

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap/zaptest"
)

func TestConfigValidate(t *testing.T) {
	base := func() Config {
		c := DefaultConfig()
		c.DSN = "postgres://app@127.0.0.1:5432/app"
		c.Tables = []string{"public.posts", "app.Users"}
		return c
	}
	tests := []struct {
		name   string
		modify func(*Config)
		want   string // substring of the error; empty: valid
	}{
		{"default", func(*Config) {}, ""},
		{"zero durations take defaults", func(c *Config) { *c = Config{DSN: c.DSN} }, ""},
		{"no DSN", func(c *Config) { c.DSN = "" }, "DSN is empty"},
		{"bad DSN", func(c *Config) { c.DSN = "postgres://%zz" }, "DSN"},
		{"slot with capitals", func(c *Config) { c.Slot = "Cache" }, "slot name"},
		{"slot with quote", func(c *Config) { c.Slot = "a'b" }, "slot name"},
		{"publication with space", func(c *Config) { c.Publication = "a b" }, "publication name"},
		{"table without schema", func(c *Config) { c.Tables = []string{"posts"} }, `table "posts"`},
		{"table with two dots", func(c *Config) { c.Tables = []string{"a.b.c"} }, `table "a.b.c"`},
		{"table with control byte", func(c *Config) { c.Tables = []string{"a.b\n"} }, "control byte"},
		{"table twice", func(c *Config) { c.Tables = []string{"a.b", "a.b"} }, "listed twice"},
		{"empty prefix", func(c *Config) { c.MessagePrefixes = []string{""} }, "message prefix"},
		{"negative interval", func(c *Config) { c.StatusInterval = -time.Second }, "StatusInterval (-1s) is negative"},
		{"min above max", func(c *Config) { c.ReconnectMin, c.ReconnectMax = time.Minute, time.Second },
			"ReconnectMin (1m0s) cannot be larger than ReconnectMax (1s)"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := base()
			tc.modify(&c)
			err := c.Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("got %v; want valid", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("got %v; want an error containing %q", err, tc.want)
			}
			if _, nerr := New(c, nil); (nerr == nil) != (err == nil) {
				t.Errorf("New: got %v; want the same outcome as Validate (%v)", nerr, err)
			}
		})
	}
}

func TestRetryable(t *testing.T) {
	tests := []struct {
		err  error
		want bool
	}{
		{fmt.Errorf("x: %w", ErrConnLost), true},
		{fmt.Errorf("x: %w", ErrSlotInUse), true},
		{fmt.Errorf("x: %w", ErrUnknownRelation), true},
		{&handlerError{"Begin", 0, fmt.Errorf("x: %w", ErrRetry)}, true},
		{slotGone("s", "does not exist"), false},
		{fmt.Errorf("x: %w", ErrDecode), false},
		{errors.New("other"), false},
		{classify("connect", &pgconn.PgError{Code: "57P01"}), true},  // admin shutdown
		{classify("connect", &pgconn.PgError{Code: "57P03"}), true},  // starting up
		{classify("connect", &pgconn.PgError{Code: "53300"}), true},  // too many connections
		{classify("start", &pgconn.PgError{Code: "55006"}), true},    // slot in use
		{classify("connect", &pgconn.PgError{Code: "28P01"}), false}, // bad password
		{classify("connect", &pgconn.PgError{Code: "3D000"}), false}, // no such database
		{classify("stream", &pgconn.PgError{Code: "42704"}), false},  // publication missing
		{classify("connect", &net.OpError{Op: "dial", Err: errors.New("refused")}), true},
	}
	for _, tc := range tests {
		if got := Retryable(tc.err); got != tc.want {
			t.Errorf("Retryable(%v): got %v; want %v", tc.err, got, tc.want)
		}
	}
	if err := classify("start", &pgconn.PgError{Code: "55006"}); !errors.Is(err, ErrSlotInUse) {
		t.Errorf("got %v; want ErrSlotInUse", err)
	}
	err := slotGone("cache_invalidator", "does not exist")
	for _, want := range []string{"wal: replication slot missing or invalidated", "caches may be stale",
		"pg_create_logical_replication_slot('cache_invalidator', 'pgoutput')", "flush"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("got %q; want it to contain %q", err, want)
		}
	}
}

func TestCheckIdentity(t *testing.T) {
	cols := []string{"id", "author_id", "title"}
	idx := []Index{{Name: "wide", Columns: []string{"id", "author_id", "title"}}, {Name: "narrow", Columns: []string{"author_id", "id"}}}
	tests := []struct {
		name    string
		t       TableInfo
		needOld []string
		ok      bool
		fix     string
	}{
		{"primary key covers", TableInfo{Name: "s.t", Exists: true, Columns: cols, ReplicaIdentity: 'd', IdentityColumns: []string{"id"}}, []string{"id"}, true, ""},
		{"nothing needed, has a key", TableInfo{Name: "s.t", Exists: true, Columns: cols, ReplicaIdentity: 'd', IdentityColumns: []string{"id"}}, nil, true, ""},
		{"full covers", TableInfo{Name: "s.t", Exists: true, Columns: cols, ReplicaIdentity: 'f', IdentityColumns: cols}, []string{"title"}, true, ""},
		{"key misses a column, no index", TableInfo{Name: "s.t", Exists: true, Columns: cols, ReplicaIdentity: 'd', IdentityColumns: []string{"id"}}, []string{"author_id"}, false, "ALTER TABLE s.t REPLICA IDENTITY FULL;"},
		{"key misses a column, smallest index suggested", TableInfo{Name: "s.t", Exists: true, Columns: cols, ReplicaIdentity: 'd', IdentityColumns: []string{"id"}, IdentityIndexes: idx}, []string{"author_id"}, false, "ALTER TABLE s.t REPLICA IDENTITY USING INDEX narrow;"},
		{"no identity at all", TableInfo{Name: "s.t", Exists: true, Columns: cols, ReplicaIdentity: 'n'}, nil, false, "ALTER TABLE s.t REPLICA IDENTITY FULL;"},
		{"quoting when built by hand", TableInfo{Name: "s.My T", Exists: true, Columns: cols, ReplicaIdentity: 'd'}, nil, false, `ALTER TABLE s."My T" REPLICA IDENTITY FULL;`},
		{"missing table", TableInfo{Name: "s.t"}, []string{"id"}, false, ""},
		{"missing column", TableInfo{Name: "s.t", Exists: true, Columns: cols, ReplicaIdentity: 'f', IdentityColumns: cols}, []string{"nope"}, false, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ok, fix := CheckIdentity(tc.t, tc.needOld)
			if ok != tc.ok || fix != tc.fix {
				t.Errorf("got %v %q; want %v %q", ok, fix, tc.ok, tc.fix)
			}
		})
	}
}

func ExampleCheckIdentity() {
	posts := TableInfo{
		Name: "public.posts", QuotedName: "public.posts", Exists: true,
		Columns:         []string{"id", "author_id", "body"},
		ReplicaIdentity: 'd', IdentityColumns: []string{"id"},
	}
	// Keys "post:{id}" and "user_posts:{author_id}": a DELETE must carry both.
	ok, fix := CheckIdentity(posts, []string{"id", "author_id"})
	fmt.Println(ok, fix)
	// Output: false ALTER TABLE public.posts REPLICA IDENTITY FULL;
}

// TestRunUnreachable checks that Run keeps retrying a server that is not
// there, refuses a second concurrent Run, and returns nil on cancel.
func TestRunUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now
	s, err := New(Config{DSN: "postgres://x@" + addr + "/db?connect_timeout=1",
		ReconnectMin: time.Millisecond, ReconnectMax: 5 * time.Millisecond}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, nopHandler{}) }()
	waitFor(t, "reconnect attempts", func() bool { return s.Stats().Reconnects >= 3 })
	if err := s.Run(ctx, nopHandler{}); !errors.Is(err, ErrRunning) {
		t.Errorf("second Run: got %v; want ErrRunning", err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run after cancel: got %v; want nil", err)
	}
	if st := s.Stats().State; st != StateStopped {
		t.Errorf("got state %s; want stopped", st)
	}
}
