package testenv

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// NewNutcracker runs nutcracker (twemproxy 0.5.0, the reference proxy)
// with one memcached pool over servers (twemproxy specs,
// "host:port:weight [name]") and returns its listen address. It stops when
// the test ends; a missing binary or a failed start fails the test.
func NewNutcracker(t testing.TB, hash, distribution string, servers []string) string {
	t.Helper()
	bin, err := lookPath("nutcracker", "/usr/sbin") // Debian's package; not always in PATH
	if err != nil {
		t.Fatalf("testenv: %v (apt-get install nutcracker)", err)
	}
	port, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	statsPort, err := FreePort()
	if err != nil {
		t.Fatal(err)
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	var conf strings.Builder
	fmt.Fprintf(&conf, "pool:\n  listen: %s\n  hash: %s\n  distribution: %s\n", addr, hash, distribution)
	conf.WriteString("  auto_eject_hosts: false\n  timeout: 2000\n  servers:\n")
	for _, s := range servers {
		fmt.Fprintf(&conf, "   - %s\n", s)
	}
	dir := t.TempDir()
	confPath := filepath.Join(dir, "nutcracker.yml")
	if err := os.WriteFile(confPath, []byte(conf.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	var p proc
	logPath := filepath.Join(dir, "nutcracker.log")
	if err := p.start(bin, []string{"-c", confPath, "-s", strconv.Itoa(statsPort), "-a", "127.0.0.1",
		"-p", filepath.Join(dir, "nutcracker.pid")}, logPath, nil); err != nil {
		t.Fatalf("testenv: %v", err)
	}
	t.Cleanup(func() { _ = p.signal(syscall.SIGKILL, 5*time.Second) })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := waitTCP(ctx, addr, p.running); err != nil {
		log, _ := os.ReadFile(logPath)
		t.Fatalf("testenv: nutcracker: %v; log: %s", err, log)
	}
	return addr
}
