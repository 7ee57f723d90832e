package purge_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/purge"
)

// passedGate is a gate that has seen the replica past every commit: its
// Wait must not be needed.
type passedGate struct{ waits chan struct{} }

func (g passedGate) Wait(context.Context, uint64, uint64) error {
	select {
	case g.waits <- struct{}{}:
	default:
	}
	return errors.New("Wait called for a batch the gate had passed")
}
func (passedGate) Passed(uint64, uint64) bool { return true }

// TestPassedBatchQueuedByHandle: a batch whose commit the replica was
// already seen past has its keys queued for the servers by the time
// Handle returns, from the consumer's goroutine, not once the batch's own
// goroutine gets a core (a wait that was in every key's latency, p99 3-6
// ms on the loaded benchmark host). The workers are not running yet, so
// what Stats counts as pending is what Handle queued.
func TestPassedBatchQueuedByHandle(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f := newFake(2)
	gate := passedGate{waits: make(chan struct{}, 1)}
	p := newPurger(t, purge.Config{DC: "dc1"}, f, gate)
	var acks []*fakeAck
	want := int64(0)
	for i := 0; i < 50; i++ {
		a := newAck()
		acks = append(acks, a)
		b := &bus.Batch{CommitLSN: uint64(100 + i), EndLSN: uint64(101 + i), Keys: []string{fmt.Sprintf("a%d", i), fmt.Sprintf("s1:b%d", i)}}
		handle(t, ctx, p, b, a)
		want += 2
		got := int64(0)
		for _, s := range p.Stats() {
			got += s.Pending
		}
		if got != want {
			t.Fatalf("after Handle of batch %d: %d keys queued; want %d", i, got, want)
		}
	}
	run(t, ctx, p)
	for i, a := range acks {
		waitAck(t, ctx, a, fmt.Sprintf("batch %d", i))
	}
	select {
	case <-gate.waits:
		t.Error("the gate's Wait was called for a batch it had passed")
	default:
	}
	if got := f.count("s1:b49"); got != 1 {
		t.Errorf("s1:b49 applied %d times; want 1", got)
	}
}
