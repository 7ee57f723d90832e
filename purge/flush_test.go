package purge_test

import (
	"context"
	"testing"
	"time"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/purge"
)

// TestFlushBatch: a batch announcing a flush (a lost slot) flushes every
// server of the pool once and is acked; a server that does not answer is
// marked, and flushed once it answers again, before any key is applied
// to it. Before this change the batch held no keys and was acked with no
// flush at all.
func TestFlushBatch(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	f := newFake(3)
	f.setDown(2, true)
	cfg := purge.Config{DC: "dc1", RetryMin: time.Millisecond, RetryMax: 5 * time.Millisecond, Progress: 5 * time.Millisecond,
		RecordAfter: 50 * time.Millisecond}
	p := newPurger(t, cfg, f, nil).WithBacklog(newMemBacklog())
	run(t, ctx, p)

	ack := newAck()
	handle(t, ctx, p, &bus.Batch{CommitLSN: 10, Flush: true}, ack)
	waitAck(t, ctx, ack, "the flush batch (server 2 marked, not waited for)")
	if f.flushed(0) != 1 || f.flushed(1) != 1 {
		t.Fatalf("flushes: server 0 %d, server 1 %d; want 1 each", f.flushed(0), f.flushed(1))
	}
	if f.flushed(2) != 0 {
		t.Fatalf("server 2 is down but was flushed %d times", f.flushed(2))
	}
	eventually(t, ctx, "server 2 shown flush-pending", func() bool { return p.Stats()[2].FlushPending })
	f.setDown(2, false)
	eventually(t, ctx, "server 2 flushed when it answers", func() bool { return f.flushed(2) == 1 })
	eventually(t, ctx, "server 2 usable again", func() bool { return !p.Stats()[2].FlushPending && !p.Stats()[2].Down })
}
