package bus_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/testenv"
)

// TestKeyBytes: KeyBytes is exactly what a key adds to an encoded batch,
// escapes included.
func TestKeyBytes(t *testing.T) {
	alphabet := []string{"a", "<", ">", "&", "\"", "\\", "\n", "\t", "\x01", "\x7f", "é", "\u2028", "ключ"}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 500; i++ {
		var keys []string
		sum := 0
		for j := 0; j < 1+rng.IntN(20); j++ {
			var sb strings.Builder
			for k := 0; k < 1+rng.IntN(40); k++ {
				sb.WriteString(alphabet[rng.IntN(len(alphabet))])
			}
			keys = append(keys, sb.String())
			sum += bus.KeyBytes(sb.String())
		}
		empty, err := (&bus.Batch{Origin: "dc1", CommitLSN: 1, Keys: []string{}}).Encode()
		if err != nil {
			t.Fatal(err)
		}
		full, err := (&bus.Batch{Origin: "dc1", CommitLSN: 1, Keys: keys}).Encode()
		if err != nil {
			t.Fatal(err)
		}
		// The first key has no comma before it.
		if got, want := len(full)-len(empty), sum-1; got != want {
			t.Fatalf("keys %q: encoded %d bytes; KeyBytes summed to %d", keys, got, want)
		}
	}
}

// TestOversizedTransaction: a transaction whose keys, encoded, are far
// over the server's max payload (1,000 keys of 245 '<', 1.48 MB with
// HTML escaping, and a 64 KB max_payload here) is split into messages
// under the limit, every key arrives, and its Ack is done: the tail never
// retries a message the server refuses.
func TestOversizedTransaction(t *testing.T) {
	env := testenv.New(t, testenv.Options{NoPostgres: true, MemcachedPerDC: -1})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	js := connect(t, env.DC("dc1").NATS.URL())
	limit := int(js.Conn().MaxPayload())
	if _, err := bus.EnsureStream(ctx, js, bus.StreamConfig{Name: "BIG", Subject: "big.inv"}); err != nil {
		t.Fatal(err)
	}
	cfg := bus.DefaultPublisherConfig()
	cfg.Origin, cfg.Stream.Name, cfg.Stream.Subject = "dc1", "BIG", "big.inv"
	cfg.MaxBatchKeys = 100000
	cfg.MaxBatchBytes = 64 << 10
	pub, err := bus.NewPublisher(js, cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = pub.Run(ctx) }()
	var want []string
	pub.BeginTx(100, time.Now())
	for i := 0; i < 1000; i++ {
		k := fmt.Sprintf("%04d%s", i, strings.Repeat("<", 241))
		want = append(want, k)
		if err := pub.Add(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	acked := make(chan struct{})
	if err := pub.EndTx(ctx, 200, ackFunc(func() { close(acked) })); err != nil {
		t.Fatal(err)
	}
	select {
	case <-acked:
	case <-ctx.Done():
		t.Fatalf("the oversized transaction was never acknowledged (limit %d bytes)", limit)
	}
	st, err := js.Stream(ctx, "BIG")
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for seq := uint64(1); seq <= info.State.LastSeq; seq++ {
		m, err := st.GetMsg(ctx, seq)
		if err != nil {
			t.Fatal(err)
		}
		if len(m.Data) > cfg.MaxBatchBytes {
			t.Errorf("message %d: %d bytes; want at most %d", seq, len(m.Data), cfg.MaxBatchBytes)
		}
		b, err := bus.Decode(m.Data)
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range b.Keys {
			got[k] = true
		}
	}
	if info.State.Msgs < 4 {
		t.Errorf("got %d messages; want the 1,000 keys (about 250 KB) split into at least 4", info.State.Msgs)
	}
	for _, k := range want {
		if !got[k] {
			t.Fatalf("key %.12q... not on the stream", k)
		}
	}
	if st := pub.Stats(); st.Retries != 0 {
		t.Errorf("got %d retries; want none", st.Retries)
	}
	var _ jetstream.JetStream = js
}
