package tail

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/batcher"
	"github.com/pgcache/pgcache/wal"
)

// downFlusher is a counters database that cannot be reached: a primary
// that is restarting.
type downFlusher struct{}

var errDown = errors.New("connect: connection refused")

func (downFlusher) Load(context.Context, []string) (map[string]batcher.Pos, error) {
	return nil, errDown
}

func (downFlusher) Flush(context.Context, *batcher.Batch) error { return errDown }

// TestCounterHandlerRetry: while the primary cannot be reached, the
// counter handler in the WAL stream gives up after its wait with
// wal.ErrRetry, reading checkpoints or waiting for room in the batcher,
// so that the stream lets go of the replication connection (a primary
// shutting down waits for it) instead of waiting with it open.
func TestCounterHandlerRetry(t *testing.T) {
	ctx := context.Background()
	tx := wal.TxInfo{Xid: 7, CommitLSN: 100, EndLSN: 108}

	b, err := batcher.New(batcher.Config{MaxPending: 1, Interval: time.Hour}, downFlusher{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	h := &counterHandler{b: b, log: zaptest.NewLogger(t), wait: 50 * time.Millisecond}
	if err := h.Begin(ctx, tx); !errors.Is(err, wal.ErrRetry) {
		t.Fatalf("Begin with checkpoints unreadable: got %v; want wal.ErrRetry", err)
	}

	// Checkpoints read, then the flush cannot go through: the pending
	// group fills MaxPending, and the next input waits for room.
	fl := &loadOnce{}
	b, err = batcher.New(batcher.Config{MaxPending: 1, Interval: time.Millisecond, RetryMin: time.Hour, RetryMax: time.Hour}, fl, nil)
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() { _ = b.Run(rctx) }()
	h = &counterHandler{b: b, log: zaptest.NewLogger(t), wait: 50 * time.Millisecond}
	if err := h.Begin(ctx, tx); err != nil {
		t.Fatalf("Begin: %v", err)
	}
	var got error
	for ord := uint64(1); ord <= 3 && got == nil; ord++ {
		got = h.add(ctx, batcher.Input{Source: WALSource, Pos: batcher.Pos{Major: 100, Minor: ord},
			Deltas: []batcher.Delta{{Counter: "likes", Group: fmt.Sprint(ord), Key: "likes:" + fmt.Sprint(ord), N: 1}}})
	}
	if !errors.Is(got, wal.ErrRetry) || !errors.Is(got, batcher.ErrBusy) {
		t.Fatalf("add with the flush failing: got %v; want wal.ErrRetry wrapping batcher.ErrBusy", got)
	}
}

// loadOnce reads empty checkpoints, then fails every flush.
type loadOnce struct{}

func (*loadOnce) Load(context.Context, []string) (map[string]batcher.Pos, error) {
	return map[string]batcher.Pos{}, nil
}

func (*loadOnce) Flush(context.Context, *batcher.Batch) error { return errDown }
