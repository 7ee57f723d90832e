package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pgcache/pgcache/testenv"
)

// peakRSS returns the peak resident set (VmHWM) of process pid, in bytes.
func peakRSS(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("read /proc status: %v", err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmHWM:" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				t.Fatalf("VmHWM %q: %v", l, err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc status")
	return 0
}

// TestBinaryMemoryBounded runs the built proxy under both attacks of
// issue 14 and reads its peak RSS: 1,000 connections that announce a
// 1 MB value and send nothing, then a get naming 1 MB values 1,500
// times (a 1.4 GiB reply), read by a client. The peak stays far below the
// attacks' size (it passed 2 GiB and 1 GB before).
func TestBinaryMemoryBounded(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dir := t.TempDir()
	var addrs []string
	for i := range 2 {
		m, err := testenv.StartMemcached(ctx, fmt.Sprintf("mc%d", i), filepath.Join(dir, fmt.Sprintf("mc%d", i)), "-m", "256")
		if err != nil {
			t.Fatalf("testenv: start memcached: %v", err)
		}
		t.Cleanup(func() { _ = m.Close() })
		addrs = append(addrs, m.Addr)
	}
	bin := filepath.Join(dir, "leaseproxy")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	listen, httpAddr := freeAddr(t), freeAddr(t)
	cfg := fmt.Sprintf("listen: %s\nservers: [%s, %s]\nhttp: {listen: %s}\nmemory_limit: 268435456\n",
		listen, addrs[0], addrs[1], httpAddr)
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
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	var nc net.Conn
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var err error
		if nc, err = net.Dial("tcp", listen); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("leaseproxy not listening: %v\n%s", err, logs.String())
		}
	}
	defer nc.Close()
	_ = nc.SetDeadline(time.Now().Add(2 * time.Minute))
	br := bufio.NewReaderSize(nc, 64<<10)
	const size, distinct = 1000000, 64
	value := strings.Repeat("x", size)
	for i := range distinct {
		fmt.Fprintf(nc, "set big:%d 0 0 %d\r\n%s\r\n", i, size, value)
		if l, err := br.ReadString('\n'); err != nil || l != "STORED\r\n" {
			t.Fatalf("set big:%d: got %q, %v", i, l, err)
		}
	}
	base := peakRSS(t, cmd.Process.Pid)

	// 1. 1,000 connections announce 1 MB and send nothing.
	for i := range 1000 {
		c, err := net.Dial("tcp", listen)
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		t.Cleanup(func() { _ = c.Close() })
		if _, err := fmt.Fprintf(c, "set attack:%d 0 0 1000000\r\n", i); err != nil {
			t.Fatal(err)
		}
	}
	// The proxy answers in order: once this connection's command is
	// answered, the others have been accepted; give them a second to read
	// their lines.
	fmt.Fprintf(nc, "version\r\n")
	if l, err := br.ReadString('\n'); err != nil || !strings.HasPrefix(l, "VERSION") {
		t.Fatalf("version: got %q, %v", l, err)
	}
	time.Sleep(time.Second)
	afterSets := peakRSS(t, cmd.Process.Pid)
	// Untouched pages do not count in RSS: the heap tells what was
	// allocated for the announced values.
	heap := metricValue(t, httpGet(t, "http://"+httpAddr+"/metrics", 200), "go_memstats_heap_alloc_bytes")
	// 2. One get naming the values 1,500 times.
	var line strings.Builder
	line.WriteString("get")
	for i := range 1500 {
		fmt.Fprintf(&line, " big:%d", i%distinct)
	}
	line.WriteString("\r\n")
	if _, err := io.WriteString(nc, line.String()); err != nil {
		t.Fatal(err)
	}
	var values int
	var bytes int64
	for {
		l, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("read reply: %v after %d values", err, values)
		}
		if l == "END\r\n" {
			break
		}
		f := strings.Fields(l)
		if len(f) < 4 || f[0] != "VALUE" {
			t.Fatalf("unexpected line %q", l)
		}
		n, _ := strconv.ParseInt(f[3], 10, 64)
		if _, err := io.CopyN(io.Discard, br, n+2); err != nil {
			t.Fatal(err)
		}
		values++
		bytes += n
	}
	if values != 1500 || bytes != 1500*size {
		t.Fatalf("got %d values, %d bytes; want 1500 values of %d bytes", values, bytes, size)
	}
	afterGet := peakRSS(t, cmd.Process.Pid)

	const mib = 1 << 20
	t.Logf("peak RSS: %d MiB after setup, %d MiB after 1,000 announced 1 MB values, %d MiB after the 1,500-name get (1,430 MiB reply)",
		base/mib, afterSets/mib, afterGet/mib)
	if afterGet > 400*mib {
		t.Errorf("peak RSS %d MiB after the multi-get; want at most 400 MiB", afterGet/mib)
	}
	t.Logf("heap after 1,000 announced 1 MB values: %d MiB", int64(heap)/mib)
	if heap > 200*mib {
		t.Errorf("heap %d MiB after the announced values; want at most 200 MiB (they announce 954 MiB)", int64(heap)/mib)
	}
	if afterSets > 400*mib {
		t.Errorf("peak RSS %d MiB after the announced values; want at most 400 MiB", afterSets/mib)
	}
}

// metricValue returns the value of the sample named name in a Prometheus
// text exposition.
func metricValue(t *testing.T, body, name string) float64 {
	t.Helper()
	for _, l := range strings.Split(body, "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[0] == name {
			v, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				t.Fatalf("%s: %v", l, err)
			}
			return v
		}
	}
	t.Fatalf("/metrics: no %s", name)
	return 0
}
