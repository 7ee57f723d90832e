package testenv_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgcache/pgcache/testenv"
)

// clusterInfo is a stream's cluster info, or nil when it cannot be read.
func clusterInfo(ctx context.Context, js jetstream.JetStream, stream string) *jetstream.ClusterInfo {
	actx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	s, err := js.Stream(actx, stream)
	if err != nil {
		return nil
	}
	info, err := s.Info(actx)
	if err != nil || info.Cluster == nil {
		return nil
	}
	return info.Cluster
}

// currentReplicas is the number of servers that hold a current copy of
// the stream: its leader and its current followers.
func currentReplicas(ci *jetstream.ClusterInfo) int {
	if ci == nil || ci.Leader == "" {
		return 0
	}
	n := 1
	for _, r := range ci.Replicas {
		if r.Current && !r.Offline {
			n++
		}
	}
	return n
}

// publishAcked publishes one message with its MsgID, retrying (the same
// MsgID, so the stream keeps one copy) until JetStream acks it. It
// returns the time it took.
func publishAcked(ctx context.Context, js jetstream.JetStream, subject, id string) (time.Duration, error) {
	begin := time.Now()
	for {
		actx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := js.Publish(actx, subject, []byte(id), jetstream.WithMsgID(id))
		cancel()
		if err == nil {
			return time.Since(begin), nil
		}
		if ctx.Err() != nil {
			return time.Since(begin), fmt.Errorf("publish %s: %w (last error %v)", id, ctx.Err(), err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// streamIDs reads every message of the stream by sequence (from its
// leader, so no consumer has to be placed on a live server) and returns
// their payloads (the ids) with how many times each was stored.
func streamIDs(ctx context.Context, js jetstream.JetStream, stream string) (map[string]int, error) {
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return nil, err
	}
	info, err := s.Info(ctx)
	if err != nil {
		return nil, err
	}
	out := map[string]int{}
	for seq := info.State.FirstSeq; info.State.Msgs > 0 && seq <= info.State.LastSeq; seq++ {
		// Just after an election the stream may answer 503 for a moment.
		var m *jetstream.RawStreamMsg
		for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			if m, err = s.GetMsg(ctx, seq); err == nil || time.Now().After(deadline) {
				break
			}
		}
		if err != nil {
			return out, fmt.Errorf("read %d of %d..%d: %w", seq, info.State.FirstSeq, info.State.LastSeq, err)
		}
		out[string(m.Data)]++
	}
	return out, nil
}

// TestNATSClusterR3 runs two DCs of three NATS servers each, creates an
// R3 stream in dc1, kills -9 the stream's leader and checks that a new
// leader is elected with no acked message lost; the killed server then
// comes back as a current replica. Losing all of dc2 leaves the stream
// writable.
func TestNATSClusterR3(t *testing.T) {
	begin := time.Now()
	env := testenv.New(t, testenv.Options{NoPostgres: true, MemcachedPerDC: -1, NATSPerDC: 3})
	t.Logf("2 DCs x 3 NATS servers started in %s", time.Since(begin).Round(time.Millisecond))
	ctx := ctxT(t, 3*time.Minute)
	dc1, dc2 := env.DC("dc1"), env.DC("dc2")

	for _, dc := range env.DCs {
		if got := len(dc.NATSServers); got != 3 {
			t.Fatalf("%s: got %d NATS servers; want 3", dc.Name, got)
		}
		if dc.NATS != dc.NATSServers[0] {
			t.Errorf("%s: DC.NATS is not the first server", dc.Name)
		}
		if got, want := strings.Count(dc.NATSURL(), ","), 2; got != want {
			t.Errorf("%s: NATSURL %q has %d commas; want %d", dc.Name, dc.NATSURL(), got, want)
		}
		for _, n := range dc.NATSServers {
			if n.PID() == 0 || n.Cluster != dc.Name {
				t.Errorf("%s: got pid %d, cluster %q; want a process in cluster %q", n.Name, n.PID(), n.Cluster, dc.Name)
			}
			testenv.Eventually(t, 20*time.Second, n.Name+"'s gateway to the other DC", func() bool { return n.GatewaysConnected() == 1 })
		}
	}
	if err := natsCrossDC(ctx, env, "dc1", "dc2", 10*time.Second); err != nil {
		t.Fatal(err)
	}
	// Every gateway connection goes through a Link (so cutting a DC's links
	// partitions it): each of the 6 servers has one outbound connection.
	testenv.Eventually(t, 10*time.Second, "6 gateway connections through the links", func() bool {
		conns := 0
		for _, l := range dc1.GatewayLinks { // dc1's links are every link here
			conns += l.Conns()
		}
		return conns == 6
	})

	nc, err := nats.Connect(dc1.NATSURL(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	const stream, subject = "R3", "r3.msgs"
	_, err = js.CreateStream(ctx, jetstream.StreamConfig{Name: stream, Subjects: []string{subject}, Replicas: 3,
		Storage: jetstream.FileStorage, Placement: &jetstream.Placement{Cluster: "dc1"}})
	if err != nil {
		t.Fatalf("create R3 stream: %v", err)
	}
	testenv.Eventually(t, 30*time.Second, "3 current replicas", func() bool { return currentReplicas(clusterInfo(ctx, js, stream)) == 3 })
	ci := clusterInfo(ctx, js, stream)
	if ci.Name != "dc1" || !strings.HasPrefix(ci.Leader, "dc1-") {
		t.Fatalf("stream placed in cluster %q, leader %q; want dc1", ci.Name, ci.Leader)
	}
	for _, r := range ci.Replicas {
		if !strings.HasPrefix(r.Name, "dc1-") {
			t.Errorf("replica %s outside dc1", r.Name)
		}
	}

	acked := map[string]bool{}
	publish := func(from, to int) time.Duration {
		t.Helper()
		var worst time.Duration
		for i := from; i < to; i++ {
			id := fmt.Sprintf("m%05d", i)
			d, err := publishAcked(ctx, js, subject, id)
			if err != nil {
				t.Fatal(err)
			}
			acked[id] = true
			worst = max(worst, d)
		}
		return worst
	}
	publish(0, 300)

	oldLeader := ci.Leader
	victim := env.NATSServer(oldLeader)
	if victim == nil {
		t.Fatalf("leader %q is no server of the environment", oldLeader)
	}
	pid := victim.PID()
	killed := time.Now()
	if err := victim.Kill(); err != nil {
		t.Fatal(err)
	}
	if processAlive(pid) || victim.Running() {
		t.Fatalf("killed server %s (pid %d) still runs", oldLeader, pid)
	}
	stall := publish(300, 600)
	t.Logf("kill -9 of leader %s: the first publish after it took %s; 300 acked in %s", oldLeader, stall.Round(time.Millisecond), time.Since(killed).Round(time.Millisecond))
	ci = clusterInfo(ctx, js, stream)
	if ci == nil || ci.Leader == "" || ci.Leader == oldLeader || !strings.HasPrefix(ci.Leader, "dc1-") {
		t.Fatalf("after the kill: got cluster info %+v; want a new leader in dc1", ci)
	}
	t.Logf("new leader %s", ci.Leader)

	got, err := streamIDs(ctx, js, stream)
	if err != nil {
		t.Fatal(err)
	}
	for id := range acked {
		if got[id] != 1 {
			t.Errorf("acked message %s stored %d times; want 1", id, got[id])
		}
	}
	if len(got) != len(acked) {
		t.Errorf("got %d distinct messages; want %d", len(got), len(acked))
	}

	if err := victim.Start(); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 60*time.Second, oldLeader+" back as a current replica", func() bool { return currentReplicas(clusterInfo(ctx, js, stream)) == 3 })

	// A durable consumer made while every server is up.
	cons, err := js.CreateOrUpdateConsumer(ctx, stream, jetstream.ConsumerConfig{Durable: "READER", AckPolicy: jetstream.AckExplicitPolicy, Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}

	// Losing every server of dc2 at once leaves dc1's stream writable:
	// its replicas are all in dc1.
	if err := dc2.KillNATS(); err != nil {
		t.Fatal(err)
	}
	for _, n := range dc2.NATSServers {
		if n.Running() {
			t.Errorf("%s runs after KillNATS", n.Name)
		}
	}
	publish(600, 700)
	// The JetStream meta group spans both DCs (6 servers, quorum 4): with
	// dc2 gone it has no leader, so no stream or consumer can be created.
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	_, err = js.CreateStream(actx, jetstream.StreamConfig{Name: "WHILEDC2DOWN", Subjects: []string{"down.x"}, Placement: &jetstream.Placement{Cluster: "dc1"}})
	cancel()
	t.Logf("creating a stream with dc2's NATS down: %v", err)
	if err == nil {
		t.Errorf("created a stream without a meta quorum; want an error (the meta group spans 6 servers)")
	}
	actx, cancel = context.WithTimeout(ctx, 5*time.Second)
	_, err = js.CreateOrUpdateConsumer(actx, stream, jetstream.ConsumerConfig{Durable: "NEWREADER", AckPolicy: jetstream.AckExplicitPolicy})
	cancel()
	t.Logf("creating a consumer with dc2's NATS down: %v", err)
	if err == nil {
		t.Errorf("created a consumer without a meta quorum; want an error")
	}
	// The durable consumer made before still delivers and takes acks.
	batch, err := cons.Fetch(100, jetstream.FetchMaxWait(10*time.Second))
	if err != nil {
		t.Fatalf("fetch from the existing consumer with dc2 down: %v", err)
	}
	fetched := 0
	for m := range batch.Messages() {
		if err := m.Ack(); err != nil {
			t.Errorf("ack with dc2 down: %v", err)
		}
		fetched++
	}
	t.Logf("fetched and acked %d messages from the existing consumer with dc2 down (%v)", fetched, batch.Error())
	if fetched == 0 {
		t.Errorf("the existing consumer delivered nothing with dc2 down")
	}
	if err := dc2.StartNATS(); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 60*time.Second, "dc2's gateways back", func() bool {
		for _, n := range append(dc1.NATSServers, dc2.NATSServers...) {
			if n.GatewaysConnected() != 1 {
				return false
			}
		}
		return true
	})
	for _, n := range dc2.NATSServers {
		if err := n.WaitJetStream(ctx); err != nil {
			t.Fatal(err)
		}
	}

	pids := env.PIDs()
	if len(pids) != 6 {
		t.Errorf("got %d child processes; want 6 NATS servers", len(pids))
	}
	if err := env.Close(); err != nil {
		t.Fatal(err)
	}
	for _, pid := range pids {
		if processAlive(pid) {
			t.Errorf("NATS server pid %d left after Close", pid)
		}
	}
}
