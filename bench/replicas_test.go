package bench

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/pgcache/pgcache/testenv"
)

// natsLayouts are the stream layouts BenchmarkEndToEndReplicas compares
// on one environment whose datacenters each run a three-server NATS
// cluster: the name, the nats: lines past url and stream, and whether
// each DC has its own stream.
var natsLayouts = []struct {
	name, yaml string
	geo        bool
}{
	{"replicas-1", "placement: dc1, replicas: 1", false},
	{"replicas-3", "placement: dc1, replicas: 3", false},
	{"per-dc-replicas-3", "replicas: 3, datacenters: [dc1, dc2], durable_dcs: 2", true},
}

// BenchmarkEndToEndReplicas is BenchmarkEndToEnd over three-server NATS
// clusters: one stream with 1 replica, one stream with 3, and a stream of
// 3 replicas per datacenter, each confirmed once both datacenters hold it
// (nats.datacenters). Each is measured against pg_recvlogical on the same
// WAL, in the same environment, in turn.
func BenchmarkEndToEndReplicas(b *testing.B) {
	env(b) // builds the invalidator
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	e, err := testenv.Start(ctx, testenv.Options{NATSPerDC: 3})
	if err != nil {
		b.Fatalf("environment with three NATS servers per DC: %v", err)
	}
	defer e.Close()
	if err := e.Primary.Exec(ctx, schema); err != nil {
		b.Fatal(err)
	}
	nc, err := nats.Connect(e.DCs[0].NATSURL())
	if err != nil {
		b.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		b.Fatal(err)
	}
	txs := envInt("BENCH_TXS", 52000)
	for i := 0; i < b.N; i++ {
		for _, l := range natsLayouts {
			deleteStreams(ctx, b, js)
			ref, inv := nextName("ref"), nextName("rep")
			createSlots(ctx, b, e, ref, inv)
			changes, end := workload(ctx, b, e, txs)
			r, _ := recvlogical(ctx, b, e, ref, end)
			stream := nextName("BENCH_REP")
			var ps []*invalidator
			for j, dc := range e.DCs {
				ps = append(ps, startInvalidator(b, dc.Name+"-"+l.name, replicasConfig(e, dc, inv, stream, l.yaml, j == 0)))
			}
			ps[0].confirmedAt(ctx, end)
			d := drainedAll(ctx, b, js, e, stream, l.geo, ps).Sub(ps[0].started)
			for _, p := range ps {
				p.stop()
			}
			b.Logf("%s: %d changes in %d transactions: pg_recvlogical %v, purged in %d DCs %v", l.name, changes, txs, r, len(e.DCs), d)
			b.ReportMetric(float64(changes)/d.Seconds(), l.name+"-changes/s")
			b.ReportMetric(r.Seconds()/d.Seconds(), l.name+"-x-recvlogical")
		}
	}
}

// replicasConfig is an invalidator config for dc on e's NATS clusters:
// tail and purge in the first DC, purge in the others.
func replicasConfig(e *testenv.Env, dc *testenv.DC, slot, stream, natsYAML string, tail bool) string {
	return fmt.Sprintf("dc: %s\npostgres: {dsn: %q, slot: %s, publication: bench}\nnats: {url: %q, stream: %s, %s}\ntail: %t\nhttp: {listen: \"127.0.0.1:0\"}\n"+
		"purge:\n  servers: [%s]\n  replica_dsn: %q\n",
		dc.Name, e.Primary.DSN(""), slot, dc.NATSURL(), stream, natsYAML, tail, strings.Join(dc.MemcachedAddrs(), ", "), dc.Replica.DSN("")) + rules
}

// deleteStreams removes every stream (the layouts share subjects).
func deleteStreams(ctx context.Context, b *testing.B, js jetstream.JetStream) {
	b.Helper()
	var names []string
	for n := range js.StreamNames(ctx).Name() {
		names = append(names, n)
	}
	for _, n := range names {
		if err := js.DeleteStream(ctx, n); err != nil && !errors.Is(err, jetstream.ErrStreamNotFound) {
			b.Fatal(err)
		}
	}
}

// drainedAll waits until every DC's purge consumer has acked its stream
// (the one stream, or its own with geo) to the end as it is when called,
// and returns when it saw that. Call it after the tailer has confirmed the
// end, when every stream holds everything.
func drainedAll(ctx context.Context, b *testing.B, js jetstream.JetStream, e *testenv.Env, stream string, geo bool, ps []*invalidator) time.Time {
	b.Helper()
	consumers := make([]jetstream.Consumer, len(e.DCs))
	last := make([]uint64, len(e.DCs))
	for i, dc := range e.DCs {
		name := stream
		if geo {
			name = stream + "_" + dc.Name
		}
		s, err := js.Stream(ctx, name)
		if err != nil {
			b.Fatal(err)
		}
		info, err := s.Info(ctx)
		if err != nil {
			b.Fatal(err)
		}
		last[i] = info.State.LastSeq
		for consumers[i] == nil {
			if consumers[i], err = s.Consumer(ctx, "purge-"+dc.Name); err != nil {
				select {
				case <-ctx.Done():
					b.Fatalf("consumer purge-%s of %s: %v", dc.Name, name, err)
				case <-time.After(2 * time.Millisecond):
				}
			}
		}
	}
	for {
		done := true
		for i, c := range consumers {
			ci, err := c.Info(ctx)
			if err != nil || ci.AckFloor.Stream < last[i] || ci.NumAckPending > 0 {
				done = false
				break
			}
		}
		if done {
			return time.Now()
		}
		for _, p := range ps {
			if err := p.exited(); err != nil {
				b.Fatal(err)
			}
		}
		select {
		case <-ctx.Done():
			b.Fatalf("purge consumers of %s not drained: %v", stream, ctx.Err())
		case <-time.After(2 * time.Millisecond):
		}
	}
}
