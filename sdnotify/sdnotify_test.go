package sdnotify

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// listen opens a real unixgram socket, as systemd's notify socket is, at
// name (a path, or "@..." for an abstract one).
func listen(t *testing.T, name string) *net.UnixConn {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatalf("listen %s: %v", name, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func socketPath(t *testing.T) string {
	t.Helper()
	// Unix socket paths are short (108 bytes); t.TempDir can be long.
	dir, err := os.MkdirTemp("", "sdn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "notify")
}

// recv reads one datagram, failing the test after a generous deadline.
func recv(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	buf := make([]byte, 4096)
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("read notify socket: %v", err)
	}
	return string(buf[:n])
}

func newNotifier(t *testing.T, cfg Config) *Notifier {
	t.Helper()
	n, err := New(cfg)
	if err != nil {
		t.Fatalf("New(%+v): %v", cfg, err)
	}
	return n
}

func TestMessages(t *testing.T) {
	path := socketPath(t)
	sock := listen(t, path)
	n := newNotifier(t, Config{Socket: path})
	if !n.Enabled() {
		t.Fatal("got disabled; want enabled")
	}
	tests := []struct {
		name string
		send func() error
		want string
	}{
		{"ready", n.Ready, "READY=1\n"},
		{"stopping", n.Stopping, "STOPPING=1\n"},
		{"status", func() error { return n.Status("draining: 3 batches\nleft") }, "STATUS=draining: 3 batches left\n"},
		{"watchdog", n.Watchdog, "WATCHDOG=1\n"},
		{"notify", func() error { return n.Notify("MAINPID=42", "READY=1") }, "MAINPID=42\nREADY=1\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.send(); err != nil {
				t.Fatalf("send: %v", err)
			}
			if got := recv(t, sock); got != tt.want {
				t.Errorf("got %q; want %q", got, tt.want)
			}
		})
	}
}

// TestReloading: RELOADING=1 carries CLOCK_MONOTONIC in microseconds,
// which systemd 253+ compares with its own reading.
func TestReloading(t *testing.T) {
	path := socketPath(t)
	sock := listen(t, path)
	n := newNotifier(t, Config{Socket: path})
	before, ok := monotonicUsec()
	if !ok {
		t.Fatal("monotonicUsec: no reading on linux")
	}
	if err := n.Reloading(); err != nil {
		t.Fatal(err)
	}
	after, _ := monotonicUsec()
	got := recv(t, sock)
	lines := strings.Split(strings.TrimSuffix(got, "\n"), "\n")
	if len(lines) != 2 || lines[0] != "RELOADING=1" || !strings.HasPrefix(lines[1], "MONOTONIC_USEC=") || !strings.HasSuffix(got, "\n") {
		t.Fatalf("got %q; want \"RELOADING=1\\nMONOTONIC_USEC=<usec>\\n\"", got)
	}
	usec, err := strconv.ParseUint(strings.TrimPrefix(lines[1], "MONOTONIC_USEC="), 10, 64)
	if err != nil {
		t.Fatalf("MONOTONIC_USEC: %v", err)
	}
	if usec < before || usec > after {
		t.Errorf("got MONOTONIC_USEC=%d; want within [%d, %d]", usec, before, after)
	}
}

func TestAbstractSocket(t *testing.T) {
	name := fmt.Sprintf("@pgcache-sdnotify-test-%d-%d", os.Getpid(), time.Now().UnixNano())
	sock := listen(t, name)
	n := newNotifier(t, Config{Socket: name})
	if err := n.Ready(); err != nil {
		t.Fatalf("Ready: %v", err)
	}
	if got := recv(t, sock); got != "READY=1\n" {
		t.Errorf("got %q; want %q", got, "READY=1\n")
	}
}

func TestFromEnv(t *testing.T) {
	path := socketPath(t)
	sock := listen(t, path)
	t.Setenv("NOTIFY_SOCKET", path)
	t.Setenv("WATCHDOG_USEC", "30000000")
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	n, err := FromEnv()
	if err != nil {
		t.Fatal(err)
	}
	if got := n.WatchdogInterval(); got != 30*time.Second {
		t.Errorf("got interval %s; want 30s", got)
	}
	if got := n.WatchdogPeriod(); got != 15*time.Second {
		t.Errorf("got period %s; want 15s", got)
	}
	if err := n.Watchdog(); err != nil {
		t.Fatal(err)
	}
	if got := recv(t, sock); got != "WATCHDOG=1\n" {
		t.Errorf("got %q; want %q", got, "WATCHDOG=1\n")
	}
}

func TestWatchdogInterval(t *testing.T) {
	self := strconv.Itoa(os.Getpid())
	tests := []struct {
		name, usec, pid string
		want            time.Duration
		err             error
	}{
		{"unset", "", "", 0, nil},
		{"no pid", "30000000", "", 30 * time.Second, nil},
		{"this pid", "500000", self, 500 * time.Millisecond, nil},
		{"other pid", "30000000", strconv.Itoa(os.Getpid() + 1), 0, nil},
		{"zero", "0", "", 0, ErrWatchdog},
		{"not a number", "30s", "", 0, ErrWatchdog},
		{"negative", "-5", "", 0, ErrWatchdog},
		{"too large", "9223372036854775807", "", 0, ErrWatchdog},
		{"bad pid", "30000000", "abc", 0, ErrWatchdog},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("WATCHDOG_USEC", tt.usec)
			t.Setenv("WATCHDOG_PID", tt.pid)
			got, err := WatchdogInterval()
			if !errors.Is(err, tt.err) || (tt.err == nil && err != nil) {
				t.Fatalf("got error %v; want %v", err, tt.err)
			}
			if got != tt.want {
				t.Errorf("got %s; want %s", got, tt.want)
			}
		})
	}
}

// TestDisabled: without NOTIFY_SOCKET everything is a no-op, including
// the watchdog loop even when WATCHDOG_USEC is set.
func TestDisabled(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("WATCHDOG_USEC", "1000")
	t.Setenv("WATCHDOG_PID", "")
	n, err := FromEnv()
	if err != nil {
		t.Fatal(err)
	}
	if n.Enabled() || n.WatchdogPeriod() != 0 {
		t.Errorf("got enabled %v period %s; want disabled, 0", n.Enabled(), n.WatchdogPeriod())
	}
	for name, f := range map[string]func() error{"ready": n.Ready, "stopping": n.Stopping, "reloading": n.Reloading,
		"watchdog": n.Watchdog, "status": func() error { return n.Status("x") }} {
		if err := f(); err != nil {
			t.Errorf("%s: got %v; want nil", name, err)
		}
	}
	called := false
	if err := n.RunWatchdog(context.Background(), func(context.Context) error { called = true; return nil }); err != nil || called {
		t.Errorf("RunWatchdog: got %v, health called %v; want nil at once, not called", err, called)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, s := range []string{"relative/path", "@", "vsock:2:1234", "notify"} {
		if _, err := New(Config{Socket: s}); !errors.Is(err, ErrSocket) {
			t.Errorf("New(%q): got %v; want ErrSocket", s, err)
		}
	}
	if _, err := New(Config{Socket: "/run/x", WatchdogInterval: -time.Second}); !errors.Is(err, ErrWatchdog) {
		t.Errorf("negative interval: got %v; want ErrWatchdog", err)
	}
	// A bad socket from the environment still yields a usable no-op Notifier.
	t.Setenv("NOTIFY_SOCKET", "relative")
	n, err := FromEnv()
	if !errors.Is(err, ErrSocket) || n == nil || n.Enabled() {
		t.Errorf("FromEnv with a bad socket: got %v, %v; want ErrSocket and a disabled Notifier", n, err)
	}
}

func TestSendErrors(t *testing.T) {
	path := socketPath(t) // nobody listens
	n := newNotifier(t, Config{Socket: path})
	if err := n.Ready(); err == nil {
		t.Error("Ready with no listener: got nil; want an error")
	}
	sock := listen(t, path)
	for _, bad := range []string{"READY=1\nSTOPPING=1", "READY"} {
		if err := n.Notify(bad); err == nil {
			t.Errorf("Notify(%q): got nil; want an error", bad)
		}
	}
	if err := n.Ready(); err != nil {
		t.Fatal(err)
	}
	if got := recv(t, sock); got != "READY=1\n" {
		t.Errorf("got %q; want only %q (bad lines must not be sent)", got, "READY=1\n")
	}
}

// TestRunWatchdog drives the loop's health checks one by one: a healthy
// check pings, a failing one sets STATUS and does not ping, recovery
// restores the status and pings again, and a check that stalls stops the
// pings altogether.
func TestRunWatchdog(t *testing.T) {
	path := socketPath(t)
	sock := listen(t, path)
	const interval = 40 * time.Millisecond
	n := newNotifier(t, Config{Socket: path, WatchdogInterval: interval})
	if got := n.WatchdogPeriod(); got != interval/2 {
		t.Fatalf("got period %s; want %s", got, interval/2)
	}
	if err := n.Status("serving"); err != nil {
		t.Fatal(err)
	}
	if got := recv(t, sock); got != "STATUS=serving\n" {
		t.Fatalf("got %q; want STATUS=serving", got)
	}

	calls := make(chan context.Context)
	answers := make(chan error)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- n.RunWatchdog(ctx, func(hctx context.Context) error {
			calls <- hctx
			return <-answers
		})
	}()
	step := func(answer error, want ...string) {
		t.Helper()
		hctx := <-calls
		if _, ok := hctx.Deadline(); !ok {
			t.Error("health check ctx has no deadline; want one period")
		}
		answers <- answer
		for _, w := range want {
			if got := recv(t, sock); got != w {
				t.Fatalf("after health %v: got %q; want %q", answer, got, w)
			}
		}
	}
	step(nil, "WATCHDOG=1\n")
	step(nil, "WATCHDOG=1\n")
	step(errors.New("accept loop stuck\nfor 3s"), "STATUS=unhealthy, not pinging the watchdog: accept loop stuck for 3s\n")
	step(errors.New("still stuck")) // no message: no ping, status already says so
	step(nil, "STATUS=serving\n", "WATCHDOG=1\n")

	// The next check stalls: nothing may be sent while it hangs, however
	// many periods pass.
	<-calls
	_ = sock.SetReadDeadline(time.Now().Add(25 * interval))
	buf := make([]byte, 512)
	if k, err := sock.Read(buf); err == nil {
		t.Errorf("stalled health check: got %q; want no datagram", buf[:k])
	} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Errorf("read: got %v; want a timeout", err)
	}
	cancel()
	answers <- nil
	if err := <-done; err != nil {
		t.Errorf("RunWatchdog: got %v; want nil after cancel", err)
	}
}
