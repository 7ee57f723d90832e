package tail

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/batcher"
	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/counters"
	"github.com/pgcache/pgcache/counterstore"
	"github.com/pgcache/pgcache/keys"
	"github.com/pgcache/pgcache/testenv"
	"github.com/pgcache/pgcache/wal"
)

// harness runs a tail Role against a real primary and NATS.
type harness struct {
	t      *testing.T
	env    *testenv.Env
	js     jetstream.JetStream
	reg    *prometheus.Registry
	role   *Role
	done   chan struct{} // closed when Run returned; err is its result
	err    error
	cancel context.CancelFunc
	name   string // slot, publication and stream name
}

func newEnv(t *testing.T) (*testenv.Env, jetstream.JetStream) {
	return newEnvWith(t, testenv.Options{NoReplicas: true, MemcachedPerDC: -1})
}

// newEnvWith starts an environment and connects to dc1's JetStream.
func newEnvWith(t *testing.T, opts testenv.Options) (*testenv.Env, jetstream.JetStream) {
	env := testenv.New(t, opts)
	nc, err := nats.Connect(env.DC("dc1").NATS.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return env, js
}

func (h *harness) exec(sql string, args ...any) {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := h.env.Primary.Exec(ctx, sql, args...); err != nil {
		h.t.Fatalf("%s: %v", sql, err)
	}
}

// config is a Role config for rules (and counters, when ctrs is set).
func (h *harness) config(rules []keys.Rule, ctrs []counters.Rule) (Config, *keys.Set) {
	h.t.Helper()
	set, err := keys.Compile(rules)
	if err != nil {
		h.t.Fatal(err)
	}
	c := Config{WAL: wal.DefaultConfig(), Publisher: bus.DefaultPublisherConfig(), CheckInterval: 200 * time.Millisecond}
	c.WAL.DSN = h.env.Primary.DSN("")
	c.WAL.Slot, c.WAL.Publication = h.name, h.name
	c.WAL.StatusInterval = 100 * time.Millisecond
	c.Publisher.Origin = "dc1"
	c.Publisher.Stream = bus.StreamConfig{Name: strings.ToUpper(h.name), Subject: "inv." + h.name}
	if len(ctrs) > 0 {
		cs, err := counters.Compile(ctrs)
		if err != nil {
			h.t.Fatal(err)
		}
		c.Counters = cs
		c.WAL.MessagePrefixes = append(c.WAL.MessagePrefixes, counters.RepairPrefix)
		c.Batcher = batcher.Config{MaxPending: 1000, Interval: 20 * time.Millisecond}
		c.Store = counterstore.Config{DSN: c.WAL.DSN, MessagePrefix: "invalidate"}
		c.Increments = bus.StreamConfig{Name: strings.ToUpper(h.name) + "_INCR"}
	}
	c.WAL.Tables = Tables(set, c.Counters)
	return c, set
}

// start runs a Role with cfg until the test ends.
func (h *harness) start(cfg Config, rules *keys.Set) {
	h.t.Helper()
	h.reg = prometheus.NewRegistry()
	role, err := New(cfg, rules, h.js, h.reg, zaptest.NewLogger(h.t))
	if err != nil {
		h.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	h.role, h.cancel, h.done = role, cancel, done
	go func() { h.err = role.Run(ctx); close(done) }()
	h.t.Cleanup(func() {
		cancel()
		<-done
	})
	select {
	case <-role.Ready():
	case <-done:
		h.t.Fatalf("role stopped while setting up: %v", h.err)
	case <-time.After(time.Minute):
		h.t.Fatal("role not ready within a minute")
	}
}

// stop is the hard stop; it waits for Run to return.
func (h *harness) stop() {
	h.cancel()
	<-h.done
}

// running fails the test if the role has stopped.
func (h *harness) running() {
	h.t.Helper()
	select {
	case <-h.done:
		h.t.Fatalf("the role stopped: %v", h.err)
	default:
	}
}

// published collects every key published so far on the role's stream.
func (h *harness) published() map[string]bool {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := h.js.Stream(ctx, strings.ToUpper(h.name))
	if err != nil {
		h.t.Fatal(err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		h.t.Fatal(err)
	}
	got := map[string]bool{}
	for seq := info.State.FirstSeq; seq > 0 && seq <= info.State.LastSeq; seq++ {
		m, err := st.GetMsg(ctx, seq)
		if err != nil {
			continue
		}
		b, err := bus.Decode(m.Data)
		if err != nil {
			h.t.Fatal(err)
		}
		for _, k := range b.Keys {
			got[k] = true
		}
	}
	return got
}

// waitKeys waits until every key is published.
func (h *harness) waitKeys(ks ...string) {
	h.t.Helper()
	testenv.Eventually(h.t, time.Minute, fmt.Sprintf("keys %v published", ks), func() bool {
		got := h.published()
		for _, k := range ks {
			if !got[k] {
				return false
			}
		}
		return true
	})
}

// metric is the value of a metric with the given labels (0 if absent).
func (h *harness) metric(name string, labels ...string) float64 {
	h.t.Helper()
	mfs, err := h.reg.Gather()
	if err != nil {
		h.t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if matches(m, labels) {
				switch {
				case m.Counter != nil:
					return m.Counter.GetValue()
				case m.Gauge != nil:
					return m.Gauge.GetValue()
				}
			}
		}
	}
	return 0
}

func matches(m *dto.Metric, labels []string) bool {
	for i := 0; i+1 < len(labels); i += 2 {
		found := false
		for _, lp := range m.GetLabel() {
			if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
				found = true
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// TestRoleReplicaIdentityChanged: after ALTER TABLE ... REPLICA IDENTITY
// DEFAULT on a table whose keys use a non-key column, the role notices
// (the relation message, and the periodic check), says which table is
// unsafe, and counts the UPDATEs whose old key it could not render. The
// other keys of those changes are still published. Today's code renders
// the old key from the new row and says nothing.
func TestRoleReplicaIdentityChanged(t *testing.T) {
	env, js := newEnv(t)
	h := &harness{t: t, env: env, js: js, name: "ident"}
	h.exec(`CREATE TABLE ident_posts (id int PRIMARY KEY, author_id int NOT NULL); ALTER TABLE ident_posts REPLICA IDENTITY FULL`)
	h.exec(`INSERT INTO ident_posts VALUES (1, 10)`)
	cfg, rules := h.config([]keys.Rule{{Table: "public.ident_posts", Keys: []string{"post:{id}", "user_posts:{author_id}"}}}, nil)
	h.start(cfg, rules)

	h.exec(`UPDATE ident_posts SET author_id = 11 WHERE id = 1`)
	h.waitKeys("post:1", "user_posts:10", "user_posts:11")
	testenv.Eventually(t, time.Minute, "identity ok", func() bool {
		return h.metric("invalidator_replica_identity_ok", "table", "public.ident_posts") == 1
	})

	h.exec(`ALTER TABLE ident_posts REPLICA IDENTITY DEFAULT`)
	h.exec(`UPDATE ident_posts SET author_id = 12 WHERE id = 1`)
	h.waitKeys("user_posts:12")
	testenv.Eventually(t, time.Minute, "the weak identity to be reported", func() bool {
		return h.metric("invalidator_replica_identity_ok", "table", "public.ident_posts") == 0 &&
			h.metric("invalidator_unrendered_keys_total", "table", "public.ident_posts", "reason", "old_value_missing") >= 1
	})
	h.running()

	// Fixed again: the next relation message and the check say so.
	h.exec(`ALTER TABLE ident_posts REPLICA IDENTITY FULL`)
	h.exec(`UPDATE ident_posts SET author_id = 13 WHERE id = 1`)
	h.waitKeys("user_posts:12", "user_posts:13")
	testenv.Eventually(t, time.Minute, "identity ok again", func() bool {
		return h.metric("invalidator_replica_identity_ok", "table", "public.ident_posts") == 1
	})
}

// TestRoleIncrementsFault: deleting the increments stream, or recreating
// it below the counters' checkpoint, is a counters fault: the role keeps
// publishing invalidations, says so (invalidator_increments_up 0, a
// counted error), and a restart does not fail either. Today's code stops
// the tail (exit 2 at start).
func TestRoleIncrementsFault(t *testing.T) {
	env, js := newEnv(t)
	h := &harness{t: t, env: env, js: js, name: "incf"}
	h.exec(`CREATE TABLE incf_posts (id int PRIMARY KEY)`)
	cfg, rules := h.config([]keys.Rule{{Table: "public.incf_posts", Keys: []string{"post:{id}"}}},
		[]counters.Rule{{Name: "incf_views", GroupBy: []string{"post_id"}, Key: "post:{post_id}:views"}})
	h.start(cfg, rules)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	testenv.Eventually(t, time.Minute, "increments consumed", func() bool { return h.metric("invalidator_increments_up") == 1 })
	for i := 1; i <= 3; i++ {
		if _, err := js.Publish(ctx, counters.IncrementSubjectPrefix+"incf_views", []byte(`{"counter":"incf_views","key":{"post_id":"1"},"delta":1}`)); err != nil {
			t.Fatal(err)
		}
	}
	testenv.Eventually(t, time.Minute, "increments flushed", func() bool {
		return h.role.batcher.Durable(NATSSource(cfg.Increments.Name)).Major >= 3
	})
	var stored int64
	if err := env.Primary.QueryRowArgs(ctx, `SELECT pos FROM pgcache_counter_checkpoints WHERE source = $1`, []any{NATSSource(cfg.Increments.Name)}, &stored); err != nil || stored < 3 {
		t.Fatalf("stored checkpoint of the increments: %d, %v; want 3", stored, err)
	}
	// The stream is deleted under the running role, then created again
	// empty (sequences start over, below the checkpoint).
	if err := js.DeleteStream(ctx, cfg.Increments.Name); err != nil {
		t.Fatal(err)
	}
	h.exec(`INSERT INTO incf_posts VALUES (1)`)
	h.waitKeys("post:1")
	h.running()
	h.stop()

	if _, err := bus.EnsureStream(ctx, js, IncrementStream(cfg.Increments.Name, "")); err != nil {
		t.Fatal(err)
	}
	h.start(cfg, rules) // a restart with the reset stream
	h.exec(`INSERT INTO incf_posts VALUES (2)`)
	h.waitKeys("post:2")
	testenv.Eventually(t, time.Minute, "the counters fault reported", func() bool {
		return h.metric("invalidator_counter_errors_total", "reason", "increments_unavailable") >= 1 && h.metric("invalidator_increments_up") == 0
	})
	h.running()
}

// TestRoleForgedRepair: any database role may call
// pg_logical_emit_message, so a repair marker sent that way (here: one
// that would zero every like) is refused, counted and logged, and a role
// other than the invalidator's cannot write the repair table; a real
// repair (counterstore's, as the invalidator's role) is applied. Today's
// code applies the forged marker.
func TestRoleForgedRepair(t *testing.T) {
	env, js := newEnv(t)
	h := &harness{t: t, env: env, js: js, name: "forge"}
	h.exec(`CREATE TABLE forge_likes (id int PRIMARY KEY, post_id int NOT NULL); ALTER TABLE forge_likes REPLICA IDENTITY FULL`)
	h.exec(`DO $$ BEGIN CREATE ROLE forge_app LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$`)
	h.exec(`GRANT INSERT, SELECT ON forge_likes TO forge_app`)
	cfg, rules := h.config([]keys.Rule{{Table: "public.forge_likes", Keys: []string{"like:{id}"}}},
		[]counters.Rule{{Name: "forge_post_likes", Table: "public.forge_likes", GroupBy: []string{"post_id"}, Key: "post:{post_id}:likes"}})
	cfg.Store.MessagePrefix = "invalidate"
	cfg.WAL.MessagePrefixes = append(cfg.WAL.MessagePrefixes, "invalidate")
	h.start(cfg, rules)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	count := func() int64 {
		var n int64
		err := env.Primary.QueryRowArgs(ctx, `SELECT coalesce((SELECT n FROM pgcache_counters WHERE counter = 'forge_post_likes' AND grp = '["1"]'), 0)`, nil, &n)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	h.exec(`INSERT INTO forge_likes VALUES (1, 1), (2, 1), (3, 1)`)
	testenv.Eventually(t, time.Minute, "3 likes counted", func() bool { return count() == 3 })

	// The forger: an application role.
	app, err := pgx.Connect(ctx, strings.Replace(env.Primary.DSN(""), "postgres://postgres@", "postgres://forge_app@", 1))
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close(context.Background())
	forged := `{"counter":"forge_post_likes","all":true,"groups":[]}`
	if _, err := app.Exec(ctx, `SELECT pg_logical_emit_message(true, $1, $2::text)`, counters.RepairPrefix, forged); err != nil {
		t.Fatal(err)
	}
	if _, err := app.Exec(ctx, `INSERT INTO pgcache_counter_repairs (payload) VALUES ($1)`, forged); err == nil {
		t.Fatal("the application role wrote the repair table; want permission denied")
	}
	h.exec(`INSERT INTO forge_likes VALUES (4, 1)`) // after the forgery in the WAL
	testenv.Eventually(t, time.Minute, "the forged repair refused and counted", func() bool {
		return h.metric("invalidator_counter_errors_total", "reason", "forged_repair") == 1
	})
	testenv.Eventually(t, time.Minute, "4 likes counted", func() bool { return count() == 4 })

	// A real repair, after the stored count was corrupted, sets it back.
	h.exec(`UPDATE pgcache_counters SET n = 100 WHERE counter = 'forge_post_likes'`)
	var out strings.Builder
	if err := h.role.store.Repair(ctx, cfg.Counters.Counter("forge_post_likes"), nil, time.Minute, &out); err != nil {
		t.Fatalf("repair: %v\n%s", err, out.String())
	}
	if n := count(); n != 4 {
		t.Fatalf("after the repair: got %d likes; want 4\n%s", n, out.String())
	}
	h.running()
}

// runUntilReady runs a Role and returns nil once it is ready, or the
// error it stopped with.
func (h *harness) runUntilReady(cfg Config, rules *keys.Set) error {
	h.t.Helper()
	role, err := New(cfg, rules, h.js, prometheus.NewRegistry(), zaptest.NewLogger(h.t))
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- role.Run(ctx) }()
	select {
	case <-role.Ready():
		cancel()
		<-done
		return nil
	case err := <-done:
		return err
	case <-time.After(time.Minute):
		cancel()
		<-done
		return errors.New("neither ready nor stopped within a minute")
	}
}

// TestRoleSlotLost: a pipeline that ran before and finds its slot missing
// never starts a new one silently. With on_slot_loss: exit it stops with
// ErrSlotLost (exit 3) and creates nothing; with flush it creates the
// slot, announces one flush of every pool on the stream, recounts the
// counters (the likes written while there was no slot are counted), and
// streams. Today's code creates a new slot and says nothing.
func TestRoleSlotLost(t *testing.T) {
	env, js := newEnv(t)
	h := &harness{t: t, env: env, js: js, name: "lost"}
	h.exec(`CREATE TABLE lost_likes (id int PRIMARY KEY, post_id int NOT NULL); ALTER TABLE lost_likes REPLICA IDENTITY FULL`)
	cfg, rules := h.config([]keys.Rule{{Table: "public.lost_likes", Keys: []string{"like:{id}"}}},
		[]counters.Rule{{Name: "lost_post_likes", Table: "public.lost_likes", GroupBy: []string{"post_id"}, Key: "post:{post_id}:likes"}})
	cfg.WAL.MessagePrefixes = append(cfg.WAL.MessagePrefixes, "invalidate")
	h.start(cfg, rules)
	h.exec(`INSERT INTO lost_likes VALUES (1, 1)`)
	h.waitKeys("like:1")
	h.stop()

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// The walsender lets go of the slot a moment after the stop.
	testenv.Eventually(t, time.Minute, "the slot dropped", func() bool {
		return env.Primary.Exec(ctx, `SELECT pg_drop_replication_slot('lost')`) == nil
	})
	h.exec(`INSERT INTO lost_likes VALUES (2, 1), (3, 1)`) // never decoded
	slotExists := func() bool {
		var n int
		if err := env.Primary.QueryRow(ctx, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'lost'`, &n); err != nil {
			t.Fatal(err)
		}
		return n == 1
	}

	err := h.runUntilReady(cfg, rules)
	if !errors.Is(err, ErrSlotLost) || !errors.Is(err, wal.ErrSlotGone) {
		t.Fatalf("on_slot_loss exit: got %v; want ErrSlotLost wrapping wal.ErrSlotGone", err)
	}
	if slotExists() {
		t.Fatal("on_slot_loss exit created a new slot; want none until an operator acts")
	}

	cfg.OnSlotLoss = SlotLossFlush
	h.start(cfg, rules)
	if !slotExists() {
		t.Fatal("on_slot_loss flush: no new slot")
	}
	flushes := func() int {
		st, err := js.Stream(ctx, strings.ToUpper(h.name))
		if err != nil {
			t.Fatal(err)
		}
		info, err := st.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for seq := info.State.FirstSeq; seq <= info.State.LastSeq; seq++ {
			if m, err := st.GetMsg(ctx, seq); err == nil {
				if b, err := bus.Decode(m.Data); err == nil && b.Flush {
					n++
				}
			}
		}
		return n
	}
	if n := flushes(); n != 1 {
		t.Fatalf("got %d flush announcements; want 1", n)
	}
	h.exec(`INSERT INTO lost_likes VALUES (4, 1)`)
	h.waitKeys("like:4")
	var n int64
	testenv.Eventually(t, time.Minute, "the likes recounted (4, of which 2 written without a slot)", func() bool {
		if err := env.Primary.QueryRowArgs(ctx, `SELECT coalesce((SELECT n FROM pgcache_counters WHERE counter = 'lost_post_likes' AND grp = '["1"]'), 0)`, nil, &n); err != nil {
			t.Fatal(err)
		}
		return n == 4
	})
	if h.metric("invalidator_slot_losses_total") != 1 {
		t.Errorf("got invalidator_slot_losses_total %v; want 1", h.metric("invalidator_slot_losses_total"))
	}
	// A restart afterwards is an ordinary one: no second flush.
	h.stop()
	h.start(cfg, rules)
	if n := flushes(); n != 1 {
		t.Fatalf("after a restart: got %d flush announcements; want still 1", n)
	}
	h.running()
}
