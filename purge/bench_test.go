package purge_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/purge"
	"github.com/pgcache/pgcache/testenv"
)

// chanAck is an Acker that reports to a channel.
type chanAck chan struct{}

func (a chanAck) Ack(context.Context) error { a <- struct{}{}; return nil }
func (a chanAck) InProgress() error         { return nil }

// BenchmarkPurger hands batches of 10 keys (as 5 rows with 2 keys each
// make) to a purger over two real memcached servers, as fast as it takes
// them, and reports keys applied per second. No gate, no JetStream: the
// purger and the pool alone.
func BenchmarkPurger(b *testing.B) {
	mcs := testenv.NewMemcacheds(b, 2)
	addrs := []string{mcs[0].Addr, mcs[1].Addr}
	cfg := mcpool.DefaultConfig()
	cfg.Servers = addrs
	pool, err := mcpool.New(cfg, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer pool.Close()
	p, err := purge.New(purge.Config{DC: "dc1"}, pool, nil, nil, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	defer func() {
		p.Close()
		<-done
	}()
	const perBatch = 10
	keys := make([]string, 100000)
	for i := range keys {
		keys[i] = fmt.Sprintf("item:%d", i)
	}
	acks := make(chanAck, 4096)
	b.ResetTimer()
	begin := time.Now()
	go func() {
		for i := 0; i < b.N; i++ {
			off := (i * perBatch) % (len(keys) - perBatch)
			if err := p.Handle(ctx, &bus.Batch{CommitLSN: uint64(i + 1), Keys: keys[off : off+perBatch]}, acks); err != nil {
				b.Error(err)
				return
			}
		}
	}()
	for i := 0; i < b.N; i++ {
		<-acks
	}
	b.ReportMetric(float64(b.N*perBatch)/time.Since(begin).Seconds(), "keys/s")
}
