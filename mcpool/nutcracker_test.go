package mcpool

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/bradfitz/gomemcache/memcache"
	"github.com/pgcache/pgcache/testenv"
)

// runProcess starts bin with args for the test, logging to dir/name.log,
// waits until addr accepts connections and kills it when the test ends.
func runProcess(t *testing.T, dir, name, addr, bin string, args ...string) {
	t.Helper()
	logPath := filepath.Join(dir, name+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatalf("%s log: %v", name, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start %s (%s): %v", name, bin, err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(exited)
	}()
	t.Cleanup(func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		select {
		case <-exited:
			log, _ := os.ReadFile(logPath)
			t.Fatalf("%s exited before listening on %s: %s", name, addr, log)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(logPath)
			t.Fatalf("%s not listening on %s after 10s: %v; log: %s", name, addr, err, log)
		}
	}
}

// startNutcracker runs nutcracker over servers; see testenv.NewNutcracker.
func startNutcracker(t *testing.T, hash, distribution string, servers []string) string {
	t.Helper()
	return testenv.NewNutcracker(t, hash, distribution, servers)
}

// placementKeys are the keys the placement tests store: plain, long,
// binary-ish and unicode, 10k in all.
func placementKeys() []string {
	keys := make([]string, 0, 10000)
	for i := 0; len(keys) < 10000; i++ {
		switch i % 4 {
		case 0:
			keys = append(keys, "key:"+strconv.Itoa(i))
		case 1:
			keys = append(keys, fmt.Sprintf("user_posts:%d:page:%d", i*7919, i%13))
		case 2:
			keys = append(keys, strings.Repeat("x", 1+i%200)+strconv.Itoa(i))
		default:
			keys = append(keys, "é€"+strconv.Itoa(i))
		}
	}
	return keys
}

// setThrough stores every key (its value the key) through a text-protocol
// proxy at addr.
func setThrough(t *testing.T, addr string, keys []string) {
	t.Helper()
	mc := memcache.New(addr)
	mc.Timeout = 5 * time.Second
	mc.MaxIdleConns = 8
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < len(keys); i += 8 {
				if err := mc.Set(&memcache.Item{Key: keys[i], Value: []byte(keys[i])}); err != nil {
					errs <- fmt.Errorf("set %q through %s: %w", keys[i], addr, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// holders asks every server directly which keys it holds and returns, per
// key, the index of the one server that holds it. It fails the test when
// a key is on no server or on more than one.
func holders(t *testing.T, addrs []string, keys []string) []int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	where := make([][]int, len(keys))
	var mu sync.Mutex
	for si, addr := range addrs {
		c, err := Dial(ctx, addr, DefaultConnConfig())
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for w := 0; w < 16; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < len(keys); i += 16 {
					resp, err := c.MetaGet(ctx, keys[i], "v")
					if err != nil {
						t.Errorf("mg %q on %s: %v", keys[i], addr, err)
						return
					}
					if resp.Status == StatusVA {
						if string(resp.Value) != keys[i] {
							t.Errorf("mg %q on %s: got value %q; want the key", keys[i], addr, resp.Value)
						}
						mu.Lock()
						where[i] = append(where[i], si)
						mu.Unlock()
					}
				}
			}()
		}
		wg.Wait()
		c.Close()
	}
	out := make([]int, len(keys))
	for i, w := range where {
		if len(w) != 1 {
			t.Fatalf("key %q is on servers %v; want exactly one", keys[i], w)
		}
		out[i] = w[0]
	}
	return out
}

// TestKetamaMatchesNutcracker stores 10k keys through a real nutcracker
// (distribution: ketama, hash: md5) and checks that Ring puts each key on
// the server that nutcracker chose.
func TestKetamaMatchesNutcracker(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 3)
	addrs := []string{mcs[0].Addr, mcs[1].Addr, mcs[2].Addr}
	tests := []struct {
		name  string
		specs []string
	}{
		{"host:port", []string{addrs[0] + ":1", addrs[1] + ":1", addrs[2] + ":1"}},
		{"names and weights", []string{addrs[0] + ":1 alpha", addrs[1] + ":3 beta", addrs[2] + ":2 gamma"}},
		{"weights", []string{addrs[0] + ":5", addrs[1] + ":1", addrs[2] + ":2"}},
	}
	keys := placementKeys()
	for ti, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Each subtest gets fresh keys, so earlier runs do not count.
			prefixed := make([]string, len(keys))
			for i, k := range keys {
				prefixed[i] = strconv.Itoa(ti) + k
				if len(prefixed[i]) > MaxKeyLen {
					prefixed[i] = prefixed[i][:MaxKeyLen]
				}
			}
			proxy := startNutcracker(t, "md5", "ketama", tt.specs)
			setThrough(t, proxy, prefixed)
			got := holders(t, addrs, prefixed)
			ring, err := NewRing(HashKetama, tt.specs)
			if err != nil {
				t.Fatal(err)
			}
			counts := make([]int, len(addrs))
			for i, k := range prefixed {
				if p := ring.Pick(k); p != got[i] {
					t.Fatalf("key %q: Pick got server %d; nutcracker put it on %d", k, p, got[i])
				}
				counts[got[i]]++
			}
			t.Logf("keys per server: %v", counts)
		})
	}
}

// TestKetamaMatchesNutcrackerDefaultPort covers servers on port 11211,
// whose points twemproxy names "host-N" without the port. It runs its own
// memcacheds on 127.0.0.2-4:11211, since testenv uses random ports.
func TestKetamaMatchesNutcrackerDefaultPort(t *testing.T) {
	dir := t.TempDir()
	var specs, addrs []string
	for i := 2; i <= 4; i++ {
		host := "127.0.0." + strconv.Itoa(i)
		addr := host + ":11211"
		runProcess(t, dir, "memcached-"+host, addr, "/usr/bin/memcached",
			"-u", "root", "-l", host, "-p", "11211", "-U", "0", "-m", "64", "-t", "1")
		addrs = append(addrs, addr)
		specs = append(specs, addr+":1")
	}
	keys := placementKeys()
	proxy := startNutcracker(t, "md5", "ketama", specs)
	setThrough(t, proxy, keys)
	got := holders(t, addrs, keys)
	ring, err := NewRing(HashKetama, specs)
	if err != nil {
		t.Fatal(err)
	}
	if name := ring.Server(0).Name; name != "127.0.0.2" {
		t.Fatalf("point name got %q; want %q", name, "127.0.0.2")
	}
	for i, k := range keys {
		if p := ring.Pick(k); p != got[i] {
			t.Fatalf("key %q: Pick got server %d; nutcracker put it on %d", k, p, got[i])
		}
	}
	// The rule matters: naming the points "host:11211" places keys elsewhere.
	named := make([]string, len(addrs))
	for i, a := range addrs {
		named[i] = a + ":1 " + a
	}
	wrong, err := NewRing(HashKetama, named)
	if err != nil {
		t.Fatal(err)
	}
	moved := 0
	for i, k := range keys {
		if wrong.Pick(k) != got[i] {
			moved++
		}
	}
	if moved == 0 {
		t.Fatalf("points named host:11211 place every key as nutcracker does; the test cannot tell the names apart")
	}
}
