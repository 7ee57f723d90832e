// Command leaseproxyattack is the memory attack of
// scripts/bench/leaseproxyattack.sh (issue 14, 3): it attacks one proxy
// process and reports the process's peak resident memory (VmHWM from
// /proc/PID/status), so that leaseproxy and nutcracker can be compared
// under the same attack in the same run.
//
// Mode "multiget": one connection sends "get K K ... K" (-names copies of
// one key holding a -size value) and reads nothing for -hold (or reads at
// -read bytes/s), then reads what is left for up to -drain and closes.
// Mode "declared": -conns connections each send "set kN 0 0 -declare" and
// nothing more, for -hold, then close.
//
// During the attack a probe connection gets a small key every 100ms: the
// proxy should keep serving other clients. After the attack the command
// waits -after and reads the process's RSS again (is the memory given
// back?). One result line goes to stdout:
//
//	target mode peak_MB base_MB sampled_max_MB after_MB heap_max_MB detail probe_ok probe_fail probe_max_ms
//
// heap_max_MB is the largest go_memstats_heap_alloc_bytes seen at -metrics
// ("-" without -metrics).
//
//	leaseproxyattack -mode multiget -name leaseproxy -addr 127.0.0.1:11311 -pid 1234
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type options struct {
	mode, name, addr, key string
	metrics               string
	pid                   int
	names, size           int
	conns, declare        int
	hold, drain, after    time.Duration
	readRate              int
}

func main() {
	var o options
	flag.StringVar(&o.mode, "mode", "multiget", "multiget or declared")
	flag.StringVar(&o.name, "name", "", "the target's name in the output")
	flag.StringVar(&o.addr, "addr", "", "the proxy's host:port")
	flag.IntVar(&o.pid, "pid", 0, "the proxy's process id (its /proc/PID/status is read)")
	flag.StringVar(&o.metrics, "metrics", "", "a Go proxy's /metrics URL: also sample go_memstats_heap_alloc_bytes (the Go heap, which counts allocations RSS does not show until their pages are touched)")
	flag.StringVar(&o.key, "key", "attack:big", "multiget: the key of the big value")
	flag.IntVar(&o.names, "names", 1500, "multiget: names of the key on the get line")
	flag.IntVar(&o.size, "size", 1000000, "multiget: the value's size in bytes")
	flag.IntVar(&o.readRate, "read", 0, "multiget: bytes per second the client reads during -hold; 0: none")
	flag.DurationVar(&o.drain, "drain", 30*time.Second, "multiget: after -hold, read what is left for at most this long")
	flag.IntVar(&o.conns, "conns", 1000, "declared: connections")
	flag.IntVar(&o.declare, "declare", 1000000, "declared: the value length each set declares")
	flag.DurationVar(&o.hold, "hold", 10*time.Second, "how long the attack lasts")
	flag.DurationVar(&o.after, "after", 5*time.Second, "after the attack, wait this long and read the RSS again")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "leaseproxyattack:", err)
		os.Exit(1)
	}
}

// status reads one field of /proc/PID/status in kB.
func status(pid int, field string) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			return strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

func mb(kb int) float64 { return float64(kb) / 1024 }

func run(o options) error {
	if o.addr == "" || o.pid == 0 || o.name == "" {
		return errors.New("-name, -addr and -pid are required")
	}
	if err := setValue(o.addr, "attack:probe", []byte("p")); err != nil {
		return fmt.Errorf("probe key: %w", err)
	}
	if o.mode == "multiget" {
		if err := setValue(o.addr, o.key, bytes.Repeat([]byte("x"), o.size)); err != nil {
			return fmt.Errorf("big value: %w", err)
		}
	}
	base, err := status(o.pid, "VmRSS")
	if err != nil {
		return err
	}

	// The sampler keeps the largest RSS seen (VmHWM, read at the end, is
	// the kernel's own peak; the sample shows the attack reached it).
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var sampled, heap atomic.Int64
	heap.Store(-1)
	if o.metrics != "" {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.NewTicker(100 * time.Millisecond)
			defer t.Stop()
			for {
				if b, err := heapAlloc(o.metrics); err == nil && b > heap.Load() {
					heap.Store(b)
				}
				select {
				case <-stop:
					return
				case <-t.C:
				}
			}
		}()
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			if kb, err := status(o.pid, "VmRSS"); err == nil && int64(kb) > sampled.Load() {
				sampled.Store(int64(kb))
			}
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	var probeOK, probeFail int
	var probeMax time.Duration
	go func() {
		defer wg.Done()
		probeOK, probeFail, probeMax = probe(o.addr, stop)
	}()

	var detail string
	switch o.mode {
	case "multiget":
		detail, err = multiget(o)
	case "declared":
		detail, err = declared(o)
	default:
		err = fmt.Errorf("mode %q: want multiget or declared", o.mode)
	}
	close(stop)
	wg.Wait()
	if err != nil {
		return err
	}
	time.Sleep(o.after)
	after, err := status(o.pid, "VmRSS")
	if err != nil {
		return err
	}
	peak, err := status(o.pid, "VmHWM")
	if err != nil {
		return err
	}
	heapMax := "-"
	if h := heap.Load(); h >= 0 {
		heapMax = fmt.Sprintf("%.0f", float64(h)/(1<<20))
	}
	fmt.Printf("%s %s %.0f %.0f %.0f %.0f %s %s %d %d %.0f\n", o.name, o.mode, mb(peak), mb(base),
		mb(int(sampled.Load())), mb(after), heapMax, detail, probeOK, probeFail, float64(probeMax)/float64(time.Millisecond))
	return nil
}

// heapAlloc reads go_memstats_heap_alloc_bytes from a Prometheus text
// endpoint.
func heapAlloc(url string) (int64, error) {
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "go_memstats_heap_alloc_bytes "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return int64(f), err
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("%s: no go_memstats_heap_alloc_bytes", url)
}

// setValue stores key=value through addr and checks it reads back.
func setValue(addr, key string, value []byte) error {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		return err
	}
	r := bufio.NewReader(c)
	if _, err := fmt.Fprintf(c, "set %s 0 0 %d\r\n%s\r\n", key, len(value), value); err != nil {
		return err
	}
	line, err := r.ReadString('\n')
	if err != nil {
		return err
	}
	if line != "STORED\r\n" {
		return fmt.Errorf("set %s: got %q; want STORED", key, line)
	}
	if _, err := fmt.Fprintf(c, "get %s\r\n", key); err != nil {
		return err
	}
	line, err = r.ReadString('\n')
	if err != nil {
		return err
	}
	if want := fmt.Sprintf("VALUE %s 0 %d\r\n", key, len(value)); line != want {
		return fmt.Errorf("get %s: got %q; want %q", key, line, want)
	}
	if _, err := io.CopyN(io.Discard, r, int64(len(value)+len("\r\nEND\r\n"))); err != nil {
		return err
	}
	return nil
}

// probe gets a small key every 100ms on its own connection until stop,
// and counts the answers, the failures and the slowest answer.
func probe(addr string, stop <-chan struct{}) (ok, fail int, slowest time.Duration) {
	var c net.Conn
	var r *bufio.Reader
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	defer func() {
		if c != nil {
			c.Close()
		}
	}()
	for {
		select {
		case <-stop:
			return ok, fail, slowest
		case <-t.C:
		}
		start := time.Now()
		err := func() error {
			if c == nil {
				var err error
				if c, err = net.DialTimeout("tcp", addr, time.Second); err != nil {
					c = nil
					return err
				}
				r = bufio.NewReader(c)
			}
			if err := c.SetDeadline(time.Now().Add(time.Second)); err != nil {
				return err
			}
			if _, err := io.WriteString(c, "get attack:probe\r\n"); err != nil {
				return err
			}
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					return err
				}
				if line == "END\r\n" {
					return nil
				}
			}
		}()
		if err != nil {
			fail++
			if c != nil {
				c.Close()
				c = nil
			}
			continue
		}
		ok++
		slowest = max(slowest, time.Since(start))
	}
}

// multiget sends one get of -names copies of the big key, reads nothing
// (or -read bytes/s) for -hold, then reads the rest for up to -drain. The
// detail says how many bytes the client got and how the reply ended:
// "complete" (END), "eof" or "reset" (the proxy cut it off), "timeout".
func multiget(o options) (string, error) {
	c, err := net.DialTimeout("tcp", o.addr, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	var line strings.Builder
	line.WriteString("get")
	for range o.names {
		line.WriteString(" ")
		line.WriteString(o.key)
	}
	line.WriteString("\r\n")
	if _, err := io.WriteString(c, line.String()); err != nil {
		return "", err
	}
	var got int64
	buf := make([]byte, 64<<10)
	end := time.Now().Add(o.hold)
	tail := make([]byte, 0, 5)
	read := func(deadline time.Time, limit int) (bool, error) {
		if err := c.SetReadDeadline(deadline); err != nil {
			return false, err
		}
		n, err := c.Read(buf[:limit])
		got += int64(n)
		if n > 0 {
			tail = append(tail, buf[:n]...)
			if len(tail) > 5 {
				tail = tail[len(tail)-5:]
			}
		}
		return string(tail) == "END\r\n", err
	}
	if o.readRate > 0 {
		// Read at most readRate/10 bytes every 100ms.
		chunk := min(o.readRate/10, len(buf))
		for time.Now().Before(end) {
			next := time.Now().Add(100 * time.Millisecond)
			if done, err := read(next, max(chunk, 1)); done || (err != nil && !isTimeout(err)) {
				return fmt.Sprintf("bytes=%d,end=%s(during-hold)", got, endOf(done, err)), nil
			}
			time.Sleep(time.Until(next))
		}
	} else {
		time.Sleep(o.hold)
	}
	drainEnd := time.Now().Add(o.drain)
	for {
		done, err := read(drainEnd, len(buf))
		if done || err != nil {
			return fmt.Sprintf("bytes=%d,end=%s", got, endOf(done, err)), nil
		}
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func endOf(done bool, err error) string {
	switch {
	case done:
		return "complete"
	case errors.Is(err, io.EOF):
		return "eof"
	case isTimeout(err):
		return "timeout"
	default:
		return "reset"
	}
}

// declared opens -conns connections that each declare a -declare byte
// set and send none of it, holds them for -hold, then reports how many the
// proxy had closed (or answered) by then.
func declared(o options) (string, error) {
	conns := make([]net.Conn, 0, o.conns)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	refused := 0
	for i := range o.conns {
		c, err := net.DialTimeout("tcp", o.addr, 2*time.Second)
		if err != nil {
			refused++
			continue
		}
		conns = append(conns, c)
		if _, err := fmt.Fprintf(c, "set attack:declared:%d 0 0 %d\r\n", i, o.declare); err != nil {
			refused++
		}
	}
	time.Sleep(o.hold)
	closed, answered := 0, 0
	buf := make([]byte, 512)
	for _, c := range conns {
		if err := c.SetReadDeadline(time.Now().Add(time.Millisecond)); err != nil {
			return "", err
		}
		n, err := c.Read(buf)
		switch {
		case n > 0:
			answered++
		case err != nil && !isTimeout(err):
			closed++
		}
	}
	return fmt.Sprintf("open=%d,answered=%d,closed=%d,refused=%d", len(conns)-closed-answered, answered, closed, refused), nil
}
