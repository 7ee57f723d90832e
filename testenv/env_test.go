package testenv_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgcache/pgcache/testenv"
)

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// mcRoundTrip sets and gets a key on a memcached with the text protocol.
func mcRoundTrip(addr, key string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := fmt.Fprintf(c, "set %s 0 0 2\r\nok\r\nget %s\r\n", key, key); err != nil {
		return err
	}
	r := bufio.NewReader(c)
	var lines []string
	for len(lines) < 4 {
		l, err := r.ReadString('\n')
		if err != nil {
			return err
		}
		lines = append(lines, strings.TrimSpace(l))
	}
	want := []string{"STORED", "VALUE " + key + " 0 2", "ok", "END"}
	if strings.Join(lines, "|") != strings.Join(want, "|") {
		return fmt.Errorf("got %q; want %q", lines, want)
	}
	return nil
}

func processAlive(pid int) bool {
	return syscall.Kill(pid, 0) == nil
}

// TestEnvironment starts the default two-DC environment once and checks
// every server and every fault against it.
func TestEnvironment(t *testing.T) {
	start := time.Now()
	env, err := testenv.Start(ctxT(t, 2*time.Minute), testenv.Options{})
	if err != nil {
		t.Fatalf("start: %v", err)
	}
	t.Logf("2-DC environment started in %s", time.Since(start).Round(time.Millisecond))
	closed := false
	t.Cleanup(func() {
		if !closed {
			_ = env.Close()
		}
	})
	ctx := ctxT(t, 4*time.Minute)
	if got := len(env.DCs); got != 2 {
		t.Fatalf("got %d DCs; want 2", got)
	}

	t.Run("replication", func(t *testing.T) {
		if err := env.Primary.Exec(ctx, "CREATE TABLE t (id int primary key, v text); INSERT INTO t VALUES (1, 'one')"); err != nil {
			t.Fatal(err)
		}
		lsn, err := env.Primary.CurrentLSN(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, dc := range env.DCs {
			if err := dc.Replica.WaitReplayed(ctx, lsn); err != nil {
				t.Fatal(err)
			}
			var v string
			if err := dc.Replica.QueryRow(ctx, "SELECT v FROM t WHERE id = 1", &v); err != nil {
				t.Fatalf("%s: %v", dc.Name, err)
			}
			if v != "one" {
				t.Errorf("%s: got %q; want %q", dc.Name, v, "one")
			}
		}
	})

	t.Run("nats across gateway", func(t *testing.T) {
		if err := natsCrossDC(ctx, env, "dc1", "dc2", 10*time.Second); err != nil {
			t.Fatal(err)
		}
		if err := natsCrossDC(ctx, env, "dc2", "dc1", 10*time.Second); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("jetstream across gateway", func(t *testing.T) {
		nc1, err := nats.Connect(env.DC("dc1").NATS.URL())
		if err != nil {
			t.Fatal(err)
		}
		defer nc1.Close()
		js1, _ := jetstream.New(nc1)
		// The meta group spans both DCs; it may need a moment to elect.
		for deadline := time.Now().Add(30 * time.Second); ; {
			actx, cancel := context.WithTimeout(ctx, 2*time.Second)
			_, err = js1.CreateStream(actx, jetstream.StreamConfig{Name: "PROBE", Subjects: []string{"probe.js"}, Placement: &jetstream.Placement{Cluster: "dc1"}})
			cancel()
			if err == nil || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("create stream: %v", err)
		}
		if _, err := js1.Publish(ctx, "probe.js", []byte("m1")); err != nil {
			t.Fatal(err)
		}
		nc2, err := nats.Connect(env.DC("dc2").NATS.URL())
		if err != nil {
			t.Fatal(err)
		}
		defer nc2.Close()
		js2, _ := jetstream.New(nc2)
		c, err := js2.CreateOrUpdateConsumer(ctx, "PROBE", jetstream.ConsumerConfig{Durable: "dc2", AckPolicy: jetstream.AckExplicitPolicy})
		if err != nil {
			t.Fatalf("consumer from dc2: %v", err)
		}
		// Right after the consumer is made, its leader may not answer
		// yet: a fetch can fail with no responders (seen once on a
		// loaded machine). Retry that, within a deadline.
		var m jetstream.Msg
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			m, err = c.Next(jetstream.FetchMaxWait(10 * time.Second))
			if !errors.Is(err, nats.ErrNoResponders) || time.Now().After(deadline) {
				break
			}
		}
		if err != nil {
			t.Fatalf("fetch from dc2: %v", err)
		}
		if string(m.Data()) != "m1" {
			t.Errorf("got %q; want %q", m.Data(), "m1")
		}
		if err := m.Ack(); err != nil {
			t.Error(err)
		}
	})

	t.Run("memcached answers", func(t *testing.T) {
		for _, dc := range env.DCs {
			if got := len(dc.Memcached); got != 2 {
				t.Errorf("%s: got %d memcached; want 2", dc.Name, got)
			}
			for _, m := range dc.Memcached {
				if err := mcRoundTrip(m.Addr, "k"); err != nil {
					t.Errorf("%s: %v", m.Name, err)
				}
			}
		}
	})

	t.Run("pause replay freezes replay LSN", func(t *testing.T) {
		r := env.DC("dc2").Replica
		if err := r.PauseReplay(ctx); err != nil {
			t.Fatal(err)
		}
		before, err := r.ReplayLSN(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := env.Primary.Exec(ctx, "INSERT INTO t SELECT g, 'x' FROM generate_series(100, 200) g"); err != nil {
			t.Fatal(err)
		}
		lsn, _ := env.Primary.CurrentLSN(ctx)
		// dc1 replays the new WAL while dc2 is paused: once dc1 has it,
		// dc2 has had every chance to replay it too.
		if err := env.DC("dc1").Replica.WaitReplayed(ctx, lsn); err != nil {
			t.Fatal(err)
		}
		var received bool
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline) && !received; {
			_ = r.QueryRowArgs(ctx, "SELECT coalesce(pg_last_wal_receive_lsn() >= $1::pg_lsn, false)", []any{lsn}, &received)
		}
		if !received {
			t.Fatal("dc2 replica never received the WAL")
		}
		after, err := r.ReplayLSN(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if after != before {
			t.Fatalf("paused replay moved: got %s; want %s", after, before)
		}
		var n int
		if err := r.QueryRow(ctx, "SELECT count(*) FROM t", &n); err != nil {
			t.Fatal(err)
		}
		if n != 1 {
			t.Errorf("paused replica sees %d rows; want 1", n)
		}
		if err := r.ResumeReplay(ctx); err != nil {
			t.Fatal(err)
		}
		if err := r.WaitReplayed(ctx, lsn); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("cut and heal", func(t *testing.T) {
		if err := env.Cut("dc2"); err != nil {
			t.Fatal(err)
		}
		// Cross-DC NATS traffic stops both ways.
		if err := natsCrossDC(ctx, env, "dc1", "dc2", 2*time.Second); err == nil {
			t.Error("dc1 -> dc2 NATS message crossed a cut link")
		}
		if err := natsCrossDC(ctx, env, "dc2", "dc1", 2*time.Second); err == nil {
			t.Error("dc2 -> dc1 NATS message crossed a cut link")
		}
		// Replication stops: a row written now does not reach dc2.
		if err := env.Primary.Exec(ctx, "INSERT INTO t VALUES (2, 'two')"); err != nil {
			t.Fatal(err)
		}
		lsn, _ := env.Primary.CurrentLSN(ctx)
		if err := env.DC("dc1").Replica.WaitReplayed(ctx, lsn); err != nil {
			t.Fatal(err)
		}
		short, cancel := context.WithTimeout(ctx, 2*time.Second)
		err := env.DC("dc2").Replica.WaitReplayed(short, lsn)
		cancel()
		if err == nil {
			t.Error("row replicated to dc2 through a cut link")
		}
		if err := env.Heal("dc2"); err != nil {
			t.Fatal(err)
		}
		if err := env.DC("dc2").Replica.WaitReplayed(ctx, lsn); err != nil {
			t.Fatalf("after heal: %v", err)
		}
		if err := natsCrossDC(ctx, env, "dc1", "dc2", 30*time.Second); err != nil {
			t.Fatalf("after heal: %v", err)
		}
		if err := natsCrossDC(ctx, env, "dc2", "dc1", 30*time.Second); err != nil {
			t.Fatalf("after heal: %v", err)
		}
	})

	t.Run("latency", func(t *testing.T) {
		// Latency is a fault, not a timing target: check that it delays
		// the first byte by at least the delay, which cannot be flaky.
		l := env.DC("dc2").ReplLink
		l.SetLatency(300 * time.Millisecond)
		defer l.SetLatency(0)
		begin := time.Now()
		c, err := net.Dial("tcp", l.Addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// An SSLRequest: Postgres answers one byte, 'N' or 'S'.
		if _, err := c.Write([]byte{0, 0, 0, 8, 4, 210, 22, 47}); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 1)
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(b); err != nil {
			t.Fatal(err)
		}
		if got := time.Since(begin); got < 600*time.Millisecond {
			t.Errorf("round trip through a 300ms link took %s; want >= 600ms", got)
		}
	})

	t.Run("kill and restart", func(t *testing.T) {
		m := env.DC("dc1").Memcached[0]
		pid := m.PID()
		if err := m.Kill(); err != nil {
			t.Fatal(err)
		}
		if processAlive(pid) {
			t.Errorf("memcached pid %d alive after Kill", pid)
		}
		if err := mcRoundTrip(m.Addr, "k"); err == nil {
			t.Error("killed memcached still answers")
		}
		if err := m.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if err := mcRoundTrip(m.Addr, "k"); err != nil {
			t.Errorf("restarted memcached: %v", err)
		}

		p := env.Primary
		pid = p.PID()
		if err := p.Kill(); err != nil {
			t.Fatal(err)
		}
		if processAlive(pid) {
			t.Errorf("postgres pid %d alive after Kill", pid)
		}
		if err := p.Exec(ctx, "SELECT 1"); err == nil {
			t.Error("killed postgres still answers")
		}
		if err := p.Start(ctx); err != nil {
			t.Fatal(err)
		}
		var n int
		if err := p.QueryRow(ctx, "SELECT count(*) FROM t", &n); err != nil {
			t.Fatal(err)
		}
		if n != 103 {
			t.Errorf("after crash restart: got %d rows; want 103", n)
		}

		r := env.DC("dc1").Replica
		if err := r.Stop(); err != nil {
			t.Fatal(err)
		}
		if r.Running() {
			t.Error("stopped replica still running")
		}
		if err := r.Start(ctx); err != nil {
			t.Fatal(err)
		}

		nt := env.DC("dc2").NATS
		if err := nt.Kill(); err != nil {
			t.Fatal(err)
		}
		if _, err := nats.Connect(nt.URL(), nats.Timeout(time.Second)); err == nil {
			t.Error("killed nats still accepts clients")
		}
		if err := nt.Start(); err != nil {
			t.Fatal(err)
		}
		if err := natsCrossDC(ctx, env, "dc1", "dc2", 30*time.Second); err != nil {
			t.Fatalf("after nats restart: %v", err)
		}
	})

	t.Run("close leaves nothing", func(t *testing.T) {
		pids := env.PIDs()
		if len(pids) != 7 { // primary, 2 replicas, 4 memcached
			t.Errorf("got %d child processes; want 7", len(pids))
		}
		dir := env.Dir
		begin := time.Now()
		if err := env.Close(); err != nil {
			t.Fatal(err)
		}
		closed = true
		t.Logf("closed in %s", time.Since(begin).Round(time.Millisecond))
		if err := env.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
		for _, pid := range pids {
			if processAlive(pid) {
				t.Errorf("pid %d alive after Close", pid)
			}
		}
		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("dir %s remains after Close (stat: %v)", dir, err)
		}
		assertNoChildren(t)
	})
}

// assertNoChildren fails if this test process has any child process left.
func assertNoChildren(t *testing.T) {
	t.Helper()
	self := os.Getpid()
	entries, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		var state string
		var ppid int
		if _, err := fmt.Sscan(s[i+1:], &state, &ppid); err != nil {
			continue
		}
		if ppid == self && state != "Z" {
			t.Errorf("child process %s left after Close: %s", e.Name(), s[:i+1])
		}
	}
}

// natsCrossDC publishes in DC from and waits for it in DC to. It returns an
// error when nothing arrives within wait. It retries publishing, since
// interest crosses gateways asynchronously.
func natsCrossDC(ctx context.Context, env *testenv.Env, from, to string, wait time.Duration) error {
	sub, err := nats.Connect(env.DC(to).NATS.URL())
	if err != nil {
		return err
	}
	defer sub.Close()
	pub, err := nats.Connect(env.DC(from).NATS.URL())
	if err != nil {
		return err
	}
	defer pub.Close()
	subject := fmt.Sprintf("probe.%s.%d", from, time.Now().UnixNano())
	s, err := sub.SubscribeSync(subject)
	if err != nil {
		return err
	}
	if err := sub.Flush(); err != nil {
		return err
	}
	deadline := time.Now().Add(wait)
	for time.Now().Before(deadline) {
		if err := pub.Publish(subject, []byte("hello")); err != nil {
			return err
		}
		m, err := s.NextMsg(200 * time.Millisecond)
		if err == nil && string(m.Data) == "hello" {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	return fmt.Errorf("no message from %s reached %s within %s", from, to, wait)
}
