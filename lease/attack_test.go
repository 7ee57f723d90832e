package lease

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pgcache/pgcache/testenv"
)

// heapPeak samples the heap in use (HeapAlloc) every few milliseconds
// until stop, with the collector set to run often (GOGC 25), so that the
// peak follows what is live rather than the collector's pace. It
// returns the baseline (before) and a func that stops sampling and
// returns the peak.
func heapPeak(t *testing.T) (base uint64, stop func() uint64) {
	t.Helper()
	old := debug.SetGCPercent(25)
	t.Cleanup(func() { debug.SetGCPercent(old) })
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base = ms.HeapAlloc
	done := make(chan struct{})
	peak := make(chan uint64, 1)
	go func() {
		var ms runtime.MemStats
		var p uint64
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for {
			runtime.ReadMemStats(&ms)
			p = max(p, ms.HeapAlloc)
			select {
			case <-done:
				peak <- p
				return
			case <-tick.C:
			}
		}
	}()
	var once sync.Once
	var p uint64
	return base, func() uint64 {
		once.Do(func() {
			close(done)
			p = <-peak
		})
		return p
	}
}

// drainValues reads a retrieval reply up to END, discarding the data,
// and returns how many values and data bytes it held.
func drainValues(br *bufio.Reader) (n int, bytes int64, err error) {
	for {
		l, err := br.ReadString('\n')
		if err != nil {
			return n, bytes, err
		}
		if l == "END\r\n" {
			return n, bytes, nil
		}
		f := strings.Fields(l)
		if len(f) < 4 || f[0] != "VALUE" {
			return n, bytes, fmt.Errorf("unexpected line %q", l)
		}
		size, err := strconv.ParseInt(f[3], 10, 64)
		if err != nil {
			return n, bytes, err
		}
		if _, err := io.CopyN(io.Discard, br, size+2); err != nil {
			return n, bytes, err
		}
		n++
		bytes += size
	}
}

const mib = 1 << 20

// bigMemcacheds starts n memcached servers of 512 MiB each.
func bigMemcacheds(t *testing.T, n int) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	dir := t.TempDir()
	addrs := make([]string, n)
	for i := range addrs {
		m, err := testenv.StartMemcached(ctx, fmt.Sprintf("big%d", i), fmt.Sprintf("%s/big%d", dir, i), "-m", "512")
		if err != nil {
			t.Fatalf("testenv: start memcached: %v", err)
		}
		t.Cleanup(func() { _ = m.Close() })
		addrs[i] = m.Addr
	}
	return addrs
}

// TestMultiGetAttackBounded: "get big big ... big" naming 1 MB values
// 1,500 times (32 distinct keys, in turn) is answered in full, with the
// proxy's heap far below the 1.4 GiB of the reply: values stream to the
// client in batches of MultiGetParallel (32) keys. Then 8 connections do
// it at once (200 names each, 32 keys of their own), reading only after
// a second: the reply budget (ReplyBytes, 64 MiB here) bounds them all
// together, where their 8 batches of 32 values would hold 256 MB.
func TestMultiGetAttackBounded(t *testing.T) {
	addrs := bigMemcacheds(t, 2)
	cfg := testConfig()
	cfg.ReplyBytes = 64 * mib
	p := startProxy(t, cfg, addrs)
	const size, conns, distinct = 1000000, 8, 32
	c := dial(t, p.Addr)
	value := strings.Repeat("x", size)
	for i := range conns * distinct {
		if got := c.set(fmt.Sprintf("big:%d", i), value); got != "STORED" {
			t.Fatalf("set big:%d: %q", i, got)
		}
	}
	// get names n keys of set: big:<set*distinct + i%distinct>.
	get := func(set, names int) string {
		var b strings.Builder
		b.WriteString("get")
		for i := range names {
			fmt.Fprintf(&b, " big:%d", set*distinct+i%distinct)
		}
		b.WriteString("\r\n")
		return b.String()
	}

	t.Run("one-connection", func(t *testing.T) {
		base, peak := heapPeak(t)
		c.send(get(0, 1500))
		n, b, err := drainValues(c.br)
		if err != nil || n != 1500 || b != 1500*size {
			t.Fatalf("got %d values, %d bytes, %v; want 1500 values of %d bytes", n, b, err, size)
		}
		grew := int64(peak()) - int64(base)
		t.Logf("1 connection, 1,500 x 1 MB: heap peak %d MiB above the baseline", grew/mib)
		if grew > 160*mib {
			t.Errorf("heap grew by %d MiB; want at most 160 MiB (the reply is 1,430 MiB)", grew/mib)
		}
	})
	t.Run("8-connections", func(t *testing.T) {
		cs := make([]*client, conns)
		for i := range cs {
			cs[i] = dial(t, p.Addr)
		}
		base, peak := heapPeak(t)
		var wg sync.WaitGroup
		errs := make([]error, len(cs))
		for i, c := range cs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := io.WriteString(c.nc, get(i, 200)); err != nil {
					errs[i] = err
					return
				}
				// A slow reader: the proxy's writes to it block while it
				// holds a batch of values.
				time.Sleep(time.Second)
				n, _, err := drainValues(c.br)
				if err == nil && n != 200 {
					err = fmt.Errorf("got %d values; want 200", n)
				}
				errs[i] = err
			}()
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("connection %d: %v", i, err)
			}
		}
		grew := int64(peak()) - int64(base)
		t.Logf("8 connections, 200 x 1 MB each: heap peak %d MiB above the baseline (reply budget 64 MiB)", grew/mib)
		if grew > 160*mib {
			t.Errorf("heap grew by %d MiB; want at most 160 MiB (8 batches of 32 values are 256 MiB)", grew/mib)
		}
	})
}

// TestDeclaredValueAttackBounded: 1,000 connections announce a 1 MB
// value ("set k 0 0 1000000") and send nothing. The proxy allocates
// a small buffer for each (it grows as the bytes come), not 1 GB; and a
// client that then sends its value has it stored.
func TestDeclaredValueAttackBounded(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 1)
	p := startProxy(t, testConfig(), addrs)
	const conns = 1000
	base, peak := heapPeak(t)
	ncs := make([]net.Conn, conns)
	for i := range ncs {
		nc, err := net.Dial("tcp", p.Addr)
		if err != nil {
			t.Fatalf("dial %d: %v", i, err)
		}
		t.Cleanup(func() { _ = nc.Close() })
		if _, err := io.WriteString(nc, fmt.Sprintf("set attack:%d 0 0 1000000\r\n", i)); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
		ncs[i] = nc
	}
	for deadline := time.Now().Add(30 * time.Second); p.Stats().Conns < conns; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("got %d connections; want %d", p.Stats().Conns, conns)
		}
	}
	// Let every connection read its line and start on its data block.
	time.Sleep(time.Second)
	grew := int64(peak()) - int64(base)
	t.Logf("%d connections announcing 1 MB each: heap peak %d MiB above the baseline", conns, grew/mib)
	if grew > 100*mib {
		t.Errorf("heap grew by %d MiB; want at most 100 MiB (the announced values are 954 MiB)", grew/mib)
	}
	// One of them sends its value after all.
	nc := ncs[0]
	br := bufio.NewReader(nc)
	if _, err := io.WriteString(nc, strings.Repeat("y", 1000000)+"\r\n"); err != nil {
		t.Fatal(err)
	}
	_ = nc.SetReadDeadline(time.Now().Add(30 * time.Second))
	if l, err := br.ReadString('\n'); err != nil || l != "STORED\r\n" {
		t.Fatalf("got %q, %v; want STORED", l, err)
	}
}

// TestWriteTimeout: a client that sends a large multi-get and never
// reads the reply is cut off after WriteTimeout, counted, and the proxy
// goes on serving others.
func TestWriteTimeout(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 1)
	cfg := testConfig()
	cfg.WriteTimeout = time.Second
	p := startProxy(t, cfg, addrs)
	c := dial(t, p.Addr)
	if got := c.set("big", strings.Repeat("x", 1000000)); got != "STORED" {
		t.Fatalf("set big: %q", got)
	}
	sleeper := dial(t, p.Addr)
	sleeper.send("get" + strings.Repeat(" big", 200) + "\r\n")
	start := time.Now()
	for p.Stats().WriteTimeouts == 0 {
		if time.Since(start) > 30*time.Second {
			t.Fatalf("the client that does not read was not cut off: %+v", p.Stats())
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("cut off after %s (write timeout 1s)", time.Since(start).Round(10*time.Millisecond))
	if v, ok := c.get1("big"); !ok || len(v) != 1000000 {
		t.Errorf("another client: got %d bytes (found %v); want the value", len(v), ok)
	}
}
