package wal

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/row"
	"github.com/pgcache/pgcache/testenv"
)

// The integration tests share one Postgres primary (starting one costs
// seconds on a 2-core machine). Each subtest uses its own tables and slot.
// The subtest that kills the primary runs last.
func TestPostgres(t *testing.T) {
	env := testenv.New(t, testenv.Options{DCs: 1, NoNATS: true, MemcachedPerDC: -1, NoReplicas: true})
	pg := &pgEnv{Postgres: env.Primary}
	t.Run("Decode", pg.testDecode)
	t.Run("ConfirmAndIdleAdvance", pg.testConfirmAndIdleAdvance)
	t.Run("RestartResumes", pg.testRestartResumes)
	t.Run("Standby", pg.testStandby)
	t.Run("SlotGone", pg.testSlotGone)
	t.Run("SetupAndInspect", pg.testSetupAndInspect)
	t.Run("Partitions", pg.testPartitions)
	t.Run("SlowHandlerKeepsConnection", pg.testSlowHandler)
	t.Run("HandlerRetry", pg.testHandlerRetry)
	t.Run("MillionRowTransaction", pg.testMillionRows)
	t.Run("PrimaryKillRestart", pg.testPrimaryKill)
}

type pgEnv struct {
	*testenv.Postgres
}

func (pg *pgEnv) exec(t *testing.T, sql string, args ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := pg.Exec(ctx, sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

func (pg *pgEnv) lsn(t *testing.T, sql string) pglogrepl.LSN {
	t.Helper()
	var s string
	if err := pg.QueryRow(context.Background(), sql, &s); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	l, err := pglogrepl.ParseLSN(s)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func (pg *pgEnv) slot(t *testing.T, slot string) SlotInfo {
	t.Helper()
	info, err := SlotStatus(context.Background(), pg.DSN(""), slot)
	if err != nil {
		t.Fatal(err)
	}
	return info
}

// testConfig is a Config with short intervals for tests.
func (pg *pgEnv) testConfig(slot string, tables ...string) Config {
	c := DefaultConfig()
	c.DSN = pg.DSN("")
	c.Slot, c.Publication = slot, slot
	c.Tables = tables
	c.StatusInterval = 100 * time.Millisecond
	c.ReconnectMin, c.ReconnectMax = 50*time.Millisecond, 500*time.Millisecond
	c.StandbyRetry = 200 * time.Millisecond
	return c
}

func newStream(t *testing.T, cfg Config, setup bool) *Stream {
	t.Helper()
	s, err := New(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	if setup {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := s.Setup(ctx); err != nil {
			t.Fatalf("setup: %v", err)
		}
	}
	return s
}

// running is a Run in a goroutine.
type running struct {
	cancel context.CancelFunc
	done   chan error
}

func start(t *testing.T, s *Stream, h Handler) *running {
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- s.Run(ctx, h) }()
	t.Cleanup(func() { r.stop(t) })
	return r
}

// stop cancels Run and checks it returned nil.
func (r *running) stop(t *testing.T) {
	t.Helper()
	if r.cancel == nil {
		return
	}
	r.cancel()
	r.cancel = nil
	select {
	case err := <-r.done:
		if err != nil {
			t.Errorf("Run after cancel: got %v; want nil", err)
		}
	case <-time.After(time.Minute):
		t.Errorf("Run did not return within a minute of cancel")
	}
}

// collector is a Handler that records events for a test, and confirms
// each transaction and non-transactional message when confirm is set.
type collector struct {
	mu      sync.Mutex // guards rec
	rec     recorder
	autoAck atomic.Bool // every Commit's ack is done at once
}

func (c *collector) Begin(ctx context.Context, tx TxInfo) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rec.Begin(ctx, tx)
}

func (c *collector) Change(ctx context.Context, tx TxInfo, ch row.Change) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rec.Change(ctx, tx, ch)
}

func (c *collector) Message(ctx context.Context, tx TxInfo, m Message) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rec.Message(ctx, tx, m)
}

func (c *collector) Commit(ctx context.Context, tx TxInfo, ack *Ack) error {
	c.mu.Lock()
	err := c.rec.Commit(ctx, tx, ack)
	c.mu.Unlock()
	if err == nil && c.autoAck.Load() {
		ack.Done()
	}
	return err
}

// ackUpTo does the acks of the first n Commits.
func (c *collector) ackUpTo(n int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, a := range c.rec.acks[:n] {
		a.Done()
	}
}

func (c *collector) events() []event {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.rec.events)
}

// waitFor waits for cond up to a minute: the limit only bounds a hang,
// nothing here asserts a duration.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testenv.Eventually(t, time.Minute, what, cond)
}

// commits returns the Commit events' TxInfo.
func commits(evs []event) []TxInfo {
	var out []TxInfo
	for _, e := range evs {
		if e.Op == "Commit" {
			out = append(out, e.Tx)
		}
	}
	return out
}

// insertedIDs returns the "id" of every INSERT, in order.
func insertedIDs(evs []event) []int {
	var out []int
	for _, e := range evs {
		if e.Op == "Change" && e.Change.Op == row.Insert {
			for _, c := range e.Change.New {
				if c.Name == "id" {
					n, _ := strconv.Atoi(c.Value.Text)
					out = append(out, n)
				}
			}
		}
	}
	return out
}

func (pg *pgEnv) testDecode(t *testing.T) {
	pg.exec(t, `CREATE TABLE dec_a (id int PRIMARY KEY, author_id int, body text);
		ALTER TABLE dec_a ALTER body SET STORAGE EXTERNAL;
		CREATE TABLE dec_f (id int PRIMARY KEY, author_id int, body text);
		ALTER TABLE dec_f REPLICA IDENTITY FULL;
		ALTER TABLE dec_f ALTER body SET STORAGE EXTERNAL;
		CREATE TABLE dec_other (id int PRIMARY KEY)`)
	cfg := pg.testConfig("dec", "public.dec_a", "public.dec_f")
	cfg.MessagePrefixes = []string{"invalidate"}
	s := newStream(t, cfg, true)
	var c collector
	start(t, s, &c)

	big := strings.Repeat("0123456789", 10000) // 100 kB, stored out of line
	steps := []struct {
		sql  string
		want []event // Change and Message events of the transaction
	}{{
		sql:  "INSERT INTO dec_a VALUES (1, 10, 'x')",
		want: []event{{Op: "Change", Change: row.Change{Table: "public.dec_a", Op: row.Insert, New: cols("id", "1", "author_id", "10", "body", "x")}}},
	}, {
		sql:  "UPDATE dec_a SET author_id = 11 WHERE id = 1", // key unchanged: no old row
		want: []event{{Op: "Change", Change: row.Change{Table: "public.dec_a", Op: row.Update, New: cols("id", "1", "author_id", "11", "body", "x")}}},
	}, {
		sql: "UPDATE dec_a SET id = 2 WHERE id = 1", // key changed: old row is the key only
		want: []event{{Op: "Change", Change: row.Change{Table: "public.dec_a", Op: row.Update,
			Old: cols("id", "1"), New: cols("id", "2", "author_id", "11", "body", "x")}}},
	}, {
		sql:  "INSERT INTO dec_a VALUES (3, 30, '" + big + "')",
		want: []event{{Op: "Change", Change: row.Change{Table: "public.dec_a", Op: row.Insert, New: cols("id", "3", "author_id", "30", "body", big)}}},
	}, {
		sql: "UPDATE dec_a SET author_id = 31 WHERE id = 3", // TOASTed body unchanged: not sent
		want: []event{{Op: "Change", Change: row.Change{Table: "public.dec_a", Op: row.Update,
			New: []row.Column{{Name: "id", Value: row.Value{Text: "3"}}, {Name: "author_id", Value: row.Value{Text: "31"}}, {Name: "body", Value: row.Value{Unchanged: true}}}}}},
	}, {
		sql:  "DELETE FROM dec_a WHERE id = 2",
		want: []event{{Op: "Change", Change: row.Change{Table: "public.dec_a", Op: row.Delete, Old: cols("id", "2")}}},
	}, {
		sql:  "INSERT INTO dec_f VALUES (1, 10, '" + big + "')",
		want: []event{{Op: "Change", Change: row.Change{Table: "public.dec_f", Op: row.Insert, New: cols("id", "1", "author_id", "10", "body", big)}}},
	}, {
		sql: "UPDATE dec_f SET author_id = 11 WHERE id = 1", // FULL: every old column, TOAST included
		want: []event{{Op: "Change", Change: row.Change{Table: "public.dec_f", Op: row.Update,
			Old: cols("id", "1", "author_id", "10", "body", big),
			New: []row.Column{{Name: "id", Value: row.Value{Text: "1"}}, {Name: "author_id", Value: row.Value{Text: "11"}}, {Name: "body", Value: row.Value{Unchanged: true}}}}}},
	}, {
		sql:  "UPDATE dec_f SET body = NULL WHERE id = 1; DELETE FROM dec_f WHERE id = 1",
		want: []event{{Op: "Change", Change: row.Change{Table: "public.dec_f", Op: row.Update, Old: cols("id", "1", "author_id", "11", "body", big), New: []row.Column{{Name: "id", Value: row.Value{Text: "1"}}, {Name: "author_id", Value: row.Value{Text: "11"}}, {Name: "body", Value: row.Value{Null: true}}}}}, {Op: "Change", Change: row.Change{Table: "public.dec_f", Op: row.Delete, Old: []row.Column{{Name: "id", Value: row.Value{Text: "1"}}, {Name: "author_id", Value: row.Value{Text: "11"}}, {Name: "body", Value: row.Value{Null: true}}}}}},
	}, {
		sql: "TRUNCATE dec_a, dec_f",
		want: []event{
			{Op: "Change", Change: row.Change{Table: "public.dec_a", Op: row.Truncate}},
			{Op: "Change", Change: row.Change{Table: "public.dec_f", Op: row.Truncate}},
		},
	}, {
		sql: `BEGIN; INSERT INTO dec_other VALUES (1); INSERT INTO dec_a VALUES (5, 50, 'y');
			SELECT pg_logical_emit_message(true, 'invalidate', 'k1 k2');
			SELECT pg_logical_emit_message(true, 'ignored', 'k3'); COMMIT`,
		want: []event{
			{Op: "Change", Change: row.Change{Table: "public.dec_a", Op: row.Insert, New: cols("id", "5", "author_id", "50", "body", "y")}},
			{Op: "Message", Msg: Message{Transactional: true, Prefix: "invalidate", Content: []byte("k1 k2")}},
		},
	}}
	for i, st := range steps {
		before := len(c.events())
		pg.exec(t, st.sql)
		waitFor(t, fmt.Sprintf("step %d to commit", i), func() bool {
			return len(commits(c.events()[before:])) == 1
		})
		evs := c.events()[before:]
		if evs[0].Op != "Begin" || evs[len(evs)-1].Op != "Commit" {
			t.Fatalf("step %d (%s): got events %+v; want Begin ... Commit", i, st.sql, evs)
		}
		b, cm := evs[0].Tx, evs[len(evs)-1].Tx
		if b.Xid == 0 || cm.Xid != b.Xid || cm.CommitLSN != b.CommitLSN || cm.EndLSN <= cm.CommitLSN || cm.CommitTime.IsZero() {
			t.Errorf("step %d: got Begin %+v and Commit %+v; want same xid and commit LSN, end after commit", i, b, cm)
		}
		got := evs[1 : len(evs)-1]
		for j := range got {
			if got[j].Tx != b {
				t.Errorf("step %d: event %d has tx %+v; want Begin's %+v", i, j, got[j].Tx, b)
			}
			got[j].Tx = TxInfo{}
			got[j].Msg.LSN = 0
		}
		if !equalEvents(got, st.want) {
			t.Errorf("step %d (%.80s): got\n%s\nwant\n%s", i, st.sql, fmtEvents(got), fmtEvents(st.want))
		}
	}

	// Non-transactional messages come as a transaction of their own, at
	// their own position.
	before := len(c.events())
	pg.exec(t, "SELECT pg_logical_emit_message(false, 'ignored', 'x'); SELECT pg_logical_emit_message(false, 'invalidate', 'k9')")
	waitFor(t, "the non-transactional message", func() bool { return len(c.events()) >= before+3 })
	evs := c.events()[before:]
	if len(evs) != 3 || evs[0].Op != "Begin" || evs[1].Op != "Message" || evs[2].Op != "Commit" ||
		evs[1].Msg.Transactional || string(evs[1].Msg.Content) != "k9" ||
		evs[1].Tx.Xid != 0 || evs[1].Tx.CommitLSN != evs[1].Msg.LSN || evs[2].Tx.EndLSN != evs[1].Msg.LSN {
		t.Errorf("got %s; want Begin, the non-transactional message k9 with Xid 0 and CommitLSN its LSN, and Commit with EndLSN its LSN", fmtEvents(evs))
	}
	if st := s.Stats(); st.State != StateStreaming || st.Txs != uint64(len(steps)) || st.Messages != 2 || st.IgnoredMessages != 2 || st.DecodeErrors != 0 {
		t.Errorf("got stats %+v; want streaming, %d txs, 2 messages, 2 ignored, no decode errors", st, len(steps))
	}
}

func equalEvents(a, b []event) bool {
	return fmtEvents(a) == fmtEvents(b)
}

func fmtEvents(evs []event) string {
	var sb strings.Builder
	for _, e := range evs {
		switch e.Op {
		case "Change":
			fmt.Fprintf(&sb, "  %s %s old=%s new=%s\n", e.Change.Op, e.Change.Table, fmtCols(e.Change.Old), fmtCols(e.Change.New))
		case "Message":
			fmt.Fprintf(&sb, "  message tx=%v %q %q\n", e.Msg.Transactional, e.Msg.Prefix, e.Msg.Content)
		default:
			fmt.Fprintf(&sb, "  %s %+v\n", e.Op, e.Tx)
		}
	}
	return sb.String()
}

func fmtCols(cs []row.Column) string {
	if cs == nil {
		return "nil"
	}
	parts := make([]string, len(cs))
	for i, c := range cs {
		v := c.Value.Text
		if len(v) > 20 {
			v = fmt.Sprintf("%s...(%d bytes)", v[:10], len(v))
		}
		switch {
		case c.Value.Null:
			v = "NULL"
		case c.Value.Unchanged:
			v = "UNCHANGED"
		}
		parts[i] = c.Name + "=" + v
	}
	return "[" + strings.Join(parts, " ") + "]"
}

func (pg *pgEnv) testConfirmAndIdleAdvance(t *testing.T) {
	pg.exec(t, "CREATE TABLE conf_a (id int PRIMARY KEY); CREATE TABLE conf_other (id int PRIMARY KEY)")
	s := newStream(t, pg.testConfig("conf", "public.conf_a"), true)
	var c collector // does not confirm by itself
	start(t, s, &c)
	waitFor(t, "streaming", func() bool { return s.Stats().State == StateStreaming })

	pg.exec(t, "INSERT INTO conf_a VALUES (1)")
	waitFor(t, "the insert", func() bool { return len(commits(c.events())) == 1 })
	tx := commits(c.events())[0]
	// Delivered but not confirmed: the slot must not move past it, whatever
	// keepalives come meanwhile.
	pg.exec(t, "INSERT INTO conf_other VALUES (1)")
	flush := pg.lsn(t, "SELECT pg_current_wal_flush_lsn()::text")
	waitFor(t, "a keepalive past the unpublished insert", func() bool { return s.Stats().ServerWALEnd >= flush })
	if got := s.Stats().ConfirmedLSN; got >= tx.EndLSN {
		t.Fatalf("got confirmed %s before its ack; want below the transaction's end %s", got, tx.EndLSN)
	}
	if got := pg.slot(t, "conf").ConfirmedFlush; got >= tx.EndLSN {
		t.Fatalf("got slot confirmed_flush_lsn %s before its ack; want below %s", got, tx.EndLSN)
	}

	c.ackUpTo(1)
	waitFor(t, "the slot's confirmed_flush_lsn to reach the confirmed end", func() bool {
		return pg.slot(t, "conf").ConfirmedFlush >= tx.EndLSN
	})

	// Idle or fully filtered: writes to a table outside the publication
	// move the slot along on keepalives, with no handler call.
	n := len(c.events())
	for i := 2; i <= 4; i++ {
		pg.exec(t, "INSERT INTO conf_other VALUES ($1)", i)
	}
	flush = pg.lsn(t, "SELECT pg_current_wal_flush_lsn()::text")
	waitFor(t, "the slot to advance past the unpublished writes", func() bool {
		return pg.slot(t, "conf").ConfirmedFlush >= flush
	})
	if got := c.events()[n:]; len(got) != 0 {
		t.Errorf("got handler calls for unpublished writes: %s; want none", fmtEvents(got))
	}
	if st := s.Stats(); st.ConfirmedLSN < flush {
		t.Errorf("got stats %+v; want confirmed at least %s", st, flush)
	}
}

func (pg *pgEnv) testRestartResumes(t *testing.T) {
	pg.exec(t, "CREATE TABLE res_a (id int PRIMARY KEY)")
	cfg := pg.testConfig("res", "public.res_a")
	s1 := newStream(t, cfg, true)
	var c1 collector
	r1 := start(t, s1, &c1)
	for i := 1; i <= 2; i++ {
		pg.exec(t, "INSERT INTO res_a VALUES ($1)", i)
	}
	waitFor(t, "the first two transactions", func() bool { return len(commits(c1.events())) == 2 })
	c1.ackUpTo(2)
	for i := 3; i <= 4; i++ { // delivered, never confirmed
		pg.exec(t, "INSERT INTO res_a VALUES ($1)", i)
	}
	waitFor(t, "the next two transactions", func() bool { return len(commits(c1.events())) == 4 })
	r1.stop(t)
	if got := insertedIDs(c1.events()); !slices.Equal(got, []int{1, 2, 3, 4}) {
		t.Fatalf("first stream: got ids %v; want [1 2 3 4]", got)
	}

	// A new process: everything after the confirmed position again, and
	// nothing before it.
	s2 := newStream(t, cfg, true)
	var c2 collector
	start(t, s2, &c2)
	pg.exec(t, "INSERT INTO res_a VALUES (5)")
	waitFor(t, "the redelivered and new transactions", func() bool { return slices.Contains(insertedIDs(c2.events()), 5) })
	if got := insertedIDs(c2.events()); !slices.Equal(got, []int{3, 4, 5}) {
		t.Errorf("second stream: got ids %v; want [3 4 5]", got)
	}
}

func (pg *pgEnv) testStandby(t *testing.T) {
	pg.exec(t, "CREATE TABLE sb_a (id int PRIMARY KEY)")
	cfg := pg.testConfig("sb", "public.sb_a")
	s1 := newStream(t, cfg, true)
	var c1 collector
	c1.autoAck.Store(true)
	r1 := start(t, s1, &c1)
	waitFor(t, "the first stream to stream", func() bool { return s1.Stats().State == StateStreaming })

	s2 := newStream(t, cfg, true) // Setup is idempotent
	var c2 collector
	c2.autoAck.Store(true)
	start(t, s2, &c2)
	waitFor(t, "the second stream to wait as standby", func() bool { return s2.Stats().State == StateStandby })

	pg.exec(t, "INSERT INTO sb_a VALUES (1)")
	waitFor(t, "the first stream to get and confirm the insert", func() bool {
		cs := commits(c1.events())
		return len(cs) == 1 && s1.Stats().ConfirmedLSN >= cs[0].EndLSN
	})
	if st := s2.Stats(); st.State != StateStandby || len(c2.events()) != 0 {
		t.Fatalf("got standby state %s with %d events; want standby with none", st.State, len(c2.events()))
	}

	r1.stop(t) // sends the confirmed position and frees the slot
	waitFor(t, "the standby to take over", func() bool { return s2.Stats().State == StateStreaming })
	pg.exec(t, "INSERT INTO sb_a VALUES (2)")
	waitFor(t, "the insert on the new active stream", func() bool { return len(commits(c2.events())) >= 1 })
	if got := insertedIDs(c2.events()); !slices.Equal(got, []int{2}) {
		t.Errorf("after takeover: got ids %v; want [2]", got)
	}
}

func (pg *pgEnv) testSlotGone(t *testing.T) {
	pg.exec(t, "CREATE TABLE gone_a (id int PRIMARY KEY)")
	cfg := pg.testConfig("gone", "public.gone_a")

	// Missing before Run starts.
	s := newStream(t, cfg, true)
	pg.exec(t, "SELECT pg_drop_replication_slot('gone')")
	err := s.Run(context.Background(), &collector{})
	if !errors.Is(err, ErrSlotGone) || Retryable(err) || !strings.Contains(err.Error(), "stale") {
		t.Fatalf("Run on a dropped slot: got %v; want ErrSlotGone, not retryable, telling caches may be stale", err)
	}

	// Dropped while streaming: the connection is cut, then the slot is
	// dropped while the stream waits to reconnect.
	cfg.ReconnectMin, cfg.ReconnectMax = time.Second, time.Second
	s = newStream(t, cfg, true)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, &collector{}) }()
	waitFor(t, "streaming", func() bool { return s.Stats().State == StateStreaming })
	waitFor(t, "the slot to be dropped", func() bool {
		_ = pg.Exec(context.Background(), "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'gone' AND active_pid IS NOT NULL")
		return pg.Exec(context.Background(), "SELECT pg_drop_replication_slot('gone')") == nil
	})
	select {
	case err := <-done:
		if !errors.Is(err, ErrSlotGone) {
			t.Fatalf("Run after the slot was dropped: got %v; want ErrSlotGone", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Run did not return within a minute of the slot being dropped")
	}
	if st := s.Stats(); st.Reconnects == 0 || st.State != StateStopped {
		t.Errorf("got stats %+v; want a reconnect and state stopped", st)
	}
}

func (pg *pgEnv) testSetupAndInspect(t *testing.T) {
	pg.exec(t, `CREATE TABLE su_pk (id int PRIMARY KEY, author_id int NOT NULL, title text);
		CREATE UNIQUE INDEX su_pk_author ON su_pk (id, author_id);
		CREATE TABLE su_full (id int PRIMARY KEY, v text); ALTER TABLE su_full REPLICA IDENTITY FULL;
		CREATE TABLE su_idx (a int NOT NULL, b int NOT NULL, c text); CREATE UNIQUE INDEX su_idx_ab ON su_idx (a, b);
		ALTER TABLE su_idx REPLICA IDENTITY USING INDEX su_idx_ab;
		CREATE TABLE su_none (a int, b text);
		CREATE TABLE "Su Quoted" (id int PRIMARY KEY);
		CREATE TABLE su_extra (id int PRIMARY KEY);
		CREATE PUBLICATION su FOR TABLE su_extra WITH (publish = 'insert')`)
	ctx := context.Background()

	infos, err := Inspect(ctx, pg.DSN(""), []string{"public.su_pk", "public.su_full", "public.su_idx", "public.su_none", "public.Su Quoted", "public.su_missing"})
	if err != nil {
		t.Fatal(err)
	}
	type check struct {
		ident   byte
		idCols  []string
		needOld []string
		ok      bool
		fix     string
	}
	wants := []check{
		{'d', []string{"id"}, []string{"author_id"}, false, "ALTER TABLE public.su_pk REPLICA IDENTITY USING INDEX su_pk_author;"},
		{'f', []string{"id", "v"}, []string{"v"}, true, ""},
		{'i', []string{"a", "b"}, []string{"c"}, false, "ALTER TABLE public.su_idx REPLICA IDENTITY FULL;"},
		{'d', nil, nil, false, "ALTER TABLE public.su_none REPLICA IDENTITY FULL;"},
		{'d', []string{"id"}, []string{"id"}, true, ""},
	}
	for i, w := range wants {
		ti := infos[i]
		if !ti.Exists || ti.ReplicaIdentity != w.ident || !slices.Equal(ti.IdentityColumns, w.idCols) {
			t.Errorf("%s: got exists %v, identity %q, columns %v; want true, %q, %v", ti.Name, ti.Exists, ti.ReplicaIdentity, ti.IdentityColumns, w.ident, w.idCols)
		}
		if ok, fix := CheckIdentity(ti, w.needOld); ok != w.ok || fix != w.fix {
			t.Errorf("%s CheckIdentity(%v): got %v %q; want %v %q", ti.Name, w.needOld, ok, fix, w.ok, w.fix)
		}
	}
	if infos[4].QuotedName != `public."Su Quoted"` {
		t.Errorf("got quoted name %s; want public.\"Su Quoted\"", infos[4].QuotedName)
	}
	if infos[5].Exists {
		t.Errorf("su_missing: got exists; want not")
	}
	if ok, fix := CheckIdentity(infos[5], []string{"id"}); ok || fix != "" {
		t.Errorf("missing table: got %v %q; want false and no fix", ok, fix)
	}
	if ok, fix := CheckIdentity(infos[0], []string{"nosuchcolumn"}); ok || fix != "" {
		t.Errorf("missing column: got %v %q; want false and no fix", ok, fix)
	}

	// Setup refuses tables that are missing or have no replica identity.
	for _, tc := range []struct {
		table string
		want  error
	}{{"public.su_missing", ErrNoTable}, {"public.su_none", ErrNoIdentity}} {
		s := newStream(t, pg.testConfig("su_bad", tc.table), false)
		err := s.Setup(ctx)
		if !errors.Is(err, tc.want) {
			t.Errorf("Setup with %s: got %v; want %v", tc.table, err, tc.want)
		}
		if errors.Is(err, ErrNoIdentity) && !strings.Contains(err.Error(), "ALTER TABLE public.su_none REPLICA IDENTITY FULL;") {
			t.Errorf("got %v; want the ALTER TABLE fix in the message", err)
		}
	}

	// An existing publication gets the missing tables and every operation;
	// its extra table stays. Setup twice is harmless.
	s := newStream(t, pg.testConfig("su", "public.su_pk", "public.Su Quoted"), false)
	for range 2 {
		if err := s.Setup(ctx); err != nil {
			t.Fatalf("setup: %v", err)
		}
	}
	conn, err := pgx.Connect(ctx, pg.DSN(""))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, _ := conn.Query(ctx, "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = 'su' ORDER BY 1")
	tables, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"public.Su Quoted", "public.su_extra", "public.su_pk"}; !slices.Equal(tables, want) {
		t.Errorf("got publication tables %v; want %v", tables, want)
	}
	var all bool
	if err := conn.QueryRow(ctx, "SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate FROM pg_publication WHERE pubname = 'su'").Scan(&all); err != nil || !all {
		t.Errorf("got publish all operations %v (%v); want true", all, err)
	}
	info := pg.slot(t, "su")
	if !info.Exists || info.Plugin != "pgoutput" || info.Active || info.ConfirmedFlush == 0 {
		t.Errorf("got slot %+v; want an inactive pgoutput slot with a confirmed position", info)
	}
	if info := pg.slot(t, "no_such_slot"); info.Exists {
		t.Errorf("got slot %+v for a missing slot; want Exists false", info)
	}
}

// heapWatcher is a Handler that keeps nothing, counts changes, and samples
// the live heap.
type heapWatcher struct {
	s       *Stream
	changes int
	peak    uint64
	done    chan TxInfo
}

func (h *heapWatcher) Begin(context.Context, TxInfo) error { return nil }

func (h *heapWatcher) Change(_ context.Context, _ TxInfo, c row.Change) error {
	h.changes++
	if h.changes%50000 == 0 {
		h.sample()
	}
	return nil
}

func (h *heapWatcher) Message(context.Context, TxInfo, Message) error { return nil }

func (h *heapWatcher) Commit(_ context.Context, tx TxInfo, ack *Ack) error {
	h.sample()
	ack.Done()
	h.done <- tx
	return nil
}

func (h *heapWatcher) sample() {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	h.peak = max(h.peak, ms.HeapAlloc)
}

func (pg *pgEnv) testMillionRows(t *testing.T) {
	const rows = 1_000_000
	pg.exec(t, "CREATE TABLE big_a (id int PRIMARY KEY, author_id int, title text)")
	s := newStream(t, pg.testConfig("big", "public.big_a"), true)
	h := &heapWatcher{s: s, done: make(chan TxInfo, 1)}
	start(t, s, h)
	pg.exec(t, "INSERT INTO big_a SELECT g, g % 1000, 'title number ' || g FROM generate_series(1, $1) g", rows)
	select {
	case <-h.done:
	case <-time.After(10 * time.Minute):
		t.Fatal("the 1M-row transaction did not arrive within 10 minutes")
	}
	const limit = 200 << 20
	t.Logf("1M-row transaction: %d changes, peak live heap %.1f MB", h.changes, float64(h.peak)/(1<<20))
	if h.changes != rows {
		t.Errorf("got %d changes; want %d", h.changes, rows)
	}
	if h.peak > limit {
		t.Errorf("got peak heap %d MB; want under %d MB", h.peak>>20, limit>>20)
	}
}

func (pg *pgEnv) testPrimaryKill(t *testing.T) {
	pg.exec(t, "CREATE TABLE kill_a (id int PRIMARY KEY)")
	s := newStream(t, pg.testConfig("kill", "public.kill_a"), true)
	var c collector
	c.autoAck.Store(true)
	start(t, s, &c)
	waitFor(t, "streaming", func() bool { return s.Stats().State == StateStreaming })

	// A writer inserts one row per transaction and remembers every insert
	// the server acknowledged; the primary is killed under it.
	var acked []int
	insert := func(id int) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if pg.Exec(ctx, "INSERT INTO kill_a VALUES ($1)", id) == nil {
			acked = append(acked, id)
		}
	}
	id := 0
	for ; id < 50; id++ {
		insert(id)
	}
	if err := pg.Kill(); err != nil {
		t.Fatal(err)
	}
	for ; id < 55; id++ {
		insert(id) // fails: the server is down
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := pg.Start(ctx); err != nil {
		t.Fatal(err)
	}
	for ; id < 100; id++ {
		insert(id)
	}
	if len(acked) < 95 {
		t.Fatalf("got %d acknowledged inserts; want at least 95", len(acked))
	}
	waitFor(t, "every acknowledged insert", func() bool {
		got := insertedIDs(c.events())
		for _, a := range acked {
			if !slices.Contains(got, a) {
				return false
			}
		}
		return true
	})
	if st := s.Stats(); st.Reconnects == 0 || st.State != StateStreaming {
		t.Errorf("got stats %+v; want at least one reconnect, streaming", st)
	}
}

// blockingHandler blocks in its first Commit until release is closed.
type blockingHandler struct {
	collector
	blocked chan struct{}
	release chan struct{}
	once    sync.Once
}

func (h *blockingHandler) Commit(ctx context.Context, tx TxInfo, ack *Ack) error {
	h.once.Do(func() {
		close(h.blocked)
		<-h.release
	})
	return h.collector.Commit(ctx, tx, ack)
}

// retryingHandler fails its first two Begins with ErrRetry.
type retryingHandler struct {
	collector
	retries atomic.Int32
}

func (h *retryingHandler) Begin(ctx context.Context, tx TxInfo) error {
	if h.retries.Add(1) <= 2 {
		return fmt.Errorf("checkpoints unreadable: %w", ErrRetry)
	}
	return h.collector.Begin(ctx, tx)
}

// testHandlerRetry: a handler's ErrRetry does not stop Run: it
// reconnects and delivers the transaction again, until the handler takes
// it.
func (pg *pgEnv) testHandlerRetry(t *testing.T) {
	pg.exec(t, "CREATE TABLE retry_a (id int PRIMARY KEY)")
	s := newStream(t, pg.testConfig("retry", "public.retry_a"), true)
	h := &retryingHandler{}
	h.autoAck.Store(true)
	r := start(t, s, h)
	pg.exec(t, "INSERT INTO retry_a VALUES (1)")
	waitFor(t, "the insert, after two retries", func() bool { return len(insertedIDs(h.events())) >= 1 })
	if got := insertedIDs(h.events()); !slices.Equal(got, []int{1}) {
		t.Errorf("got ids %v; want [1]", got)
	}
	if n := h.retries.Load(); n != 3 {
		t.Errorf("got %d Begins; want 3 (two retried)", n)
	}
	if st := s.Stats(); st.Reconnects != 2 || st.State != StateStreaming {
		t.Errorf("got stats %+v; want 2 reconnects, streaming", st)
	}
	select {
	case err := <-r.done:
		t.Fatalf("Run returned %v; want it to keep streaming", err)
	default:
	}
}

// testSlowHandler blocks the handler longer than the server's
// wal_sender_timeout (10s in testenv): status updates must keep going out
// meanwhile, so the server does not drop the connection.
func (pg *pgEnv) testSlowHandler(t *testing.T) {
	pg.exec(t, "CREATE TABLE slow_a (id int PRIMARY KEY)")
	s := newStream(t, pg.testConfig("slow", "public.slow_a"), true)
	h := &blockingHandler{blocked: make(chan struct{}), release: make(chan struct{})}
	h.autoAck.Store(true)
	start(t, s, h)
	pg.exec(t, "INSERT INTO slow_a VALUES (1)")
	<-h.blocked
	// Longer than wal_sender_timeout; this is how long the handler blocks,
	// not a bound on anything measured.
	time.Sleep(12 * time.Second)
	close(h.release)
	pg.exec(t, "INSERT INTO slow_a VALUES (2)")
	waitFor(t, "both inserts", func() bool { return len(insertedIDs(h.events())) >= 2 })
	if got := insertedIDs(h.events()); !slices.Equal(got, []int{1, 2}) {
		t.Errorf("got ids %v; want [1 2]", got)
	}
	if st := s.Stats(); st.Reconnects != 0 {
		t.Errorf("got %d reconnects while the handler blocked; want 0", st.Reconnects)
	}
}
