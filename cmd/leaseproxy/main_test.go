package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pgcache/pgcache/testenv"
)

// TestExampleConfig: the example file parses and validates.
func TestExampleConfig(t *testing.T) {
	fc, err := loadConfig("leaseproxy.example.yaml")
	if err != nil {
		t.Fatalf("loadConfig: %v", err)
	}
	if got := fc.leaseConfig(); got.Lease.TTL != 2*time.Second || got.Lease.Wait != 250*time.Millisecond || !got.Lease.Stale {
		t.Errorf("got lease %+v; want ttl 2s, wait 250ms, stale", got.Lease)
	}
	if len(fc.Servers) != 2 || fc.Hash != "ketama" {
		t.Errorf("got servers %v hash %q; want 2 servers, ketama", fc.Servers, fc.Hash)
	}
	if pc := fc.poolConfig(); pc.ConnsPerServer != 1 || fc.Procs != 1 || pc.MaxInFlight != 2048 {
		t.Errorf("got conns_per_server %d, procs %d, max in flight %d; want 1, 1, 2048", pc.ConnsPerServer, fc.Procs, pc.MaxInFlight)
	}
}

// TestDefaults: a file with servers only gets one connection per server
// and GOMAXPROCS 1; procs 0 keeps Go's own.
func TestDefaults(t *testing.T) {
	p := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(p, []byte("servers: [127.0.0.1:1]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	fc, err := loadConfig(p)
	if err != nil {
		t.Fatal(err)
	}
	if pc := fc.poolConfig(); pc.ConnsPerServer != 1 || fc.Procs != 1 {
		t.Errorf("got conns_per_server %d, procs %d; want 1, 1", pc.ConnsPerServer, fc.Procs)
	}
	if err := os.WriteFile(p, []byte("servers: [127.0.0.1:1]\nprocs: 0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if fc, err := loadConfig(p); err != nil || fc.Procs != 0 {
		t.Errorf("procs: 0: got %d, %v; want 0 (Go's default)", fc.Procs, err)
	}
}

func TestConfigErrors(t *testing.T) {
	tests := map[string]string{
		"unknown field":       "servers: [127.0.0.1:1]\nbogus: 1\n",
		"no servers":          "listen: 127.0.0.1:0\n",
		"bad hash":            "servers: [127.0.0.1:1]\nhash: md4\n",
		"short ttl":           "servers: [127.0.0.1:1]\nlease: {ttl: 100ms}\n",
		"bad flush":           "servers: [127.0.0.1:1]\nflush_all: sometimes\n",
		"negative procs":      "servers: [127.0.0.1:1]\nprocs: -1\n",
		"negative gc_percent": "servers: [127.0.0.1:1]\ngc_percent: -5\n",
		"negative memory":     "servers: [127.0.0.1:1]\nmemory_limit: -1\n",
		"reply_bytes < value": "servers: [127.0.0.1:1]\nlimits: {reply_bytes: 1000}\n",
	}
	for name, body := range tests {
		t.Run(name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "c.yaml")
			if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
			if _, err := loadConfig(p); err == nil {
				t.Errorf("got no error for %q; want one", body)
			}
		})
	}
}

func freeAddr(t *testing.T) string {
	t.Helper()
	port, err := testenv.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("127.0.0.1:%d", port)
}

// TestBinary runs the built command: it serves, exports metrics and
// health, and drains on SIGTERM with exit status 0.
func TestBinary(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 2)
	dir := t.TempDir()
	bin := filepath.Join(dir, "leaseproxy")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	listen, httpAddr := freeAddr(t), freeAddr(t)
	cfg := fmt.Sprintf("listen: %s\nservers: [%s, %s]\nhttp: {listen: %s}\nlog: {level: debug}\nprocs: 1\nmemory_limit: 300000000\n",
		listen, mcs[0].Addr, mcs[1].Addr, httpAddr)
	cfgPath := filepath.Join(dir, "leaseproxy.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-config", cfgPath)
	var logs strings.Builder
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
	var nc net.Conn
	for deadline := time.Now().Add(30 * time.Second); ; {
		var err error
		if nc, err = net.Dial("tcp", listen); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("leaseproxy not listening: %v\n%s", err, logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	defer nc.Close()
	br := bufio.NewReader(nc)
	fmt.Fprintf(nc, "get k\r\nset k 0 0 1\r\nv\r\nget k\r\n")
	var got strings.Builder
	for !strings.HasSuffix(got.String(), "VALUE k 0 1\r\nv\r\nEND\r\n") {
		_ = nc.SetReadDeadline(time.Now().Add(10 * time.Second))
		l, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("read: %v; got %q", err, got.String())
		}
		got.WriteString(l)
	}
	if want := "END\r\nSTORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n"; got.String() != want {
		t.Errorf("got %q; want %q", got.String(), want)
	}
	body := httpGet(t, "http://"+httpAddr+"/metrics", http.StatusOK)
	for _, m := range []string{"leaseproxy_lease_wins_total 1", "leaseproxy_lease_fills_total 1",
		"leaseproxy_server_breaker_state{server=", "leaseproxy_connections 1", "go_goroutines",
		"go_gc_gomemlimit_bytes 3e+08"} { // memory_limit applied
		if !strings.Contains(body, m) {
			t.Errorf("/metrics: no %q", m)
		}
	}
	if body := httpGet(t, "http://"+httpAddr+"/healthz", http.StatusOK); !strings.HasPrefix(body, "ok") {
		t.Errorf("/healthz: got %q; want ok", body)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// The idle client connection is closed by the drain.
	_ = nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := br.ReadByte(); err != io.EOF {
		t.Errorf("client after SIGTERM: got %v; want EOF", err)
	}
	if err := <-exited; err != nil {
		t.Errorf("exit: %v\n%s", err, logs.String())
	}
	exited <- nil
	if !strings.Contains(logs.String(), `"drained"`) {
		t.Errorf("no drained log line in:\n%s", logs.String())
	}
	if !regexp.MustCompile(`"procs":1[,}]`).MatchString(logs.String()) {
		t.Errorf("procs: 1 not applied (want \"procs\":1 in the serving line):\n%s", logs.String())
	}
}

func httpGet(t *testing.T, url string, want int) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != want {
		t.Errorf("GET %s: got %d; want %d", url, resp.StatusCode, want)
	}
	return string(b)
}
