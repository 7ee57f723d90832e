package batcher

import (
	"context"
	"fmt"
	"time"
)

func ExampleBatcher() {
	fl := newMem() // in production: NewPG(PGConfig{DSN: ..., MessagePrefix: "invalidate"})
	b, err := New(Config{MaxPending: 1000, Interval: time.Hour}, fl, nil)
	if err != nil {
		panic(err)
	}
	ctx := context.Background()
	if err := b.Load(ctx, "wal"); err != nil {
		panic(err)
	}
	done := make(chan error)
	go func() { done <- b.Run(ctx) }()

	// Three likes of post 42 in two transactions, one unlike.
	like := Delta{Counter: "post_likes", Group: `["42"]`, Key: "post:42:likes", N: 1}
	unlike := like
	unlike.N = -1
	for _, in := range []Input{
		{Source: "wal", Pos: Pos{100, 1}, Deltas: []Delta{like}},
		{Source: "wal", Pos: Pos{100, 2}, Deltas: []Delta{like}},
		{Source: "wal", Pos: Pos{120, 0}}, // the transaction's end
		{Source: "wal", Pos: Pos{130, 1}, Deltas: []Delta{like, unlike}},
		{Source: "wal", Pos: Pos{140, 0}, Ack: ackFunc(func() { fmt.Println("durable: wal 140/0") })},
		{Source: "wal", Pos: Pos{100, 2}, Deltas: []Delta{like}}, // redelivered: skipped
	} {
		if _, err := b.Add(ctx, in); err != nil {
			panic(err)
		}
	}
	if err := b.Drain(ctx); err != nil {
		panic(err)
	}
	<-done
	fmt.Println("stored:", fl.count("post_likes", `["42"]`), "in", fl.flushes, "flush")
	// Output:
	// durable: wal 140/0
	// stored: 2 in 1 flush
}
