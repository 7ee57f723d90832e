package mcpool

import (
	"context"
	"errors"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bradfitz/gomemcache/memcache"
	"github.com/pgcache/pgcache/testenv"
)

const benchKeys = 10000

func benchSetup(b *testing.B) (*Pool, *memcache.Client, []string) {
	b.Helper()
	mcs := testenv.NewMemcacheds(b, 3)
	servers := addrsOf(mcs)
	pool := newTestPool(b, servers, func(c *Config) { c.Hash = HashModula })
	mc := memcache.New(servers...) // same placement: modula
	mc.MaxIdleConns = 64
	mc.Timeout = 5 * time.Second
	keys := make([]string, benchKeys)
	value := make([]byte, 100)
	ctx := context.Background()
	for i := range keys {
		keys[i] = "bench:post:" + strconv.Itoa(i)
	}
	for i, err := range func() []error {
		errs := make([]error, len(keys))
		for i, k := range keys {
			_, errs[i] = pool.MetaSet(ctx, k, value, SetOptions{})
		}
		return errs
	}() {
		if err != nil {
			b.Fatalf("set %s: %v", keys[i], err)
		}
	}
	return pool, mc, keys
}

// BenchmarkPoolGet reads 100-byte values from 3 memcacheds with 16
// goroutines per core: mcpool's pipelined mg against gomemcache's get.
func BenchmarkPoolGet(b *testing.B) {
	pool, mc, keys := benchSetup(b)
	ctx := context.Background()
	b.Run("mcpool", func(b *testing.B) {
		var n atomic.Uint64
		b.SetParallelism(16)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				k := keys[n.Add(1)%benchKeys]
				r, err := pool.MetaGet(ctx, k, "v", "f")
				if err != nil || r.Status != StatusVA {
					b.Errorf("mg %s: %+v, %v", k, r, err)
					return
				}
			}
		})
	})
	b.Run("gomemcache", func(b *testing.B) {
		var n atomic.Uint64
		b.SetParallelism(16)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				k := keys[n.Add(1)%benchKeys]
				if _, err := mc.Get(k); err != nil {
					b.Errorf("get %s: %v", k, err)
					return
				}
			}
		})
	})
}

// BenchmarkPoolDelete deletes keys (mostly absent after the first pass)
// with 16 goroutines per core, and with DeleteMulti in batches of 100
// from one goroutine, as purge does.
func BenchmarkPoolDelete(b *testing.B) {
	pool, mc, keys := benchSetup(b)
	ctx := context.Background()
	b.Run("mcpool", func(b *testing.B) {
		var n atomic.Uint64
		b.SetParallelism(16)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				k := keys[n.Add(1)%benchKeys]
				if err := pool.Delete(ctx, k); err != nil {
					b.Errorf("delete %s: %v", k, err)
					return
				}
			}
		})
	})
	b.Run("mcpool-multi100", func(b *testing.B) {
		batch := make([]string, 100)
		for i := 0; i < b.N; i += len(batch) {
			for j := range batch {
				batch[j] = keys[(i+j)%benchKeys]
			}
			for _, err := range pool.DeleteMulti(ctx, batch) {
				if err != nil {
					b.Fatal(err)
				}
			}
		}
	})
	b.Run("gomemcache", func(b *testing.B) {
		var n atomic.Uint64
		b.SetParallelism(16)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				k := keys[n.Add(1)%benchKeys]
				if err := mc.Delete(k); err != nil && !errors.Is(err, memcache.ErrCacheMiss) {
					b.Errorf("delete %s: %v", k, err)
					return
				}
			}
		})
	})
}
