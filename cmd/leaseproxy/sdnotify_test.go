package main

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pgcache/pgcache/testenv"
)

// TestSystemdNotify runs the built command as systemd would run it with
// Type=notify and WatchdogSec: a real unixgram NOTIFY_SOCKET receives
// READY=1 and a STATUS once serving, WATCHDOG=1 pings, RELOADING=1 and
// READY=1 around a SIGHUP (which keeps it running), and STOPPING=1 on
// SIGTERM, after which it exits 0.
func TestSystemdNotify(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 1)
	dir := t.TempDir()
	bin := filepath.Join(dir, "leaseproxy")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	sockDir, err := os.MkdirTemp("", "lpn") // short: socket paths are limited to 108 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sockPath := filepath.Join(sockDir, "notify")
	sock, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer sock.Close()
	msgs := make(chan string, 1024)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := sock.Read(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()

	listen, httpAddr := freeAddr(t), freeAddr(t)
	cfgPath := filepath.Join(dir, "leaseproxy.yaml")
	cfg := "listen: " + listen + "\nservers: [" + mcs[0].Addr + "]\nhttp: {listen: " + httpAddr + "}\n"
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-config", cfgPath)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+sockPath, "WATCHDOG_USEC=200000")
	var logs lockedBuffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})

	pings := 0
	// expect waits for a message for which want is true (want nil: a
	// watchdog ping), counting the watchdog pings seen meanwhile.
	expect := func(want func(string) bool, what string) string {
		t.Helper()
		timeout := time.After(60 * time.Second)
		for {
			select {
			case m, ok := <-msgs:
				if !ok {
					t.Fatalf("notify socket closed before %s", what)
				}
				if m == "WATCHDOG=1\n" {
					pings++
					if want == nil {
						return m
					}
					continue
				}
				if want(m) {
					return m
				}
				t.Fatalf("got %q; want %s", m, what)
			case <-timeout:
				t.Fatalf("no %s on the notify socket; log:\n%s", what, logs.String())
			}
		}
	}
	is := func(s string) func(string) bool { return func(m string) bool { return m == s } }

	expect(is("READY=1\n"), "READY=1")
	// READY is sent once the listener is bound: it must accept now.
	c, err := net.Dial("tcp", listen)
	if err != nil {
		t.Fatalf("dial after READY=1: %v", err)
	}
	c.Close()
	expect(func(m string) bool { return strings.HasPrefix(m, "STATUS=serving on ") }, "STATUS=serving on ...")
	for pings < 2 {
		expect(nil, "WATCHDOG=1")
	}

	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	expect(func(m string) bool {
		return strings.HasPrefix(m, "RELOADING=1\nMONOTONIC_USEC=") && strings.HasSuffix(m, "\n")
	}, "RELOADING=1 with MONOTONIC_USEC")
	expect(is("READY=1\n"), "READY=1 after the reload")
	before := pings
	for pings < before+1 {
		expect(nil, "WATCHDOG=1 after the reload")
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	expect(is("STOPPING=1\n"), "STOPPING=1")
	if err := <-exited; err != nil {
		t.Errorf("exit: %v\n%s", err, logs.String())
	}
	exited <- nil
	if !strings.Contains(logs.String(), "reload: config file is valid") {
		t.Errorf("no reload log line in:\n%s", logs.String())
	}
}

// lockedBuffer collects a process's output while the test reads it.
type lockedBuffer struct {
	mu sync.Mutex // guards b
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestProbe: the watchdog's check passes when the listener answers, even
// with a refusal, and fails when nothing accepts or nothing answers (a
// stalled proxy), so the pings stop.
func TestProbe(t *testing.T) {
	serve := func(t *testing.T, reply string) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		conns := make(chan net.Conn, 16)
		t.Cleanup(func() {
			ln.Close()
			for c := range conns {
				c.Close()
			}
		})
		go func() {
			defer close(conns)
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				if reply != "" {
					_, _ = c.Write([]byte(reply))
				}
				conns <- c // silent ones stay open until cleanup: a stall
			}
		}()
		return ln.Addr().String()
	}
	closed := func(t *testing.T) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		return addr
	}
	tests := []struct {
		name string
		addr func(t *testing.T) string
		ok   bool
	}{
		{"version", func(t *testing.T) string { return serve(t, "VERSION 1.6.18-leaseproxy\r\n") }, true},
		{"too many connections", func(t *testing.T) string { return serve(t, "SERVER_ERROR too many open connections\r\n") }, true},
		{"stalled", func(t *testing.T) string { return serve(t, "") }, false},
		{"garbage", func(t *testing.T) string { return serve(t, "HTTP/1.1 400 Bad Request\r\n") }, false},
		{"not listening", closed, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			err := probe(ctx, tt.addr(t))
			if (err == nil) != tt.ok {
				t.Errorf("got %v; want ok=%v", err, tt.ok)
			}
		})
	}
}
