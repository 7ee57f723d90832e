// Command leaseproxyload is the load generator of scripts/bench/leaseproxy.sh.
//
// Mode "mix" runs a get/set mix (9:1 by default) over preloaded keys from
// many connections against each target in turn and prints ops/s, p50 and
// p99 per target. Mode "herd" makes N clients miss one fresh key at once
// through a target; a client that misses "fills from the database" (sleeps
// -fill) and sets the key. It prints the fills (1 is the goal) and the
// p99 of the clients' waits. With a -fill slower than the proxy's
// lease.wait, every waiter misses and sets: the sets' answers are counted
// (STORED, NOT_STORED, SERVER_ERROR and other errors) rather than ending
// the run, and -pooled sends each client's set on another connection than
// its get (one of a pool of -pool connections), as pooling clients do.
//
//	leaseproxyload -mode mix -targets memcached=127.0.0.1:11211,leaseproxy=127.0.0.1:11311
//	leaseproxyload -mode herd -targets leaseproxy=127.0.0.1:11311 -n 10,100,1000
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	mode := flag.String("mode", "mix", "mix or herd")
	targets := flag.String("targets", "", "name=host:port,... (in order)")
	conns := flag.Int("conns", 32, "mix: connections per target")
	duration := flag.Duration("duration", 5*time.Second, "mix: run time per target")
	keys := flag.Int("keys", 10000, "mix: keys")
	size := flag.Int("size", 100, "value size in bytes")
	setRatio := flag.Float64("set", 0.1, "mix: share of sets")
	ns := flag.String("n", "10,100,1000", "herd: concurrent clients per herd")
	fill := flag.Duration("fill", 10*time.Millisecond, "herd: database fill time")
	pooled := flag.Bool("pooled", false, "herd: each client sets on another connection than its get")
	pool := flag.Int("pool", 500, "herd with -pooled: connections the sets share")
	flag.Parse()
	herdPooled, herdPool = *pooled, *pool
	if err := run(*mode, *targets, *conns, *duration, *keys, *size, *setRatio, *ns, *fill); err != nil {
		fmt.Fprintln(os.Stderr, "leaseproxyload:", err)
		os.Exit(1)
	}
}

// herdPooled and herdPool are -pooled and -pool.
var (
	herdPooled bool
	herdPool   int
)

type target struct{ name, addr string }

func parseTargets(s string) ([]target, error) {
	var out []target
	for _, f := range strings.Split(s, ",") {
		name, addr, ok := strings.Cut(f, "=")
		if !ok || name == "" || addr == "" {
			return nil, fmt.Errorf("target %q: want name=host:port", f)
		}
		out = append(out, target{name, addr})
	}
	return out, nil
}

func run(mode, targets string, conns int, duration time.Duration, keys, size int, setRatio float64, ns string, fill time.Duration) error {
	ts, err := parseTargets(targets)
	if err != nil {
		return err
	}
	value := []byte(strings.Repeat("v", size))
	switch mode {
	case "mix":
		fmt.Printf("%-24s %12s %10s %10s %8s\n", "target", "ops/s", "p50(us)", "p99(us)", "errors")
		for _, t := range ts {
			r, err := mix(t.addr, conns, duration, keys, value, setRatio)
			if err != nil {
				return fmt.Errorf("%s: %w", t.name, err)
			}
			fmt.Printf("%-24s %12.0f %10.0f %10.0f %8d\n", t.name, r.opsPerSec, r.p50, r.p99, r.errors)
		}
	case "herd":
		fmt.Printf("%-24s %8s %8s %12s %8s %10s %8s\n", "target", "N", "fills", "p99 wait(ms)", "stored", "not_stored", "errors")
		for _, t := range ts {
			for _, f := range strings.Split(ns, ",") {
				n, err := strconv.Atoi(f)
				if err != nil {
					return fmt.Errorf("-n %q: %w", f, err)
				}
				r, err := herd(t.addr, n, value, fill)
				if err != nil {
					return fmt.Errorf("%s N=%d: %w", t.name, n, err)
				}
				fmt.Printf("%-24s %8d %8d %12.1f %8d %10d %8d\n", t.name, n, r.fills, r.p99ms, r.stored, r.notStored, r.setErrors)
				if r.firstErr != nil {
					fmt.Printf("%-24s %8d first set error: %v\n", t.name, n, r.firstErr)
				}
			}
		}
	default:
		return fmt.Errorf("mode %q (want mix or herd)", mode)
	}
	return nil
}

type client struct {
	nc  net.Conn
	br  *bufio.Reader
	bw  *bufio.Writer
	buf []byte
}

func dial(addr string) (*client, error) {
	nc, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	return &client{nc: nc, br: bufio.NewReaderSize(nc, 16<<10), bw: bufio.NewWriterSize(nc, 16<<10)}, nil
}

func (c *client) get(key string) (bool, error) {
	c.buf = append(append(append(c.buf[:0], "get "...), key...), "\r\n"...)
	if _, err := c.bw.Write(c.buf); err != nil {
		return false, err
	}
	if err := c.bw.Flush(); err != nil {
		return false, err
	}
	found := false
	for {
		l, err := c.br.ReadSlice('\n')
		if err != nil {
			return false, err
		}
		if string(l) == "END\r\n" {
			return found, nil
		}
		f := strings.Fields(string(l))
		if len(f) < 4 || f[0] != "VALUE" {
			return false, fmt.Errorf("unexpected %q", l)
		}
		n, err := strconv.Atoi(f[3])
		if err != nil {
			return false, fmt.Errorf("unexpected %q", l)
		}
		if _, err := c.br.Discard(n + 2); err != nil {
			return false, err
		}
		found = true
	}
}

// errSetServer is a set answered with an error line.
var errSetServer = errors.New("set answered an error")

func (c *client) set(key string, value []byte) error {
	c.buf = append(append(append(c.buf[:0], "set "...), key...), " 0 0 "...)
	c.buf = strconv.AppendInt(c.buf, int64(len(value)), 10)
	c.buf = append(append(append(c.buf, "\r\n"...), value...), "\r\n"...)
	if _, err := c.bw.Write(c.buf); err != nil {
		return err
	}
	if err := c.bw.Flush(); err != nil {
		return err
	}
	l, err := c.br.ReadSlice('\n')
	if err != nil {
		return err
	}
	if s := string(l); s != "STORED\r\n" && s != "NOT_STORED\r\n" {
		return fmt.Errorf("%w: %q", errSetServer, s)
	}
	if string(l) == "NOT_STORED\r\n" {
		return errNotStored
	}
	return nil
}

// errNotStored is a set answered NOT_STORED.
var errNotStored = errors.New("NOT_STORED")

type mixResult struct {
	opsPerSec, p50, p99 float64
	errors              int64
}

func mix(addr string, conns int, duration time.Duration, keys int, value []byte, setRatio float64) (mixResult, error) {
	pre, err := dial(addr)
	if err != nil {
		return mixResult{}, err
	}
	for i := 0; i < keys; i++ {
		if err := pre.set("load:"+strconv.Itoa(i), value); err != nil && !errors.Is(err, errNotStored) {
			return mixResult{}, err
		}
	}
	pre.nc.Close()
	var ops, errs atomic.Int64
	lats := make([][]time.Duration, conns)
	stop := time.Now().Add(duration)
	var wg sync.WaitGroup
	setEvery := int64(0)
	if setRatio > 0 {
		setEvery = int64(1 / setRatio)
	}
	for w := 0; w < conns; w++ {
		c, err := dial(addr)
		if err != nil {
			return mixResult{}, err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.nc.Close()
			lat := make([]time.Duration, 0, 1<<16)
			for i := int64(w); time.Now().Before(stop); i += int64(conns) {
				key := "load:" + strconv.Itoa(int(i*7919%int64(keys)))
				t0 := time.Now()
				var err error
				if setEvery > 0 && i%setEvery == 0 {
					if err = c.set(key, value); errors.Is(err, errNotStored) {
						err = nil
					}
				} else {
					_, err = c.get(key)
				}
				if err != nil {
					errs.Add(1)
					return
				}
				lat = append(lat, time.Since(t0))
				ops.Add(1)
			}
			lats[w] = lat
		}()
	}
	wg.Wait()
	all := slices.Concat(lats...)
	if len(all) == 0 {
		return mixResult{}, errors.New("no operation completed")
	}
	slices.Sort(all)
	us := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }
	return mixResult{
		opsPerSec: float64(ops.Load()) / duration.Seconds(),
		p50:       us(all[len(all)/2]),
		p99:       us(all[len(all)*99/100]),
		errors:    errs.Load(),
	}, nil
}

type herdResult struct {
	fills                        int64
	p99ms                        float64
	stored, notStored, setErrors int64
	firstErr                     error
}

func herd(addr string, n int, value []byte, fill time.Duration) (herdResult, error) {
	clients := make([]*client, n)
	for i := range clients {
		c, err := dial(addr)
		if err != nil {
			return herdResult{}, fmt.Errorf("dial %d: %w", i, err)
		}
		defer c.nc.Close()
		clients[i] = c
	}
	// setter returns the connection client i sets on, and its release.
	setter := func(i int) (*client, func()) { return clients[i], func() {} }
	if herdPooled {
		pool := make([]*client, herdPool)
		locks := make([]sync.Mutex, herdPool)
		for i := range pool {
			c, err := dial(addr)
			if err != nil {
				return herdResult{}, fmt.Errorf("dial pool %d: %w", i, err)
			}
			defer c.nc.Close()
			pool[i] = c
		}
		setter = func(i int) (*client, func()) {
			j := i % herdPool
			locks[j].Lock()
			return pool[j], locks[j].Unlock
		}
	}
	key := fmt.Sprintf("herd:%d:%d", n, time.Now().UnixNano())
	var fills, stored, notStored, setErrors atomic.Int64
	var firstErr atomic.Pointer[error]
	waits := make([]time.Duration, n)
	errs := make([]error, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			t0 := time.Now()
			found, err := c.get(key)
			waits[i] = time.Since(t0)
			if err != nil {
				errs[i] = err
				return
			}
			if found {
				return
			}
			fills.Add(1)
			time.Sleep(fill)
			sc, done := setter(i)
			err = sc.set(key, value)
			done()
			switch {
			case err == nil:
				stored.Add(1)
			case errors.Is(err, errNotStored):
				notStored.Add(1)
			case errors.Is(err, errSetServer):
				setErrors.Add(1)
				firstErr.CompareAndSwap(nil, &err)
			default:
				errs[i] = err // the connection failed
			}
		}()
	}
	close(start)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return herdResult{}, err
	}
	slices.Sort(waits)
	r := herdResult{
		fills:     fills.Load(),
		p99ms:     float64(waits[n*99/100].Microseconds()) / 1e3,
		stored:    stored.Load(),
		notStored: notStored.Load(),
		setErrors: setErrors.Load(),
	}
	if p := firstErr.Load(); p != nil {
		r.firstErr = *p
	}
	return r, nil
}
