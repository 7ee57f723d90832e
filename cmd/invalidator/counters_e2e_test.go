package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/config"
	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/testenv"
)

// counterWorld is one DC with a tailing invalidator that keeps counters.
type counterWorld struct {
	t    *testing.T
	env  *testenv.Env
	ctx  context.Context
	inv  *proc
	pool *mcpool.Pool
	cfg  string
}

const counterSchema = `
CREATE TABLE likes (id bigserial PRIMARY KEY, post_id bigint NOT NULL, user_id bigint NOT NULL);
ALTER TABLE likes REPLICA IDENTITY FULL;
`

func (w *counterWorld) config() string {
	dc := w.env.DC("dc1")
	return fmt.Sprintf(`dc: dc1
postgres:
  dsn: %s
nats:
  url: %s
  placement: dc1
tail: true
purge:
  servers: [%s]
messages:
  prefix: invalidate
counters:
  - name: post_likes
    table: public.likes
    group_by: [post_id]
    key: "post:{post_id}:likes"
  - name: post_views
    group_by: [post_id]
    key: "post:{post_id}:views"
batcher:
  max_pending: 500
  interval: 50ms
increments:
  stream: COUNTERS
http:
  listen: off
`, w.env.Primary.DSN(""), dc.NATS.URL(), strings.Join(dc.MemcachedAddrs(), ", "))
}

func newCounterWorld(t *testing.T) *counterWorld {
	// Two DCs: testenv's JetStream needs a supercluster (one DC alone never elects a
	// meta leader). dc2 only hosts its NATS server.
	env := testenv.New(t, testenv.Options{NoReplicas: true, MemcachedPerDC: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	t.Cleanup(cancel)
	w := &counterWorld{t: t, env: env, ctx: ctx}
	if err := env.Primary.Exec(ctx, counterSchema); err != nil {
		t.Fatal(err)
	}
	// Likes from before the counter existed: the first start counts them.
	if err := env.Primary.Exec(ctx, `INSERT INTO likes (post_id, user_id) SELECT 1 + g % 100, 0 FROM generate_series(1, 500) g`); err != nil {
		t.Fatal(err)
	}
	cfg := mcpool.DefaultConfig()
	cfg.Servers = env.DC("dc1").MemcachedAddrs()
	pool, err := mcpool.New(cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pool.Close() })
	w.pool = pool
	w.cfg = w.config()
	w.inv = startInvalidator(t, "invalidator", w.cfg)
	// Ready when the slot and the counter tables exist (the slot is
	// created first), and a counted change was flushed.
	for deadline := time.Now().Add(90 * time.Second); ; {
		var n int64
		if err := w.env.Primary.QueryRow(ctx, `SELECT count(*) FROM pg_tables WHERE tablename = 'pgcache_counter_checkpoints'`, &n); err == nil && n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("invalidator not ready after 90s: no counter tables")
		}
		time.Sleep(50 * time.Millisecond)
	}
	w.settle()
	return w
}

func (w *counterWorld) conn() *pgx.Conn {
	w.t.Helper()
	for attempt := 0; ; attempt++ {
		c, err := pgx.Connect(w.ctx, w.env.Primary.DSN(""))
		if err == nil {
			return c
		}
		if attempt > 600 {
			w.t.Fatalf("connect to the primary: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// settle makes a counted change (a like on post -1, added and removed)
// and waits until the invalidator's checkpoint is past it: every change
// committed before settle is then flushed. Without an invalidator
// running it returns after the change.
func (w *counterWorld) settle() {
	w.t.Helper()
	c := w.conn()
	defer c.Close(context.Background())
	var id int64
	var lsn string
	err := pgx.BeginFunc(w.ctx, c, func(tx pgx.Tx) error {
		if err := tx.QueryRow(w.ctx, `INSERT INTO likes (post_id, user_id) VALUES (-1, 0) RETURNING id`).Scan(&id); err != nil {
			return err
		}
		return nil
	})
	if err == nil {
		err = pgx.BeginFunc(w.ctx, c, func(tx pgx.Tx) error {
			if _, err := tx.Exec(w.ctx, `DELETE FROM likes WHERE id = $1`, id); err != nil {
				return err
			}
			return tx.QueryRow(w.ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&lsn)
		})
	}
	if err != nil {
		w.t.Fatalf("settle: %v", err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		var done bool
		err := c.QueryRow(w.ctx, `SELECT coalesce((SELECT pos::numeric > pg_wal_lsn_diff($1::pg_lsn, '0/0') FROM pgcache_counter_checkpoints WHERE source = 'wal'), false)`, lsn).Scan(&done)
		if err == nil && done {
			return
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("settle: the counters checkpoint did not pass %s within 2m (err %v)", lsn, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkExact compares every post_likes group with SELECT count(*).
func (w *counterWorld) checkExact() {
	w.t.Helper()
	c := w.conn()
	defer c.Close(context.Background())
	rows, err := c.Query(w.ctx, `
		SELECT grp, coalesce(s.n, 0), coalesce(l.n, 0) FROM
		  (SELECT grp, n FROM pgcache_counters WHERE counter = 'post_likes') s
		  FULL JOIN (SELECT format('["%s"]', post_id) AS grp, count(*) AS n FROM likes GROUP BY post_id) l USING (grp)
		WHERE coalesce(s.n, 0) <> coalesce(l.n, 0) ORDER BY grp`)
	if err != nil {
		w.t.Fatal(err)
	}
	defer rows.Close()
	bad := 0
	for rows.Next() {
		var g string
		var stored, real int64
		if err := rows.Scan(&g, &stored, &real); err != nil {
			w.t.Fatal(err)
		}
		if bad < 10 {
			w.t.Errorf("post_likes %s: got %d; want %d (SELECT count(*))", g, stored, real)
		}
		bad++
	}
	if err := rows.Err(); err != nil {
		w.t.Fatal(err)
	}
	if bad > 0 {
		w.t.Fatalf("%d groups differ from SELECT count(*)", bad)
	}
	var groups, total int64
	if err := c.QueryRow(w.ctx, `SELECT count(*), coalesce(sum(n), 0) FROM pgcache_counters WHERE counter = 'post_likes' AND n <> 0`).Scan(&groups, &total); err != nil {
		w.t.Fatal(err)
	}
	w.t.Logf("exact: %d non-zero groups, %d likes", groups, total)
}

// writers runs n writers, each inserting at least perWriter likes on posts
// 1..100 in transactions of 50 rows and deleting 2 of every 5 it inserted.
// during() runs meanwhile, and the writers go on until it has returned, so
// every fault it injects lands while writes commit. A failed transaction
// (server restart) is retried on a new connection. It returns the number
// of failed transactions.
func (w *counterWorld) writers(n, perWriter int, during func()) int64 {
	w.t.Helper()
	var wg sync.WaitGroup
	var failed atomic.Int64
	var duringDone atomic.Bool
	if during == nil {
		duringDone.Store(true)
	}
	for wr := 0; wr < n; wr++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(wr), 7))
			c, err := pgx.Connect(w.ctx, w.env.Primary.DSN(""))
			for done := 0; done < perWriter || !duringDone.Load(); {
				if err != nil || c == nil || c.IsClosed() {
					time.Sleep(50 * time.Millisecond)
					c, err = pgx.Connect(w.ctx, w.env.Primary.DSN(""))
					if w.ctx.Err() != nil {
						return
					}
					continue
				}
				posts := make([]int64, 50)
				for i := range posts {
					posts[i] = 1 + rng.Int64N(100)
				}
				terr := pgx.BeginFunc(w.ctx, c, func(tx pgx.Tx) error {
					rows, err := tx.Query(w.ctx, `INSERT INTO likes (post_id, user_id) SELECT unnest($1::bigint[]), $2 RETURNING id`, posts, wr)
					if err != nil {
						return err
					}
					var ids []int64
					for rows.Next() {
						var id int64
						if err := rows.Scan(&id); err != nil {
							return err
						}
						ids = append(ids, id)
					}
					if err := rows.Err(); err != nil {
						return err
					}
					_, err = tx.Exec(w.ctx, `DELETE FROM likes WHERE id = ANY($1)`, ids[:20])
					return err
				})
				if terr != nil {
					failed.Add(1)
					c.Close(context.Background())
					c = nil
					continue
				}
				done += 50
			}
			if c != nil {
				c.Close(context.Background())
			}
		}()
	}
	if during != nil {
		during()
		duringDone.Store(true)
	}
	wg.Wait()
	if f := failed.Load(); f > 0 {
		w.t.Logf("%d writer transactions failed and were retried", f)
	}
	return failed.Load()
}

func TestCountersEndToEnd(t *testing.T) {
	w := newCounterWorld(t)
	top := t

	t.Run("rows present before the first start are counted", func(t *testing.T) {
		w.t = t
		w.checkExact()
	})

	t.Run("8 writers, 100k likes", func(t *testing.T) {
		w.t = t
		w.writers(8, 100000/8, nil)
		w.settle()
		w.checkExact()
	})

	t.Run("kill -9 three times while flushing", func(t *testing.T) {
		w.t = t
		w.writers(8, 20000/8, func() {
			for k := 0; k < 3; k++ {
				time.Sleep(time.Duration(400+rand.IntN(400)) * time.Millisecond)
				w.inv.kill()
				time.Sleep(100 * time.Millisecond)
				w.inv.start()
			}
		})
		w.settle()
		w.checkExact()
	})

	t.Run("primary restart mid-run", func(t *testing.T) {
		w.t = t
		failed := w.writers(4, 20000/4, func() {
			time.Sleep(500 * time.Millisecond)
			if err := w.env.Primary.Stop(); err != nil {
				t.Error(err)
			}
			time.Sleep(300 * time.Millisecond)
			if err := w.env.Primary.Start(w.ctx); err != nil {
				t.Fatal(err)
			}
			time.Sleep(500 * time.Millisecond)
		})
		if failed == 0 {
			t.Error("no writer transaction failed: the restart did not happen while writes were in flight")
		}
		w.settle()
		w.checkExact()
	})

	t.Run("update moves a like and invalidates both keys", func(t *testing.T) {
		w.t = t
		c := w.conn()
		defer c.Close(context.Background())
		var id int64
		if err := c.QueryRow(w.ctx, `INSERT INTO likes (post_id, user_id) VALUES (1001, 1) RETURNING id`).Scan(&id); err != nil {
			t.Fatal(err)
		}
		w.settle()
		if got := w.count("post_likes", "1001"); got != 1 {
			t.Fatalf("post 1001: got %d; want 1", got)
		}
		for _, k := range []string{"post:1001:likes", "post:1002:likes"} {
			if _, err := w.pool.MetaSet(w.ctx, k, []byte("cached"), mcpool.SetOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := c.Exec(w.ctx, `UPDATE likes SET post_id = 1002 WHERE id = $1`, id); err != nil {
			t.Fatal(err)
		}
		w.settle()
		if got, got2 := w.count("post_likes", "1001"), w.count("post_likes", "1002"); got != 0 || got2 != 1 {
			t.Fatalf("after the move: post 1001 %d, post 1002 %d; want 0 and 1", got, got2)
		}
		w.waitGone(30*time.Second, "post:1001:likes", "post:1002:likes")
		w.checkExact()
	})

	t.Run("repair while writes continue", func(t *testing.T) {
		w.t = t
		c := w.conn()
		defer c.Close(context.Background())
		// Corrupt two groups on purpose.
		if _, err := c.Exec(w.ctx, `UPDATE pgcache_counters SET n = n + 1000 WHERE counter = 'post_likes' AND grp IN ('["5"]', '["6"]')`); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Exec(w.ctx, `INSERT INTO pgcache_counters (counter, grp, key, n) VALUES ('post_likes', '["777777"]', 'post:777777:likes', 12)`); err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(t.TempDir(), "invalidator.yaml")
		if err := os.WriteFile(path, []byte(w.cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		w.writers(4, 8000/4, func() {
			time.Sleep(200 * time.Millisecond)
			var out, errb bytes.Buffer
			if code := run([]string{"repair", "-config", path, "-counter", "post_likes", "-group", "5", "-group", "[\"6\"]"}, &out, &errb); code != exitOK {
				t.Errorf("repair -group: exit %d: %s%s", code, out.String(), errb.String())
			}
			t.Logf("repair -group:\n%s", out.String())
			out.Reset()
			errb.Reset()
			// Without -group: every group, and the made-up one goes to 0.
			if code := run([]string{"repair", "-config", path, "-counter", "post_likes"}, &out, &errb); code != exitOK {
				t.Errorf("repair: exit %d: %s%s", code, out.String(), errb.String())
			}
			t.Logf("repair:\n%s", out.String())
		})
		w.settle()
		w.checkExact()
		if got := w.count("post_likes", "777777"); got != 0 {
			t.Errorf("made-up group after a full repair: got %d; want 0", got)
		}
	})

	t.Run("NATS increments, kill -9 three times", func(t *testing.T) {
		w.t = t
		nc, err := nats.Connect(w.env.DC("dc1").NATS.URL())
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		// The invalidator creates the stream once it holds the slot.
		for deadline := time.Now().Add(60 * time.Second); ; {
			if _, err := js.Stream(w.ctx, "COUNTERS"); err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("increments stream COUNTERS not created within 60s")
			}
			time.Sleep(50 * time.Millisecond)
		}
		const publishers, each = 4, 5000
		want := map[int64]int64{}
		var mu sync.Mutex
		var lastSeq, published atomic.Uint64
		var killsDone atomic.Bool
		var wg sync.WaitGroup
		for p := 0; p < publishers; p++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(uint64(p), 11))
				for i := 0; i < each || !killsDone.Load(); i++ {
					post := 1 + rng.Int64N(50)
					delta := int64(1 + rng.IntN(3))
					data, _ := json.Marshal(map[string]any{"counter": "post_views", "key": map[string]any{"post_id": post}, "delta": delta})
					ack, err := js.Publish(w.ctx, "counters.incr.post_views", data, jetstream.WithMsgID(fmt.Sprintf("p%d-%d", p, i)))
					if err != nil {
						t.Errorf("publish: %v", err)
						return
					}
					for {
						cur := lastSeq.Load()
						if ack.Sequence <= cur || lastSeq.CompareAndSwap(cur, ack.Sequence) {
							break
						}
					}
					mu.Lock()
					want[post] += delta
					mu.Unlock()
					published.Add(1)
				}
			}()
		}
		for k := 0; k < 3; k++ {
			time.Sleep(time.Duration(300+rand.IntN(300)) * time.Millisecond)
			w.inv.kill()
			time.Sleep(100 * time.Millisecond)
			w.inv.start()
		}
		killsDone.Store(true)
		wg.Wait()
		c := w.conn()
		defer c.Close(context.Background())
		for deadline := time.Now().Add(2 * time.Minute); ; {
			var pos int64
			err := c.QueryRow(w.ctx, `SELECT pos FROM pgcache_counter_checkpoints WHERE source = 'nats:COUNTERS'`).Scan(&pos)
			if err == nil && uint64(pos) >= lastSeq.Load() {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("increments checkpoint %d did not reach the last sequence %d (err %v)", pos, lastSeq.Load(), err)
			}
			time.Sleep(20 * time.Millisecond)
		}
		var sum int64
		for post, n := range want {
			if got := w.count("post_views", fmt.Sprint(post)); got != n {
				t.Errorf("post_views %d: got %d; want %d", post, got, n)
			}
			sum += n
		}
		t.Logf("%d increments (sum %d) over %d posts exact after 3 kills", published.Load(), sum, len(want))
	})

	t.Run("truncate resets the counter", func(t *testing.T) {
		w.t = t
		if err := w.env.Primary.Exec(w.ctx, `TRUNCATE likes; INSERT INTO likes (post_id, user_id) VALUES (3, 1), (3, 2)`); err != nil {
			t.Fatal(err)
		}
		w.settle()
		w.checkExact()
		if got := w.count("post_likes", "3"); got != 2 {
			t.Errorf("post 3 after TRUNCATE and 2 inserts: got %d; want 2", got)
		}
	})

	t.Run("hot standby takes over", func(t *testing.T) {
		w.t = t
		standby := startInvalidator(top, "standby", w.cfg) // outlives the subtest
		nc, err := nats.Connect(w.env.DC("dc1").NATS.URL())
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		views := int64(0)
		incr := func(n int) {
			for i := 0; i < n; i++ {
				if _, err := js.Publish(w.ctx, "counters.incr.post_views", []byte(`{"counter":"post_views","key":{"post_id":"standby"}}`)); err != nil {
					t.Fatal(err)
				}
				views++
			}
		}
		incr(200)
		w.settle() // the active process has flushed past the standby's start
		w.writers(4, 4000/4, func() {
			incr(100)
			w.inv.kill() // no restart: the standby must take the slot
			for deadline := time.Now().Add(60 * time.Second); ; {
				var active bool
				if err := w.env.Primary.QueryRow(w.ctx, `SELECT active FROM pg_replication_slots WHERE slot_name = 'cache_invalidator'`, &active); err == nil && active {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the standby did not take the slot within 60s")
				}
				time.Sleep(50 * time.Millisecond)
			}
			incr(100)
			time.Sleep(300 * time.Millisecond)
		})
		w.settle()
		w.checkExact()
		for deadline := time.Now().Add(60 * time.Second); w.count("post_views", "standby") != views; {
			if time.Now().After(deadline) {
				t.Fatalf("post_views standby: got %d; want %d", w.count("post_views", "standby"), views)
			}
			time.Sleep(50 * time.Millisecond)
		}
		if !standby.Running() {
			t.Fatalf("the standby exited (code %d) after taking over; want it running", standby.ExitCode())
		}
		w.inv = standby
	})

	t.Run("drain exits 0", func(t *testing.T) {
		w.t = t
		if code := w.inv.term(); code != 0 {
			t.Fatalf("exit code after SIGTERM: got %d; want 0", code)
		}
	})
}

func (w *counterWorld) count(counter, group string) int64 {
	w.t.Helper()
	var n int64
	err := w.env.Primary.QueryRowArgs(w.ctx, `SELECT coalesce((SELECT n FROM pgcache_counters WHERE counter = $1 AND grp = $2), 0)`,
		[]any{counter, fmt.Sprintf(`["%s"]`, group)}, &n)
	if err != nil {
		w.t.Fatal(err)
	}
	return n
}

func (w *counterWorld) waitGone(timeout time.Duration, keys ...string) {
	w.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var left []string
		for _, k := range keys {
			r, err := w.pool.MetaGet(w.ctx, k, "v")
			if err != nil || r.Status == mcpool.StatusVA || r.Status == mcpool.StatusHD {
				left = append(left, k)
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("keys still cached after %s: %v", timeout, left)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func TestCheckCounters(t *testing.T) {
	env := testenv.New(t, testenv.Options{NoNATS: true, NoReplicas: true, MemcachedPerDC: -1, DCs: 1})
	ctx := context.Background()
	if err := env.Primary.Exec(ctx, `CREATE TABLE likes (id bigint PRIMARY KEY, post_id bigint NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	cfgText := fmt.Sprintf(`dc: dc1
postgres: {dsn: %q}
tail: true
messages: {prefix: invalidate}
counters:
  - {name: post_likes, table: public.likes, group_by: [post_id], key: "post:{post_id}:likes"}
  - {name: bad, table: public.likes, group_by: [nosuch], key: "bad:{nosuch}"}
`, env.Primary.DSN(""))
	cfg, rules, err := config.Parse([]byte(cfgText))
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	err = Check(ctx, cfg, rules, &out)
	if err == nil {
		t.Fatalf("check passed; want failures. Output:\n%s", out.String())
	}
	msg := err.Error() + "\n" + out.String()
	for _, want := range []string{"no column nosuch", "counters group by columns post_id, nosuch"} {
		if !strings.Contains(msg, want) {
			t.Errorf("check output lacks %q:\n%s", want, msg)
		}
	}
	good := strings.Replace(cfgText, `  - {name: bad, table: public.likes, group_by: [nosuch], key: "bad:{nosuch}"}
`, "", 1)
	cfg, rules, err = config.Parse([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	out.Reset()
	err = Check(ctx, cfg, rules, &out)
	if err == nil || !strings.Contains(err.Error()+out.String(), "ALTER TABLE public.likes REPLICA IDENTITY") {
		t.Fatalf("check with the primary-key identity: got %v; want the REPLICA IDENTITY fix for post_id:\n%s", err, out.String())
	}
	if err := env.Primary.Exec(ctx, `ALTER TABLE likes REPLICA IDENTITY FULL`); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	if err := Check(ctx, cfg, rules, &out); err != nil {
		t.Errorf("check after the fix: %v\n%s", err, out.String())
	}
}

// TestExampleCounters parses deploy/invalidator.example.yaml with its
// commented counters example switched on.
func TestExampleCounters(t *testing.T) {
	data, err := os.ReadFile("../../deploy/invalidator.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	on := 0
	for _, l := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(l, "#") && len(l) > 1 && (l[1] != ' ' || strings.HasPrefix(l, "#  ")) {
			l = l[1:]
			on++
		}
		b.WriteString(l + "\n")
	}
	if on == 0 {
		t.Fatal("no commented counters example found")
	}
	cfg, _, err := config.Parse([]byte(b.String()))
	if err != nil {
		t.Fatalf("example with counters: %v", err)
	}
	if got := cfg.CounterSet.Names(); fmt.Sprint(got) != "[post_likes post_views]" {
		t.Errorf("counters: got %v; want [post_likes post_views]", got)
	}
}

func TestParseCounterConfig(t *testing.T) {
	base := "dc: dc1\ntail: true\npostgres: {dsn: x}\n"
	ctr := "counters: [{name: c, table: likes, group_by: [post_id], key: \"c:{post_id}\"}]\n"
	for _, tc := range []struct{ name, yaml, want string }{
		{"no messages prefix", base + ctr, "need messages.prefix"},
		{"not tail", "dc: dc1\npurge: {servers: [a:1]}\nmessages: {prefix: invalidate}\n" + ctr, "need tail: true"},
		{"bad key", base + "messages: {prefix: invalidate}\ncounters: [{name: c, table: likes, group_by: [post_id], key: \"c:{id}\"}]\n", "invalid key template"},
		{"bad batcher", base + "messages: {prefix: invalidate}\n" + ctr + "batcher: {max_pending: -1}\n", "MaxPending"},
		{"bad batcher table", base + "messages: {prefix: invalidate}\n" + ctr + "batcher: {table: \"x;y\"}\n", "table name"},
		{"reserved prefix", base + "messages: {prefix: pgcache_counters_repair}\n" + ctr, "reserved"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := config.Parse([]byte(tc.yaml))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v; want an error containing %q", err, tc.want)
			}
		})
	}
	cfg, _, err := config.Parse([]byte(base + "messages: {prefix: invalidate}\n" + ctr + "batcher: {max_pending: 50, interval: 10ms}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.CounterSet.Len() != 1 || cfg.Batcher.MaxPending != 50 || cfg.Increments.Stream != "COUNTERS" {
		t.Errorf("got %d counters, max_pending %d, stream %q; want 1, 50, COUNTERS", cfg.CounterSet.Len(), cfg.Batcher.MaxPending, cfg.Increments.Stream)
	}
}
