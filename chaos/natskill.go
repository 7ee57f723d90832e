package chaos

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// natsServerKill kills -9 the server that leads dc1's stream (the one dc1's
// active tail publishes to) every Period while Fault lasts, and starts it
// again after Outage on the same ports and store. dc1's cluster must have
// three servers (testenv.Options.NATSPerDC 3) and the stream three
// replicas, so that the two servers left elect a new leader and the
// stream goes on. For each kill it measures, from the stream's own
// state, when a new leader answered and when the stream stored a batch
// again (the publish stall), and records both with w.Measure. Before each
// kill, and at the end, it waits until the stream has three current
// replicas again.
func natsServerKill(ctx context.Context, w *World, t Timing, log *zap.Logger) (int, error) {
	dc1 := w.Env.DCs[0]
	if len(dc1.NATSServers) < 3 {
		return 0, fmt.Errorf("%w: %s has %d NATS servers; the scenario needs a three-server cluster (testenv.Options.NATSPerDC 3)",
			ErrConfig, dc1.Name, len(dc1.NATSServers))
	}
	stream := w.streamOf(dc1.Name)
	// Its own connection, to every server of every DC: whichever server
	// dies, stream info still has a way in.
	var urls []string
	for _, dc := range w.Env.DCs {
		urls = append(urls, dc.NATSURL())
	}
	nc, err := nats.Connect(strings.Join(urls, ","), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		return 0, fmt.Errorf("connect nats: %w", err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return 0, err
	}

	count := 0
	var stalls, elections []time.Duration
	for end := time.Now().Add(t.Fault); count == 0 || time.Until(end) >= t.Outage; {
		if _, err := healthyStream(ctx, js, stream, 60*time.Second); err != nil {
			return count, err
		}
		st, err := streamState(ctx, js, stream)
		if err != nil {
			return count, err
		}
		victim := w.Env.NATSServer(st.leader)
		if victim == nil {
			return count, fmt.Errorf("the leader %q of %s is no server of the environment", st.leader, stream)
		}
		log.Info("kill -9 the stream leader's NATS server", zap.String("server", victim.Name), zap.String("stream", stream), zap.Uint64("last_seq", st.lastSeq))
		killed := time.Now()
		if err := victim.Kill(); err != nil {
			return count, err
		}
		w.note("kill -9 the NATS server leading " + stream)
		count++
		measured := make(chan stallFigures, 1)
		go func() { measured <- measureStall(ctx, js, stream, st.leader, killed, 60*time.Second) }()
		sleep(ctx, t.Outage)
		if err := victim.Start(); err != nil {
			return count, err
		}
		m := <-measured
		if m.err != nil {
			w.Measure(fmt.Sprintf("kill -9 of %s (leader of %s): %v", victim.Name, stream, m.err))
			log.Warn("publish stall not measured", zap.Error(m.err))
		} else {
			stalls, elections = append(stalls, m.stored), append(elections, m.answered)
			w.Measure(fmt.Sprintf("kill -9 of %s (leader of %s): new leader %s answered after %s; the stream stored a batch again %s after the kill",
				victim.Name, stream, m.leader, m.answered.Round(10*time.Millisecond), m.stored.Round(10*time.Millisecond)))
			log.Info("publishing resumed", zap.String("new_leader", m.leader), zap.Duration("answered", m.answered), zap.Duration("stored", m.stored))
		}
		if ctx.Err() != nil {
			return count, ctx.Err()
		}
		sleep(ctx, t.Period)
	}
	back, err := healthyStream(ctx, js, stream, 60*time.Second)
	if err != nil {
		return count, err
	}
	if len(stalls) > 0 {
		w.Measure(fmt.Sprintf("%s publish stall over %d kills: max %s, mean %s (new leader answered: max %s); 3 current replicas %s after the last restart",
			stream, len(stalls), maxDur(stalls).Round(10*time.Millisecond), meanDur(stalls).Round(10*time.Millisecond),
			maxDur(elections).Round(10*time.Millisecond), back.Round(10*time.Millisecond)))
	}
	return count, nil
}

// streamSnapshot is a stream's leader and last sequence.
type streamSnapshot struct {
	leader  string
	current int // the leader and its current followers
	lastSeq uint64
}

func streamState(ctx context.Context, js jetstream.JetStream, stream string) (streamSnapshot, error) {
	actx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	s, err := js.Stream(actx, stream)
	if err != nil {
		return streamSnapshot{}, err
	}
	info, err := s.Info(actx)
	if err != nil {
		return streamSnapshot{}, err
	}
	if info.Cluster == nil || info.Cluster.Leader == "" {
		return streamSnapshot{}, errors.New("no leader")
	}
	st := streamSnapshot{leader: info.Cluster.Leader, current: 1, lastSeq: info.State.LastSeq}
	for _, r := range info.Cluster.Replicas {
		if r.Current && !r.Offline {
			st.current++
		}
	}
	return st, nil
}

// healthyStream waits until the stream has three current replicas and
// returns how long that took.
func healthyStream(ctx context.Context, js jetstream.JetStream, stream string, timeout time.Duration) (time.Duration, error) {
	begin := time.Now()
	var last error
	for time.Since(begin) < timeout && ctx.Err() == nil {
		st, err := streamState(ctx, js, stream)
		if err == nil && st.current >= 3 {
			return time.Since(begin), nil
		}
		if err == nil {
			err = fmt.Errorf("leader %s with %d current replicas", st.leader, st.current)
		}
		last = err
		sleep(ctx, 100*time.Millisecond)
	}
	return time.Since(begin), fmt.Errorf("stream %s not back to 3 current replicas within %s: %v", stream, timeout, last)
}

// stallFigures are what measureStall saw after a kill.
type stallFigures struct {
	leader   string        // the new leader
	answered time.Duration // kill to the first answer of a new leader
	stored   time.Duration // kill to the first batch stored after that answer
	err      error
}

// measureStall polls the stream after its leader old was killed: the
// first answer comes from a new leader; the stream has stored a batch
// again once its last sequence grows past that answer's. (A batch stored
// just before the kill may show in the first answer; it does not count.)
// It needs the workload to publish all along.
func measureStall(ctx context.Context, js jetstream.JetStream, stream, old string, killed time.Time, timeout time.Duration) stallFigures {
	var f stallFigures
	var first uint64
	for time.Since(killed) < timeout && ctx.Err() == nil {
		st, err := streamState(ctx, js, stream)
		switch {
		case err != nil || st.leader == old:
		case f.leader == "":
			f.leader, f.answered, first = st.leader, time.Since(killed), st.lastSeq
		case st.lastSeq > first:
			f.stored = time.Since(killed)
			return f
		}
		sleep(ctx, 25*time.Millisecond)
	}
	f.err = fmt.Errorf("no batch stored within %s of the kill (new leader %q after %s)", timeout, f.leader, f.answered)
	return f
}

func maxDur(ds []time.Duration) time.Duration {
	var m time.Duration
	for _, d := range ds {
		m = max(m, d)
	}
	return m
}

func meanDur(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	var s time.Duration
	for _, d := range ds {
		s += d
	}
	return s / time.Duration(len(ds))
}
