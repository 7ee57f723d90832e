package lease

import (
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bradfitz/gomemcache/memcache"

	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/testenv"
)

// startNutcracker runs nutcracker (twemproxy) over servers with ketama
// and md5 and returns its address.
func startNutcracker(t testing.TB, servers []string) string {
	t.Helper()
	specs := make([]string, len(servers))
	for i, s := range servers {
		specs[i] = s + ":1"
	}
	return testenv.NewNutcracker(t, "md5", "ketama", specs)
}

func placementKeys(n int) []string {
	keys := make([]string, n)
	for i := range keys {
		switch i % 3 {
		case 0:
			keys[i] = "post:" + strconv.Itoa(i)
		case 1:
			keys[i] = fmt.Sprintf("user_posts:%d:page:%d", i*7919, i%13)
		default:
			keys[i] = strings.Repeat("x", 1+i%200) + strconv.Itoa(i)
		}
	}
	return keys
}

// setAll stores every key (its value the key) through mc, 8 at a time.
func setAll(t *testing.T, mc *memcache.Client, keys []string) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < len(keys); i += 8 {
				if err := mc.Set(&memcache.Item{Key: keys[i], Value: []byte(keys[i])}); err != nil {
					errs <- fmt.Errorf("set %q: %w", keys[i], err)
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

// checkAll reads every key through mc and fails on a miss: a key stored
// through a proxy that places it elsewhere is not found.
func checkAll(t *testing.T, mc *memcache.Client, keys []string) {
	t.Helper()
	missing := 0
	for i := 0; i < len(keys); i += 100 {
		batch := keys[i:min(i+100, len(keys))]
		got, err := mc.GetMulti(batch)
		if err != nil {
			t.Fatalf("get: %v", err)
		}
		for _, k := range batch {
			if it, ok := got[k]; !ok || string(it.Value) != k {
				missing++
			}
		}
	}
	if missing != 0 {
		t.Errorf("got %d of %d keys missing or wrong; want all placed alike", missing, len(keys))
	}
}

// TestPlacementKetamaNutcracker: 10k keys stored through leaseproxy with
// ketama are all found through nutcracker (ketama, md5) on the same
// servers.
func TestPlacementKetamaNutcracker(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 3)
	p := startProxy(t, testConfig(), addrs)
	keys := placementKeys(10000)
	lp := memcache.New(p.Addr)
	lp.Timeout, lp.MaxIdleConns = 5*time.Second, 8
	setAll(t, lp, keys)
	nc := memcache.New(startNutcracker(t, addrs))
	nc.Timeout = 5 * time.Second
	checkAll(t, nc, keys)
}

// TestPlacementModulaGomemcache: with modula, leaseproxy places keys where
// gomemcache's ServerList does.
func TestPlacementModulaGomemcache(t *testing.T) {
	addrs, _ := memcachedAddrs(t, 3)
	pm := func() *proxy {
		cfg := testConfig()
		pcfg := mcpool.DefaultConfig()
		pcfg.Servers, pcfg.Hash = addrs, mcpool.HashModula
		pool, err := mcpool.New(pcfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = pool.Close() })
		return startProxyOn(t, cfg, NewPoolBackend(pool))
	}()
	keys := placementKeys(10000)
	lp := memcache.New(pm.Addr)
	lp.Timeout, lp.MaxIdleConns = 5*time.Second, 8
	setAll(t, lp, keys)
	direct := memcache.New(addrs...)
	direct.Timeout = 5 * time.Second
	checkAll(t, direct, keys)
}
