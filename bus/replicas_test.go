package bus_test

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/testenv"
)

// replicasAcks records when each transaction's Ack was done.
type replicasAcks struct {
	mu      sync.Mutex
	at      []time.Time // in the order the Acks were done
	done    map[int]bool
	ended   map[int]time.Time // when each transaction's EndTx returned
	worst   time.Duration     // the longest from EndTx to its Ack
	worstTx int
}

func (r *replicasAcks) end(tx int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ended[tx] = time.Now()
}

type replicasAck struct {
	tx   int
	acks *replicasAcks
}

func (a replicasAck) Done() {
	a.acks.mu.Lock()
	defer a.acks.mu.Unlock()
	now := time.Now()
	a.acks.at = append(a.acks.at, now)
	a.acks.done[a.tx] = true
	// An Ack done before EndTx returned has no end time yet: it counts 0.
	if e, ok := a.acks.ended[a.tx]; ok && now.Sub(e) > a.acks.worst {
		a.acks.worst, a.acks.worstTx = now.Sub(e), a.tx
	}
}

// stall is the longest gap between consecutive Acks that ends after
// kill, and the time from kill to that gap's end: when publishing
// resumed. (Acks done just after the kill are of batches JetStream had
// stored before it.)
// The gaps of more than 500ms after the kill are listed too.
func (r *replicasAcks) stall(kill time.Time) (gap, resumed time.Duration, acked int, gaps []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	at := append([]time.Time(nil), r.at...)
	sort.Slice(at, func(i, j int) bool { return at[i].Before(at[j]) })
	resumed = -1
	for i := 1; i < len(at); i++ {
		d := at[i].Sub(at[i-1])
		if !at[i].After(kill) {
			continue
		}
		if d > gap {
			gap, resumed = d, at[i].Sub(kill)
		}
		if d > 500*time.Millisecond {
			gaps = append(gaps, fmt.Sprintf("%s from kill+%s", d.Round(time.Millisecond), at[i-1].Sub(kill).Round(time.Millisecond)))
		}
	}
	return gap, resumed, len(r.done), gaps
}

func replicasKeys(tx int) []string {
	return []string{fmt.Sprintf("r3:%d:a", tx), fmt.Sprintf("r3:%d:b", tx), fmt.Sprintf("r3:%d:c", tx)}
}

// streamLeader is the stream's leader server name, or "" while it has none.
func streamLeader(ctx context.Context, js jetstream.JetStream, stream string) (leader string, current int) {
	actx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	s, err := js.Stream(actx, stream)
	if err != nil {
		return "", 0
	}
	info, err := s.Info(actx)
	if err != nil || info.Cluster == nil || info.Cluster.Leader == "" {
		return "", 0
	}
	current = 1
	for _, r := range info.Cluster.Replicas {
		if r.Current && !r.Offline {
			current++
		}
	}
	return info.Cluster.Leader, current
}

// TestPublisherR3LeaderKill publishes 500 transactions a second through a
// Publisher into an R3 stream on a three-server cluster, kills -9 the
// stream leader's server mid-run and restarts it after the run, once
// everything was acked by the two servers left. Every transaction whose
// Ack was done must have all its keys in the stream afterwards, and
// publishing must resume without the killed server. The stall is logged
// three ways: the longest gap between Acks, when publishing resumed after
// the kill, and the longest any transaction waited from EndTx to its Ack
// (which also counts batches lost in the election and sent again one
// after another). Each is bounded only by 30 s, which tells a stall from
// a busy machine.
func TestPublisherR3LeaderKill(t *testing.T) {
	const (
		rate     = 500 // transactions a second
		killAt   = 4 * time.Second
		runFor   = 25 * time.Second // the killed server stays down until the end
		stream   = "R3INV"
		subject  = "r3.invalidations"
		maxStall = 30 * time.Second
	)
	env := testenv.New(t, testenv.Options{DCs: 1, NoPostgres: true, MemcachedPerDC: -1, NATSPerDC: 3})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dc := env.DCs[0]
	nc, err := nats.Connect(dc.NATSURL(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc) // as bus.Connect does
	if err != nil {
		t.Fatal(err)
	}
	cfg := bus.DefaultPublisherConfig()
	cfg.Origin = dc.Name
	cfg.Stream = bus.StreamConfig{Name: stream, Subject: subject, Placement: dc.Name, Replicas: 3}
	if _, err := bus.EnsureStream(ctx, js, cfg.Stream); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 30*time.Second, "3 current replicas", func() bool { _, n := streamLeader(ctx, js, stream); return n == 3 })
	pub, err := bus.NewPublisher(js, cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	runCtx, stopRun := context.WithCancel(ctx)
	defer stopRun()
	runErr := make(chan error, 1)
	go func() { runErr <- pub.Run(runCtx) }()

	acks := &replicasAcks{done: map[int]bool{}, ended: map[int]time.Time{}}
	var (
		victim     *testenv.NATS
		victimName string
		killed     time.Time
		faultErr   = make(chan error, 1)
	)
	start := time.Now()
	// The kill runs beside the producer, at a fixed time of the run.
	go func() {
		faultErr <- func() error {
			time.Sleep(time.Until(start.Add(killAt)))
			leader, _ := streamLeader(ctx, js, stream)
			victim = env.NATSServer(leader)
			if victim == nil {
				return fmt.Errorf("leader %q is no server of the environment", leader)
			}
			victimName = leader
			killed = time.Now()
			return victim.Kill()
		}()
	}()

	txs := 0
	for at := start; time.Since(start) < runFor; at = at.Add(time.Second / rate) {
		if d := time.Until(at); d > 0 {
			time.Sleep(d)
		}
		lsn := uint64(txs+1) * 100
		pub.BeginTx(lsn, time.Now())
		if err := pub.Add(ctx, replicasKeys(txs)...); err != nil {
			t.Fatalf("tx %d: add: %v", txs, err)
		}
		if err := pub.EndTx(ctx, lsn+10, replicasAck{tx: txs, acks: acks}); err != nil {
			t.Fatalf("tx %d: end: %v", txs, err)
		}
		acks.end(txs)
		txs++
	}
	produced := time.Since(start)
	if err := <-faultErr; err != nil {
		t.Fatal(err)
	}
	// Everything is acked by the two servers left.
	if err := pub.Drain(ctx); err != nil {
		t.Fatalf("drain: %v", err)
	}
	if err := <-runErr; err != nil && !errors.Is(err, context.Canceled) {
		t.Fatalf("run: %v", err)
	}
	down := time.Since(killed)
	if victim.Running() {
		t.Fatalf("%s runs again before its restart", victimName)
	}
	gap, resumed, acked, gaps := acks.stall(killed)
	t.Logf("%d transactions in %s (%.0f/s), %d acked; leader %s killed at +%s, down for %s",
		txs, produced.Round(time.Millisecond), float64(txs)/produced.Seconds(), acked, victimName,
		killed.Sub(start).Round(time.Millisecond), down.Round(time.Millisecond))
	t.Logf("publish stall: longest gap between acks %s, publishing resumed %s after the kill; %d batches republished (ack timeout %s)",
		gap.Round(time.Millisecond), resumed.Round(time.Millisecond), pub.Stats().Retries, cfg.AckTimeout)
	t.Logf("gaps between acks over 500ms after the kill: %v", gaps)
	acks.mu.Lock()
	worst, worstTx := acks.worst, acks.worstTx
	acks.mu.Unlock()
	t.Logf("longest from a transaction's EndTx to its Ack: %s (transaction %d, ended at +%s)",
		worst.Round(time.Millisecond), worstTx, acks.ended[worstTx].Sub(start).Round(time.Millisecond))
	if acked != txs {
		t.Errorf("got %d transactions acked after Drain; want %d", acked, txs)
	}
	// Publishing resumed on the two servers left, before the killed one
	// came back (an R1 stream would wait for it).
	if resumed < 0 || resumed > maxStall || gap > maxStall || worst > maxStall {
		t.Errorf("publishing stalled: longest gap %s, resumed %s after the kill, a transaction waited %s for its ack; want each under %s",
			gap, resumed, worst, maxStall)
	}
	if err := victim.Start(); err != nil {
		t.Fatal(err)
	}

	// The restarted server catches up; then read the whole stream.
	back := time.Now()
	testenv.Eventually(t, 60*time.Second, victimName+" current again", func() bool { _, n := streamLeader(ctx, js, stream); return n == 3 })
	t.Logf("%s restarted and current again in %s", victimName, time.Since(back).Round(time.Millisecond))
	// Just after a server rejoins, the read's consumer may be moved or
	// answer 503 for a moment: read again.
	var keys map[string]bool
	for deadline := time.Now().Add(30 * time.Second); ; {
		if keys, err = replicasStreamKeys(ctx, js, stream); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		t.Logf("reading the stream: %v; reading again", err)
		time.Sleep(500 * time.Millisecond)
	}
	acks.mu.Lock()
	defer acks.mu.Unlock()
	lost := 0
	for tx := range acks.done {
		for _, k := range replicasKeys(tx) {
			if !keys[k] {
				lost++
				if lost <= 5 {
					t.Errorf("acked transaction %d: key %s not in the stream", tx, k)
				}
			}
		}
	}
	if lost > 0 {
		t.Errorf("%d keys of acked transactions lost", lost)
	}
	t.Logf("stream holds %d distinct keys for %d acked transactions", len(keys), len(acks.done))
}

// replicasStreamKeys reads every batch in the stream with an ordered
// consumer and returns the keys they hold.
func replicasStreamKeys(ctx context.Context, js jetstream.JetStream, stream string) (map[string]bool, error) {
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return nil, err
	}
	info, err := s.Info(ctx)
	if err != nil {
		return nil, err
	}
	c, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		return nil, err
	}
	keys := map[string]bool{}
	for read := uint64(0); read < info.State.Msgs; {
		batch, err := c.Fetch(500, jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			return nil, fmt.Errorf("fetch after %d of %d: %w", read, info.State.Msgs, err)
		}
		n := 0
		for m := range batch.Messages() {
			b, err := bus.Decode(m.Data())
			if err != nil {
				return nil, err
			}
			for _, k := range b.Keys {
				keys[k] = true
			}
			n++
		}
		if err := batch.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) {
			return nil, fmt.Errorf("fetch after %d of %d: %w", read, info.State.Msgs, err)
		}
		if n == 0 {
			return nil, fmt.Errorf("no message after %d of %d", read, info.State.Msgs)
		}
		read += uint64(n)
	}
	return keys, nil
}
