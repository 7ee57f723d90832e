package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/testenv"
)

const (
	pgSecret   = "pg-S3cret-7731"
	natsSecret = "nats-S3cret-4412"
)

// TestOperations runs one invalidator (tail and purge in dc1) the way
// systemd would, with its secrets in environment variables and its HTTP
// listener on, and checks what operators rely on: no secret in logs,
// metrics or errors; SIGHUP applies a good rules change and refuses a bad
// one while the old rules keep working; SIGTERM drains and exits 0.
func TestOperations(t *testing.T) {
	env := testenv.New(t, testenv.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if err := env.Primary.Exec(ctx, `CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
		CREATE TABLE other (id bigint PRIMARY KEY)`); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PG_PASSWORD", pgSecret)
	t.Setenv("NATS_PASSWORD", natsSecret)
	notified := notifySocket(t)
	t.Setenv("WATCHDOG_USEC", "200000")
	port, err := testenv.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	dc := env.DC("dc1")
	// The server has trust auth and NATS no auth: the passwords are sent
	// or ignored, never needed, so any leak would be ours. The gate's
	// replica DSN also carries the password, and points at the replica
	// through a port nothing listens on at first, so the connection
	// errors are logged.
	deadPort, err := testenv.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	config := func(keys string) string {
		return fmt.Sprintf(`dc: dc1
postgres: {dsn: "postgres://postgres:${PG_PASSWORD}@%s/postgres?sslmode=disable"}
nats: {url: "nats://pgcache:${NATS_PASSWORD}@127.0.0.1:%d", stream: INVALIDATIONS, placement: dc1}
tail: true
purge:
  servers: [%s]
  replica_dsn: "postgres://postgres:${PG_PASSWORD}@127.0.0.1:%d/postgres?sslmode=disable&connect_timeout=1"
  gate_max_wait: 1s
rules:
  - table: public.items
    keys: [%s]
http: {listen: "127.0.0.1:%d"}
`, env.Primary.Addr(), dc.NATS.Port, strings.Join(dc.MemcachedAddrs(), ", "), deadPort, keys, port)
	}
	p := startInvalidator(t, "invalidator", config(`"item:{id}"`))

	pcfg := mcpool.DefaultConfig()
	pcfg.Servers = dc.MemcachedAddrs()
	pool, err := mcpool.New(pcfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	w := &world{t: t, env: env, ctx: ctx, pools: map[string]*mcpool.Pool{"dc1": pool}}
	metrics := func() string {
		t.Helper()
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", port))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	waitMetric := func(want string) {
		t.Helper()
		for deadline := time.Now().Add(60 * time.Second); !strings.Contains(metrics(), want); time.Sleep(50 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("metrics never showed %q", want)
			}
		}
	}
	// Ready means the slot exists: later commits are streamed.
	for deadline := time.Now().Add(90 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/readyz", port))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("not ready within 90s")
		}
	}
	// Purged through the gate's max_wait, as the replica is unreachable.
	purged := func(key string, id int) {
		t.Helper()
		w.set("dc1", key)
		w.exec("INSERT INTO items VALUES ($1)", id)
		w.waitGoneIn(60*time.Second, []string{"dc1"}, key)
	}
	purged("item:1", 1)
	waitMetric("invalidator_gate_timeouts_total")
	waitMetric("invalidator_wal_reconnects_total ") // exported (its value depends on the run)

	hup := func() {
		t.Helper()
		if err := syscall.Kill(p.PID(), syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
	}
	// A rule naming a column that does not exist: refused by the check
	// against the database; the old rules stay.
	if err := os.WriteFile(p.ConfigPath(), []byte(config(`"item:{id}", "item:{nope}"`)), 0o600); err != nil {
		t.Fatal(err)
	}
	hup()
	waitMetric(`invalidator_config_reloads_total{result="refused"} 1`)
	waitMetric("invalidator_config_last_reload_ok 0")
	purged("item:2", 2)
	// Another table: refused, as it needs a restart.
	if err := os.WriteFile(p.ConfigPath(), []byte(strings.Replace(config(`"item:{id}"`), "public.items", "public.other", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	hup()
	waitMetric(`invalidator_config_reloads_total{result="refused"} 2`)
	// A second key for the same table: applied from the next transaction.
	if err := os.WriteFile(p.ConfigPath(), []byte(config(`"item:{id}", "item_again:{id}"`)), 0o600); err != nil {
		t.Fatal(err)
	}
	hup()
	waitMetric(`invalidator_config_reloads_total{result="applied"} 1`)
	waitMetric("invalidator_config_last_reload_ok 1")
	w.set("dc1", "item_again:3")
	purged("item:3", 3)
	w.waitGoneIn(30*time.Second, []string{"dc1"}, "item_again:3")

	page := metrics()
	if code := p.term(); code != 0 {
		t.Fatalf("exit code after SIGTERM: got %d; want 0", code)
	}
	// systemd saw: ready, watchdog pings, a reload per SIGHUP, stopping.
	got := notified()
	for _, want := range []string{"READY=1", "WATCHDOG=1", "RELOADING=1", "STOPPING=1"} {
		if !strings.Contains(got, want) {
			t.Errorf("notify socket never got %s; got:\n%s", want, got)
		}
	}
	if n := strings.Count(got, "RELOADING=1"); n != 3 {
		t.Errorf("notify socket got %d RELOADING=1; want 3 (one per SIGHUP)", n)
	}
	if strings.Index(got, "READY=1") > strings.Index(got, "STOPPING=1") {
		t.Errorf("READY=1 came after STOPPING=1:\n%s", got)
	}
	logs, err := os.ReadFile(p.LogPath())
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(logs, []byte("gate")) || !bytes.Contains(logs, []byte("reload refused")) {
		t.Fatalf("the log lacks the gate's errors or the refused reloads, so it proves nothing:\n%s", p.LogTail(4096))
	}

	// Errors printed by the check and by a config that does not parse.
	var out, errOut bytes.Buffer
	bad := strings.Replace(config(`"item:{id}"`), "public.items", "public.missing", 1)
	if err := os.WriteFile(p.ConfigPath(), []byte(bad), 0o600); err != nil {
		t.Fatal(err)
	}
	if code := run([]string{"check", "-config", p.ConfigPath()}, &out, &errOut); code != exitConfig {
		t.Fatalf("check of a missing table: exit %d; want %d", code, exitConfig)
	}
	unparsable := strings.Replace(config(`"item:{id}"`), "@"+env.Primary.Addr(), "@127.0.0.1:notaport", 1)
	if err := os.WriteFile(p.ConfigPath(), []byte(unparsable), 0o600); err != nil {
		t.Fatal(err)
	}
	if code := run([]string{"check", "-config", p.ConfigPath()}, &out, &errOut); code != exitConfig {
		t.Fatalf("check of a bad DSN: exit %d; want %d", code, exitConfig)
	}
	if !strings.Contains(errOut.String(), "missing") || !strings.Contains(errOut.String(), "postgres.dsn") {
		t.Fatalf("the check errors do not name the problems, so they prove nothing: %q", errOut.String())
	}

	for name, text := range map[string]string{"log": string(logs), "metrics": page, "check output": out.String() + errOut.String()} {
		for _, secret := range []string{pgSecret, natsSecret} {
			if i := strings.Index(text, secret); i >= 0 {
				t.Errorf("%s shows a secret: ...%s...", name, text[max(0, i-200):min(len(text), i+50)])
			}
		}
	}
}

// notifySocket sets NOTIFY_SOCKET to a real unixgram socket, as systemd
// does for Type=notify, and returns a func that gives what it received.
func notifySocket(t *testing.T) func() string {
	t.Helper()
	dir, err := os.MkdirTemp("", "inv") // socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "notify")
	sock, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sock.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	var mu sync.Mutex
	var got strings.Builder
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := sock.Read(buf)
			if err != nil {
				return
			}
			mu.Lock()
			got.Write(buf[:n])
			got.WriteByte('\n')
			mu.Unlock()
		}
	}()
	return func() string {
		time.Sleep(100 * time.Millisecond) // the last datagrams
		mu.Lock()
		defer mu.Unlock()
		return got.String()
	}
}
