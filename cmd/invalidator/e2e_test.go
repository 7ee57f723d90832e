package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/config"
	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/testenv"
)

// The test binary doubles as the invalidator: with INVALIDATOR_MAIN=1 it
// runs main, so the end-to-end tests run the real daemon as a separate
// process (killable with SIGKILL) without building another binary.
func TestMain(m *testing.M) {
	if os.Getenv("INVALIDATOR_MAIN") == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// proc is one invalidator process: this test binary run as the daemon
// (TestMain), through testenv's process runner.
type proc struct {
	*testenv.Daemon
	t *testing.T
}

func startInvalidator(t *testing.T, name, config string) *proc {
	t.Helper()
	d, err := testenv.NewDaemon(name, os.Args[0], t.TempDir(), config, 0, zap.NewNop(), "-drain-timeout", "20s", "-log-level", "debug")
	if err != nil {
		t.Fatal(err)
	}
	d.Env = []string{"INVALIDATOR_MAIN=1"}
	p := &proc{Daemon: d, t: t}
	p.start()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("=== %s log (last 6 KB) ===\n%s", name, d.LogTail(6<<10))
		}
	})
	return p
}

func (p *proc) start() {
	p.t.Helper()
	if err := p.Start(); err != nil {
		p.t.Fatal(err)
	}
}

// kill sends SIGKILL, as kill -9 would, and waits.
func (p *proc) kill() { _ = p.Kill() }

// term sends SIGTERM (a drain) and returns the exit code.
func (p *proc) term() int {
	p.t.Helper()
	if err := p.Stop(); err != nil {
		p.t.Fatal(err)
	}
	return p.ExitCode()
}

// world is a two-DC environment with one invalidator per DC: dc1 tails and
// purges, dc2 purges.
type world struct {
	t     *testing.T
	env   *testenv.Env
	ctx   context.Context
	pools map[string]*mcpool.Pool
	inv   map[string]*proc
	// nats is the config's nats: section past url; default: one stream
	// in dc1.
	nats string
}

const schema = `
CREATE TABLE posts (id bigint PRIMARY KEY, author_id bigint NOT NULL, title text, body text);
ALTER TABLE posts REPLICA IDENTITY FULL;
CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
CREATE TABLE big (id bigint PRIMARY KEY);
CREATE TABLE unrelated (id bigint PRIMARY KEY);
`

func (w *world) config(dc string, tail bool) string {
	d := w.env.DC(dc)
	return fmt.Sprintf(`dc: %s
postgres:
  dsn: %s
  slot: cache_invalidator
  publication: cache_invalidator
nats:
  url: %s
  stream: INVALIDATIONS
%s
tail: %t
purge:
  servers: [%s]
  hash: ketama
  replica_dsn: %s
  gate_max_wait: 120s
rules:
  - table: public.posts
    keys: ["post:{id}", "user_posts:{author_id}"]
  - table: public.items
    keys: ["item:{id}"]
  - table: public.big
    keys: ["big:{id}"]
messages:
  prefix: invalidate
http:
  listen: off
`, dc, w.env.Primary.DSN(""), d.NATS.URL(), w.natsConfig(), tail, strings.Join(d.MemcachedAddrs(), ", "), d.Replica.DSN(""))
}

func (w *world) natsConfig() string {
	if w.nats != "" {
		return w.nats
	}
	return "  placement: dc1"
}

func newWorld(t *testing.T) *world { return newWorldNATS(t, "") }

// newWorldNATS starts the world with nats (the config's nats: lines past
// url and stream).
func newWorldNATS(t *testing.T, nats string) *world {
	env := testenv.New(t, testenv.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	t.Cleanup(cancel)
	w := &world{t: t, env: env, ctx: ctx, pools: map[string]*mcpool.Pool{}, inv: map[string]*proc{}, nats: nats}
	if err := env.Primary.Exec(ctx, schema); err != nil {
		t.Fatal(err)
	}
	for _, dc := range env.DCs {
		cfg := mcpool.DefaultConfig()
		cfg.Servers = dc.MemcachedAddrs()
		pool, err := mcpool.New(cfg, zaptest.NewLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pool.Close() })
		w.pools[dc.Name] = pool
	}
	w.inv["dc1"] = startInvalidator(t, "invalidator-dc1", w.config("dc1", true))
	w.inv["dc2"] = startInvalidator(t, "invalidator-dc2", w.config("dc2", false))
	// Ready when an emitted key is purged in both DCs. The slot may not
	// exist yet when the first probe is emitted, so probe until one lands.
	for deadline := time.Now().Add(90 * time.Second); ; {
		w.set("dc1", "probe")
		w.set("dc2", "probe")
		w.exec("SELECT pg_logical_emit_message(true, 'invalidate', 'probe')")
		gone := false
		for end := time.Now().Add(2 * time.Second); time.Now().Before(end); time.Sleep(25 * time.Millisecond) {
			if len(w.present("dc1", "probe"))+len(w.present("dc2", "probe")) == 0 {
				gone = true
				break
			}
		}
		if gone {
			return w
		}
		if time.Now().After(deadline) {
			t.Fatal("invalidators not ready after 90s: an emitted key was never purged in both DCs")
		}
	}
}

func (w *world) exec(sql string, args ...any) {
	w.t.Helper()
	if err := w.env.Primary.Exec(w.ctx, sql, args...); err != nil {
		w.t.Fatal(err)
	}
}

// set stores keys in a DC's pool, placed as readers place them.
func (w *world) set(dc string, keys ...string) {
	w.t.Helper()
	for _, k := range keys {
		for attempt := 0; ; attempt++ {
			_, err := w.pools[dc].MetaSet(w.ctx, k, []byte("cached"), mcpool.SetOptions{})
			if err == nil {
				break
			}
			if attempt > 100 {
				w.t.Fatalf("set %s in %s: %v", k, dc, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// present returns the keys still cached in a DC.
func (w *world) present(dc string, keys ...string) []string {
	w.t.Helper()
	var out []string
	for _, k := range keys {
		r, err := w.pools[dc].MetaGet(w.ctx, k, "v")
		if err != nil {
			out = append(out, k+"(error: "+err.Error()+")")
			continue
		}
		if r.Status == mcpool.StatusVA || r.Status == mcpool.StatusHD {
			out = append(out, k)
		}
	}
	return out
}

// waitGone waits until none of keys is cached in any DC.
func (w *world) waitGone(timeout time.Duration, keys ...string) {
	w.t.Helper()
	w.waitGoneIn(timeout, []string{"dc1", "dc2"}, keys...)
}

func (w *world) waitGoneIn(timeout time.Duration, dcs []string, keys ...string) {
	w.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		var left []string
		for _, dc := range dcs {
			for _, k := range w.present(dc, keys...) {
				left = append(left, dc+":"+k)
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			if len(left) > 20 {
				left = append(left[:20], fmt.Sprintf("... (%d in all)", len(left)))
			}
			w.t.Fatalf("keys still cached after %s: %v", timeout, left)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func TestPurgeEndToEnd(t *testing.T) {
	w := newWorld(t)

	t.Run("insert update delete", func(t *testing.T) {
		w.t = t
		w.set("dc1", "post:1", "user_posts:10")
		w.set("dc2", "post:1", "user_posts:10")
		w.exec("INSERT INTO posts VALUES (1, 10, 'hello', 'body')")
		w.waitGone(30*time.Second, "post:1", "user_posts:10")

		w.set("dc1", "post:1", "user_posts:10")
		w.set("dc2", "post:1", "user_posts:10")
		w.exec("UPDATE posts SET title = 'changed' WHERE id = 1")
		w.waitGone(30*time.Second, "post:1", "user_posts:10")

		w.set("dc1", "post:1", "user_posts:10")
		w.set("dc2", "post:1", "user_posts:10")
		w.exec("DELETE FROM posts WHERE id = 1")
		w.waitGone(30*time.Second, "post:1", "user_posts:10")
	})

	t.Run("update moving a key purges old and new", func(t *testing.T) {
		w.t = t
		w.exec("INSERT INTO posts VALUES (2, 20, 't', 'b')")
		keys := []string{"post:2", "user_posts:20", "user_posts:21"}
		time.Sleep(200 * time.Millisecond) // let the insert's purge pass before caching
		w.set("dc1", keys...)
		w.set("dc2", keys...)
		w.exec("UPDATE posts SET author_id = 21 WHERE id = 2")
		w.waitGone(30*time.Second, keys...)
	})

	t.Run("emitted message keys", func(t *testing.T) {
		w.t = t
		keys := []string{"feed:1", "feed:2", "home:user:3"}
		w.set("dc1", keys...)
		w.set("dc2", keys...)
		w.exec("SELECT pg_logical_emit_message(true, 'invalidate', 'feed:1 feed:2\thome:user:3')")
		w.waitGone(30*time.Second, keys...)
	})

	t.Run("paused replica holds only its own DC", func(t *testing.T) {
		w.t = t
		r2 := w.env.DC("dc2").Replica
		if err := r2.PauseReplay(w.ctx); err != nil {
			t.Fatal(err)
		}
		resumed := false
		defer func() {
			if !resumed {
				_ = r2.ResumeReplay(w.ctx)
			}
		}()
		w.set("dc1", "item:1")
		w.set("dc2", "item:1")
		w.exec("INSERT INTO items VALUES (1, 1)")
		// dc1 is not delayed by dc2's lag.
		w.waitGoneIn(30*time.Second, []string{"dc1"}, "item:1")
		// dc2 keeps the key while its replica cannot show the row:
		// checked for a while after dc1's purge, so a purger that
		// ignored the gate would have had every chance to delete it.
		for i := 0; i < 20; i++ {
			if got := w.present("dc2", "item:1"); len(got) != 1 {
				t.Fatalf("dc2 purged item:1 before its replica replayed the commit")
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err := r2.ResumeReplay(w.ctx); err != nil {
			t.Fatal(err)
		}
		resumed = true
		w.waitGoneIn(30*time.Second, []string{"dc2"}, "item:1")
	})

	t.Run("memcached down for 5s", func(t *testing.T) {
		w.t = t
		// A hung server (SIGSTOP) keeps its data, so the keys on it are
		// really there until the pending purge reaches them.
		m := w.env.DC("dc2").Memcached[0]
		var onDown []string
		for i := 0; len(onDown) < 50; i++ {
			k := fmt.Sprintf("item:%d", 1000+i)
			if w.pools["dc2"].Pick(k) == 0 {
				onDown = append(onDown, k)
			}
		}
		live := 2 // a row whose key sits on a live server of dc2
		for w.pools["dc2"].Pick(fmt.Sprintf("item:%d", live)) == 0 {
			live++
		}
		liveKey := fmt.Sprintf("item:%d", live)
		w.set("dc2", onDown...)
		w.set("dc1", liveKey)
		w.set("dc2", liveKey)
		if err := m.Pause(); err != nil {
			t.Fatal(err)
		}
		resumed := false
		defer func() {
			if !resumed {
				_ = m.Resume()
			}
		}()
		var ids []string
		for _, k := range onDown {
			ids = append(ids, strings.TrimPrefix(k, "item:"))
		}
		w.exec("INSERT INTO items SELECT unnest(string_to_array($1, ','))::bigint", strings.Join(ids, ","))
		w.exec("INSERT INTO items VALUES ($1, 2)", live)
		// The other servers are unaffected.
		w.waitGone(30*time.Second, liveKey)
		time.Sleep(5 * time.Second)
		if err := m.Resume(); err != nil {
			t.Fatal(err)
		}
		resumed = true
		w.waitGoneIn(60*time.Second, []string{"dc2"}, onDown...)
	})

	t.Run("NATS in dc2 restarts", func(t *testing.T) {
		w.t = t
		n := w.env.DC("dc2").NATS
		if err := n.Stop(); err != nil {
			t.Fatal(err)
		}
		var keys []string
		for i := 0; i < 100; i++ {
			keys = append(keys, fmt.Sprintf("item:%d", 5000+i))
		}
		w.set("dc1", keys...)
		w.set("dc2", keys...)
		w.exec("INSERT INTO items SELECT g FROM generate_series(5000, 5099) g")
		w.waitGoneIn(30*time.Second, []string{"dc1"}, keys...)
		if err := n.Start(); err != nil {
			t.Fatal(err)
		}
		w.waitGone(120*time.Second, keys...)
	})
}

// TestKillTailerUnderLoad kills the tailing invalidator with SIGKILL while
// 10k transactions commit, restarts it, and checks every key of every
// transaction in both DCs: the full list, not a sample.
func TestKillTailerUnderLoad(t *testing.T) {
	w := newWorld(t)
	const n = 10000
	var keys []string
	for i := 1; i <= n; i++ {
		keys = append(keys, fmt.Sprintf("item:%d", i))
	}
	w.exec("INSERT INTO items SELECT g FROM generate_series(1, $1::int) g", n)
	time.Sleep(500 * time.Millisecond)
	w.set("dc1", keys...)
	w.set("dc2", keys...)

	// 4 writers, one transaction per row update.
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for wr := 0; wr < 4; wr++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := wr + 1; i <= n; i += 4 {
				if err := w.env.Primary.Exec(w.ctx, "UPDATE items SET v = v + 1 WHERE id = $1", i); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	// Kill the tailer twice during the load and restart it.
	for k := 0; k < 2; k++ {
		time.Sleep(1500 * time.Millisecond)
		w.inv["dc1"].kill()
		time.Sleep(300 * time.Millisecond)
		w.inv["dc1"].start()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	w.waitGone(5*time.Minute, keys...)

	// A drain (SIGTERM) exits 0 and confirms what it published.
	if code := w.inv["dc1"].term(); code != 0 {
		t.Fatalf("exit code after SIGTERM: got %d; want 0", code)
	}
	var confirmed, current string
	if err := w.env.Primary.QueryRow(w.ctx, "SELECT confirmed_flush_lsn::text, pg_current_wal_lsn()::text FROM pg_replication_slots WHERE slot_name = 'cache_invalidator'", &confirmed, &current); err != nil {
		t.Fatal(err)
	}
	t.Logf("after drain: slot confirmed %s, WAL at %s", confirmed, current)
	var behind bool
	if err := w.env.Primary.QueryRowArgs(w.ctx, "SELECT pg_wal_lsn_diff($1::pg_lsn, $2::pg_lsn) > 1024*1024", []any{current, confirmed}, &behind); err != nil {
		t.Fatal(err)
	}
	if behind {
		t.Errorf("slot confirmed %s is far behind WAL %s after a drain", confirmed, current)
	}
}

// TestPerDatacenterLayout runs the daemons with nats.datacenters: each
// DC's purger reads its own stream, which copies the other's. Keys of the
// tail in dc1 are purged in both DCs; after the tail moves to dc2 (dc1's
// tail killed), its keys reach dc1's pool through dc1's copy. check
// reports both streams with their sources.
func TestPerDatacenterLayout(t *testing.T) {
	w := newWorldNATS(t, "  datacenters: [dc1, dc2]\n  durable_dcs: 2")
	w.set("dc1", "item:1", "item:2")
	w.set("dc2", "item:1", "item:2")
	w.exec("INSERT INTO items (id) VALUES (1), (2)")
	w.waitGone(30*time.Second, "item:1", "item:2")

	// The tail moves to dc2.
	w.inv["dc1"].kill()
	w.inv["dc1"] = startInvalidator(t, "invalidator-dc1-purge", w.config("dc1", false))
	w.inv["dc2-tail"] = startInvalidator(t, "invalidator-dc2-tail", regexp.MustCompile(`purge:\n(  .*\n)+`).ReplaceAllString(w.config("dc2", true), ""))
	for i := 3; i < 8; i++ {
		k := fmt.Sprintf("item:%d", i)
		w.set("dc1", k)
		w.set("dc2", k)
	}
	w.exec("INSERT INTO items (id) SELECT g FROM generate_series(3, 7) g")
	w.waitGone(60*time.Second, "item:3", "item:4", "item:5", "item:6", "item:7")

	cfg, rules, err := config.Parse([]byte(w.config("dc1", false)))
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := Check(w.ctx, cfg, rules, &out); err != nil {
		t.Fatalf("check: %v\n%s", err, out.String())
	}
	for _, want := range []string{"stream INVALIDATIONS_dc1: cluster \"dc1\"", "stream INVALIDATIONS_dc2: cluster \"dc2\"",
		"source INVALIDATIONS_dc2 (pgcache.invalidations.dc2)", "source INVALIDATIONS_dc1 (pgcache.invalidations.dc1)"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("check output lacks %q:\n%s", want, out.String())
		}
	}
}

func TestCheck(t *testing.T) {
	env := testenv.New(t, testenv.Options{NoNATS: true, NoReplicas: true, MemcachedPerDC: -1, DCs: 1})
	ctx := context.Background()
	if err := env.Primary.Exec(ctx, `CREATE TABLE posts (id bigint PRIMARY KEY, author_id bigint, title text);
		CREATE TABLE nokey (a int, b int);
		CREATE TABLE full_ok (id int PRIMARY KEY, g int); ALTER TABLE full_ok REPLICA IDENTITY FULL;`); err != nil {
		t.Fatal(err)
	}
	cfgText := fmt.Sprintf(`dc: dc1
postgres: {dsn: %q}
tail: true
rules:
  - {table: public.posts, keys: ["post:{id}", "user_posts:{author_id}"]}
  - {table: public.nokey, keys: ["nokey:{a}"]}
  - {table: public.full_ok, keys: ["g:{g}"]}
  - {table: public.absent, keys: ["x:{id}"]}
  - {table: public.posts, keys: ["p:{nosuch}"]}
purge: {servers: ["127.0.0.1:1"]}
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
	for _, want := range []string{
		"ALTER TABLE public.nokey REPLICA IDENTITY FULL",
		"public.absent: table does not exist",
		"no column nosuch",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("check output lacks %q:\n%s", want, msg)
		}
	}
	if strings.Contains(msg, "public.full_ok: replica identity") {
		t.Errorf("full_ok reported although its identity is FULL:\n%s", msg)
	}

	// The daemon refuses to start on the same errors, with exit code 2.
	dir := t.TempDir()
	path := filepath.Join(dir, "c.yaml")
	if err := os.WriteFile(path, []byte(cfgText), 0o600); err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	if code := run([]string{"check", "-config", path}, &out, &stderr); code != exitConfig {
		t.Errorf("check exit code: got %d; want %d", code, exitConfig)
	}

	// Fixed: posts needs FULL (author_id is not in the primary key).
	if err := env.Primary.Exec(ctx, `ALTER TABLE posts REPLICA IDENTITY FULL; ALTER TABLE nokey REPLICA IDENTITY FULL`); err != nil {
		t.Fatal(err)
	}
	good := strings.Replace(strings.Replace(cfgText, `  - {table: public.absent, keys: ["x:{id}"]}
`, "", 1), `  - {table: public.posts, keys: ["p:{nosuch}"]}
`, "", 1)
	cfg, rules, err = config.Parse([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	out.Reset()
	if err := Check(ctx, cfg, rules, &out); err != nil {
		t.Errorf("check after the fix: %v\n%s", err, out.String())
	}
}

func TestParseNATSLayout(t *testing.T) {
	cfg, _, err := config.Parse([]byte("dc: dc2\nnats: {url: nats://x:4222, replicas: 3, datacenters: [dc1, dc2, dc3]}\npurge: {servers: [a:1]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	l := layoutOf(cfg)
	s := l.Stream("dc2")
	if s.Name != "INVALIDATIONS_dc2" || s.Placement != "dc2" || s.Replicas != 3 || len(s.Sources) != 2 {
		t.Errorf("dc2's stream: got %+v; want INVALIDATIONS_dc2 in dc2, 3 replicas, 2 sources", s)
	}
	if r, need := l.Remotes("dc2"); len(r) != 2 || need != 1 || cfg.NATS.DurableDCs != 2 {
		t.Errorf("remotes: got %d, need %d, durable_dcs %d; want 2, 1, 2", len(r), need, cfg.NATS.DurableDCs)
	}
	cfg, _, err = config.Parse([]byte("dc: dc1\nnats: {url: nats://x:4222}\npurge: {servers: [a:1]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if s := layoutOf(cfg).Stream("dc1"); s.Name != "INVALIDATIONS" || s.Placement != "dc1" || s.Replicas != 1 {
		t.Errorf("default layout: got %+v; want one stream INVALIDATIONS in dc1, 1 replica", s)
	}
}

func TestParseConfigErrors(t *testing.T) {
	for _, tc := range []struct{ name, yaml, want string }{
		{"unknown field", "dc: dc1\ntail: true\ntypo: 1\n", "field typo not found"},
		{"no dc", "tail: true\npostgres: {dsn: x}\nrules: [{table: t, keys: [\"k:{id}\"]}]\n", "dc is empty"},
		{"nothing to do", "dc: dc1\n", "nothing to do"},
		{"bad hash", "dc: dc1\npurge: {servers: [a:1], hash: crc}\n", "purge.hash"},
		{"bad template", "dc: dc1\ntail: true\npostgres: {dsn: x}\nrules: [{table: t, keys: [\"k:{id\"]}]\n", "rules"},
		{"counters", "dc: dc1\npurge: {servers: [a:1]}\ncounters: [{name: x}]\n", "counters"},
		{"even replicas", "dc: dc1\nnats: {url: nats://x:4222, replicas: 2}\npurge: {servers: [a:1]}\n", "nats.replicas 2"},
		{"replicas embedded", "dc: dc1\nnats: {replicas: 3}\npurge: {servers: [a:1]}\n", "need nats.url"},
		{"dc not listed", "dc: dc3\nnats: {url: nats://x:4222, datacenters: [dc1, dc2]}\npurge: {servers: [a:1]}\n", "does not list this dc"},
		{"durable too many", "dc: dc1\nnats: {url: nats://x:4222, datacenters: [dc1, dc2], durable_dcs: 3}\npurge: {servers: [a:1]}\n", "nats.durable_dcs 3"},
		{"durable alone", "dc: dc1\nnats: {url: nats://x:4222, durable_dcs: 2}\npurge: {servers: [a:1]}\n", "need nats.datacenters"},
		{"placement with datacenters", "dc: dc1\nnats: {url: nats://x:4222, placement: dc2, datacenters: [dc1, dc2]}\npurge: {servers: [a:1]}\n", "remove placement"},
		{"short ack wait", "dc: dc1\npurge: {servers: [a:1], ack_wait: 5s}\n", "purge.ack_wait 5s"},
		{"negative memory limit", "dc: dc1\nmemory_limit: -1\npurge: {servers: [a:1]}\n", "memory_limit -1"},
		{"repeated dc", "dc: dc1\nnats: {url: nats://x:4222, datacenters: [dc1, dc1]}\npurge: {servers: [a:1]}\n", "repeated"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := config.Parse([]byte(tc.yaml))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v; want an error containing %q", err, tc.want)
			}
		})
	}
}
