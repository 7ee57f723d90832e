package bus_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/testenv"
)

func TestBatchRoundTrip(t *testing.T) {
	b := &bus.Batch{Origin: "dc1", CommitLSN: 0x16B3748, EndLSN: 0x16B3780, CommitTime: time.Date(2026, 11, 21, 1, 2, 3, 0, time.UTC), Txs: 2, Final: true, Keys: []string{"a", "b"}}
	data, err := b.Encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := bus.Decode(data)
	if err != nil {
		t.Fatal(err)
	}
	if got.V != bus.Version || got.CommitLSN != b.CommitLSN || got.EndLSN != b.EndLSN || !got.CommitTime.Equal(b.CommitTime) || len(got.Keys) != 2 || got.Keys[1] != "b" || !got.Final || got.Txs != 2 {
		t.Errorf("got %+v; want %+v", got, b)
	}
	if b.MsgID() == (&bus.Batch{Origin: "dc1", CommitLSN: b.CommitLSN, EndLSN: b.EndLSN, Keys: []string{"a", "c"}}).MsgID() {
		t.Error("batches with different keys share a MsgID")
	}
}

func TestDecodeBad(t *testing.T) {
	for _, in := range []string{"", "{", `{"v":2,"commit_lsn":1}`, `{"v":1}`, `{"v":0,"commit_lsn":5}`, `[1,2]`, `{"v":1,"commit_lsn":"x"}`} {
		if _, err := bus.Decode([]byte(in)); !errors.Is(err, bus.ErrBadMessage) {
			t.Errorf("Decode(%q): got %v; want ErrBadMessage", in, err)
		}
	}
}

func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"v":1,"origin":"dc1","commit_lsn":5,"commit_time":"2026-11-21T00:00:00Z","final":true,"keys":["a"]}`))
	f.Add([]byte(`{"v":1,"commit_lsn":18446744073709551615,"keys":null}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := bus.Decode(data)
		if err == nil && (b.CommitLSN == 0 || b.V != 1) {
			t.Fatalf("accepted %q as %+v", data, b)
		}
		if err != nil && !errors.Is(err, bus.ErrBadMessage) {
			t.Fatalf("error %v does not wrap ErrBadMessage", err)
		}
	})
}

func connect(t *testing.T, url string) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatalf("connect %s: %v", url, err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// collector gathers every key a consumer delivers, acking each batch.
type collector struct {
	mu   sync.Mutex
	keys map[string]int
	msgs int
}

func (c *collector) handle(d *bus.Delivery) {
	c.mu.Lock()
	for _, k := range d.Batch.Keys {
		c.keys[k]++
	}
	c.msgs++
	c.mu.Unlock()
	_ = d.Ack(context.Background())
}

func (c *collector) has(want []string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, k := range want {
		if c.keys[k] == 0 {
			return false
		}
	}
	return true
}

// TestPublishConsumeAcrossDCs publishes transactions in dc1 (small ones
// grouped, a large one split into parts) and checks that both DCs' durable
// consumers get every key and that positions are reported in order, only
// after the acks.
// ackFunc is a bus.Ack that calls itself.
type ackFunc func()

func (f ackFunc) Done() { f() }

func TestPublishConsumeAcrossDCs(t *testing.T) {
	env := testenv.New(t, testenv.Options{NoPostgres: true, MemcachedPerDC: -1})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	log := zaptest.NewLogger(t)
	js1 := connect(t, env.DC("dc1").NATS.URL())
	js2 := connect(t, env.DC("dc2").NATS.URL())
	if _, err := bus.EnsureStream(ctx, js1, bus.StreamConfig{Placement: "dc1"}); err != nil {
		t.Fatal(err)
	}
	// Creating it again uses the existing stream.
	if _, err := bus.EnsureStream(ctx, js2, bus.StreamConfig{Placement: "dc2"}); err != nil {
		t.Fatal(err)
	}

	var mu sync.Mutex
	var durable []uint64
	ack := func(lsn uint64) bus.Ack {
		return ackFunc(func() {
			mu.Lock()
			durable = append(durable, lsn)
			mu.Unlock()
		})
	}
	cfg := bus.DefaultPublisherConfig()
	cfg.Origin = "dc1"
	cfg.MaxBatchKeys = 100
	pub, err := bus.NewPublisher(js1, cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	runDone := make(chan error, 1)
	go func() { runDone <- pub.Run(ctx) }()

	var want []string
	lsn := uint64(1000)
	// 50 small transactions of 3 keys, then one of 1050 keys, then an
	// empty one (no keys, still a position).
	for tx := 0; tx < 50; tx++ {
		pub.BeginTx(lsn, time.Now())
		ks := []string{fmt.Sprintf("post:%d", tx), fmt.Sprintf("user:%d", tx%7), "hot"}
		want = append(want, ks...)
		if err := pub.Add(ctx, ks...); err != nil {
			t.Fatal(err)
		}
		if err := pub.EndTx(ctx, lsn+10, ack(lsn+10)); err != nil {
			t.Fatal(err)
		}
		lsn += 100
	}
	pub.BeginTx(lsn, time.Now())
	for i := 0; i < 1050; i++ {
		k := fmt.Sprintf("big:%d", i)
		want = append(want, k)
		if err := pub.Add(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	if err := pub.EndTx(ctx, lsn+10, ack(lsn+10)); err != nil {
		t.Fatal(err)
	}
	lsn += 100
	pub.BeginTx(lsn, time.Now())
	if err := pub.EndTx(ctx, lsn+10, ack(lsn+10)); err != nil {
		t.Fatal(err)
	}
	last := lsn + 10
	if err := pub.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-runDone; err != nil {
		t.Fatal(err)
	}
	if err := pub.Add(ctx, "late"); !errors.Is(err, bus.ErrClosed) {
		t.Errorf("Add after Drain: got %v; want ErrClosed", err)
	}
	mu.Lock()
	if len(durable) != 52 || durable[len(durable)-1] != last {
		t.Errorf("got acks %v; want 52 (one per transaction), the last %d", durable, last)
	}
	for i := 1; i < len(durable); i++ {
		if durable[i] <= durable[i-1] {
			t.Errorf("durable positions not increasing: %v", durable)
			break
		}
	}
	mu.Unlock()
	st := pub.Stats()
	if st.Batches < 11 { // 1050 keys in parts of 100
		t.Errorf("got %d batches; want >= 11", st.Batches)
	}

	for _, dc := range []struct {
		name string
		js   jetstream.JetStream
	}{{"dc1", js1}, {"dc2", js2}} {
		col := &collector{keys: map[string]int{}}
		cons, err := bus.NewConsumer(dc.js, bus.ConsumerConfig{DC: dc.name}, log, nil)
		if err != nil {
			t.Fatal(err)
		}
		cctx, ccancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { _ = cons.Run(cctx, col.handle); close(done) }()
		for !col.has(want) && ctx.Err() == nil {
			time.Sleep(20 * time.Millisecond)
		}
		ccancel()
		<-done
		if !col.has(want) {
			t.Fatalf("%s: not every key delivered", dc.name)
		}
	}
}
