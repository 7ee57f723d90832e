package lease

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// benchClient is a minimal text-protocol client for benchmarks.
type benchClient struct {
	nc  net.Conn
	br  *bufio.Reader
	bw  *bufio.Writer
	buf []byte
}

func newBenchClient(b *testing.B, addr string) *benchClient {
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	return &benchClient{nc: nc, br: bufio.NewReader(nc), bw: bufio.NewWriter(nc)}
}

// get returns whether key was found.
func (c *benchClient) get(key string) (bool, error) {
	c.bw.WriteString("get ")
	c.bw.WriteString(key)
	c.bw.WriteString("\r\n")
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
		if len(l) < 6 || string(l[:6]) != "VALUE " {
			return false, fmt.Errorf("unexpected %q", l)
		}
		// VALUE <key> <flags> <bytes>
		n := 0
		i := len(l) - 3
		for i >= 0 && l[i] != ' ' {
			i--
		}
		n, _ = strconv.Atoi(string(l[i+1 : len(l)-2]))
		if _, err := c.br.Discard(n + 2); err != nil {
			return false, err
		}
		found = true
	}
}

func (c *benchClient) set(key string, value []byte) error {
	c.buf = append(c.buf[:0], "set "...)
	c.buf = append(c.buf, key...)
	c.buf = append(c.buf, " 0 0 "...)
	c.buf = strconv.AppendInt(c.buf, int64(len(value)), 10)
	c.buf = append(c.buf, "\r\n"...)
	c.bw.Write(c.buf)
	c.bw.Write(value)
	c.bw.WriteString("\r\n")
	if err := c.bw.Flush(); err != nil {
		return err
	}
	l, err := c.br.ReadSlice('\n')
	if err != nil {
		return err
	}
	if string(l) != "STORED\r\n" {
		return fmt.Errorf("set: %q", l)
	}
	return nil
}

// runMix runs 9 gets to 1 set over 1000 preloaded keys of 100 bytes, from
// parallel connections to addr.
func runMix(b *testing.B, addr string) {
	value := make([]byte, 100)
	pre := newBenchClient(b, addr)
	for i := 0; i < 1000; i++ {
		if err := pre.set("bench:"+strconv.Itoa(i), value); err != nil {
			b.Fatal(err)
		}
	}
	pre.nc.Close()
	var next atomic.Int64
	b.SetParallelism(16)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		c := newBenchClient(b, addr)
		defer c.nc.Close()
		for pb.Next() {
			i := next.Add(1)
			key := "bench:" + strconv.Itoa(int(i%1000))
			var err error
			if i%10 == 0 {
				err = c.set(key, value)
			} else {
				var found bool
				found, err = c.get(key)
				if err == nil && !found {
					err = fmt.Errorf("miss on %s", key)
				}
			}
			if err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkProxy compares the same get/set mix straight to one memcached,
// through nutcracker and through the proxy (leases on, and off), over the
// same two servers.
func BenchmarkProxy(b *testing.B) {
	addrs, _ := memcachedAddrs(b, 2)
	nc := startNutcracker(b, addrs)
	b.Run("memcached", func(b *testing.B) { runMix(b, addrs[0]) })
	b.Run("nutcracker", func(b *testing.B) { runMix(b, nc) })
	b.Run("leaseproxy", func(b *testing.B) {
		p := startProxy(b, DefaultConfig(), addrs)
		runMix(b, p.Addr)
	})
	b.Run("leaseproxy-leases-off", func(b *testing.B) {
		cfg := DefaultConfig()
		cfg.Lease.TTL = 0
		p := startProxy(b, cfg, addrs)
		runMix(b, p.Addr)
	})
}

// BenchmarkHerd: N readers miss one key at once (in-process, on real
// memcached); a miss fills after 10ms. It reports the fills (target 1) and
// the readers' p99 latency.
func BenchmarkHerd(b *testing.B) {
	addrs, _ := memcachedAddrs(b, 2)
	for _, n := range []int{10, 100, 1000, 10000} {
		b.Run("N="+strconv.Itoa(n), func(b *testing.B) {
			cfg := DefaultConfig()
			cfg.Lease.Wait = 10 * time.Second
			p := startProxy(b, cfg, addrs)
			ctx := context.Background()
			var fills atomic.Int64
			lat := make([]time.Duration, 0, n*b.N)
			var mu sync.Mutex
			for it := 0; it < b.N; it++ {
				key := fmt.Sprintf("herd:%d:%d:%d", n, it, time.Now().UnixNano())
				var wg sync.WaitGroup
				start := make(chan struct{})
				for r := 0; r < n; r++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						<-start
						t0 := time.Now()
						res, err := p.l.get(ctx, key)
						if err != nil {
							b.Error(err)
							return
						}
						if !res.found {
							fills.Add(1)
							time.Sleep(10 * time.Millisecond)
							if _, err := p.l.fill(ctx, key, boundLease{}, false, []byte("v"), 0, 0); err != nil {
								b.Error(err)
							}
						}
						d := time.Since(t0)
						mu.Lock()
						lat = append(lat, d)
						mu.Unlock()
					}()
				}
				close(start)
				wg.Wait()
			}
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			b.ReportMetric(float64(fills.Load())/float64(b.N), "fills/herd")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
			b.ReportMetric(float64(p.Stats().LeasePolls)/float64(b.N), "polls/herd")
		})
	}
}
