package bus

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// ErrReplicas: a stream cannot have the replicas asked for, most often
// because its cluster has fewer servers than that.
var ErrReplicas = errors.New("bus: stream replicas not available")

// Layout says which streams carry a pipeline's invalidations.
//
// The single layout (DCs empty) is one stream, Base, in one cluster: every
// datacenter's purger reads it through the gateways. Losing that cluster
// stops invalidation everywhere and loses what it held.
//
// The per-datacenter layout (DCs set) gives every datacenter a stream of
// its own in its own cluster, named <Base.Name>_<dc>. A tail process
// publishes to its datacenter's stream on the subject <Base.Subject>.<dc>;
// every other datacenter's stream sources that subject from it. So each
// datacenter's purger reads a local stream holding every origin's batches,
// a partition only delays the sourcing, and a batch is confirmed to
// Postgres only once DurableDCs datacenters' streams hold it: losing a
// datacenter loses no confirmed batch.
type Layout struct {
	// Base is the stream of the single layout, and the name, subject,
	// replicas and limits that the per-datacenter streams derive from.
	Base StreamConfig
	// DCs lists every datacenter of the per-datacenter layout; each is
	// also its NATS cluster's name. Empty: the single layout.
	DCs []string
	// DurableDCs is how many datacenters' streams must hold a batch
	// before its transactions are confirmed: the writer's and
	// DurableDCs-1 others. 0 means 2 (1 with a single datacenter).
	DurableDCs int
}

// Geo reports whether this is the per-datacenter layout.
func (l Layout) Geo() bool { return len(l.DCs) > 0 }

// Validate checks the layout for datacenter dc (the one using it).
func (l Layout) Validate(dc string) error {
	if !l.Geo() {
		return nil
	}
	if !slices.Contains(l.DCs, dc) {
		return fmt.Errorf("bus: datacenter %q is not in the layout's datacenters %v", dc, l.DCs)
	}
	seen := map[string]bool{}
	for _, d := range l.DCs {
		if d == "" || strings.ContainsAny(d, " .*>\t") {
			return fmt.Errorf("bus: datacenter name %q cannot name a stream", d)
		}
		if seen[d] {
			return fmt.Errorf("bus: datacenter %q listed twice", d)
		}
		seen[d] = true
	}
	if n := l.durable(); n < 1 || n > len(l.DCs) {
		return fmt.Errorf("bus: durable datacenters %d out of 1..%d", n, len(l.DCs))
	}
	return nil
}

func (l Layout) durable() int {
	if l.DurableDCs != 0 {
		return l.DurableDCs
	}
	return min(2, len(l.DCs))
}

func (l Layout) base() StreamConfig {
	b := l.Base
	b.defaults()
	return b
}

// Stream is the stream that datacenter dc publishes to and consumes: the
// base stream in the single layout; its own, sourcing every other
// datacenter's subject from that datacenter's stream, in the
// per-datacenter layout.
func (l Layout) Stream(dc string) StreamConfig {
	b := l.base()
	if !l.Geo() {
		return b
	}
	s := b
	s.Name = b.Name + "_" + dc
	s.Subject = b.Subject + "." + dc
	s.Placement = dc
	s.Description = b.Description + "; datacenter " + dc + "'s copy of every origin"
	s.Sources = nil
	for _, o := range l.DCs {
		if o != dc {
			s.Sources = append(s.Sources, Source{Stream: b.Name + "_" + o, Subject: b.Subject + "." + o})
		}
	}
	return s
}

// Remotes are the streams of the other datacenters, which must hold dc's
// batches (Need of them) before they are confirmed. Empty in the single
// layout.
func (l Layout) Remotes(dc string) (streams []StreamConfig, need int) {
	if !l.Geo() {
		return nil, 0
	}
	for _, o := range l.DCs {
		if o != dc {
			streams = append(streams, l.Stream(o))
		}
	}
	return streams, l.durable() - 1
}

// Source is another stream whose messages on Subject a stream copies.
type Source struct {
	Stream  string
	Subject string
}

// ensureSources adds to an existing stream the sources it lacks (a
// datacenter added to the layout), raises its replicas to the ones asked
// for, and allows direct reads. It never removes a source: a datacenter taken out of the
// layout is removed by hand (RUNBOOK).
func ensureSources(ctx context.Context, js jetstream.JetStream, s jetstream.Stream, cfg StreamConfig) (jetstream.Stream, error) {
	info := s.CachedInfo()
	sc := info.Config
	changed := false
	for _, want := range cfg.Sources {
		if !slices.ContainsFunc(sc.Sources, func(h *jetstream.StreamSource) bool { return h.Name == want.Stream }) {
			sc.Sources = append(sc.Sources, &jetstream.StreamSource{Name: want.Stream, FilterSubject: want.Subject})
			changed = true
		}
	}
	if cfg.Replicas > sc.Replicas {
		sc.Replicas = cfg.Replicas
		changed = true
	}
	direct := !sc.AllowDirect
	sc.AllowDirect = true
	if !changed && !direct {
		return s, nil
	}
	us, err := js.UpdateStream(ctx, sc)
	if err != nil && !changed {
		return s, nil // direct reads are a convenience: go on without
	}
	if err != nil {
		return nil, replicasErr(fmt.Errorf("update stream %s (sources, replicas %d): %w", cfg.Name, cfg.Replicas, err), cfg)
	}
	return us, nil
}

// JetStream's error codes for a stream whose replicas cannot be placed.
const (
	errNoPeers      jetstream.ErrorCode = 10005 // no suitable peers for placement
	errInsufficient jetstream.ErrorCode = 10023 // insufficient resources
	errNotClustered jetstream.ErrorCode = 10074 // replicas > 1 not supported in non-clustered mode
)

// replicasErr names ErrReplicas when JetStream refused the replicas.
func replicasErr(err error, cfg StreamConfig) error {
	var apiErr *jetstream.APIError
	// "peer offline": a server of the cluster is down now, which passes.
	if errors.As(err, &apiErr) && !strings.Contains(apiErr.Description, "peer offline") &&
		(apiErr.ErrorCode == errNoPeers || apiErr.ErrorCode == errInsufficient || apiErr.ErrorCode == errNotClustered) {
		where := cfg.Placement
		if where == "" {
			where = "the connected cluster"
		}
		return fmt.Errorf("%w: %d replicas of %s in %s (a cluster needs at least that many JetStream servers): %w",
			ErrReplicas, cfg.Replicas, cfg.Name, where, err)
	}
	return err
}

// InspectStream describes a stream of the layout as JetStream has it,
// beside what cfg asks for: its cluster, leader and replicas (each current
// or behind), and its sources. problems are the differences that keep the
// layout from its promise (wrong cluster, too few replicas, a missing
// source); a stream not yet created is no problem (the first start
// creates it).
func InspectStream(ctx context.Context, js jetstream.JetStream, cfg StreamConfig) (report string, problems []string, err error) {
	cfg.defaults()
	var b strings.Builder
	s, err := js.Stream(ctx, cfg.Name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		fmt.Fprintf(&b, "stream %s: not created yet; the first start creates it in cluster %q with %d replicas\n", cfg.Name, cfg.Placement, cfg.Replicas)
		return b.String(), nil, nil
	}
	if err != nil {
		return "", nil, fmt.Errorf("look up stream %s: %w", cfg.Name, err)
	}
	info := s.CachedInfo()
	cl := info.Cluster
	if cl == nil {
		cl = &jetstream.ClusterInfo{}
	}
	current := 1 // the leader
	var peers []string
	for _, r := range cl.Replicas {
		state := "current"
		if !r.Current || r.Offline {
			state = fmt.Sprintf("behind (offline %t, lag %d, last seen %s ago)", r.Offline, r.Lag, r.Active.Round(time.Millisecond))
		} else {
			current++
		}
		peers = append(peers, r.Name+" "+state)
	}
	fmt.Fprintf(&b, "stream %s: cluster %q, %d replicas (asked %d), leader %q, %d current; %d messages\n",
		cfg.Name, cl.Name, info.Config.Replicas, cfg.Replicas, cl.Leader, current, info.State.Msgs)
	for _, p := range peers {
		fmt.Fprintf(&b, "  replica %s\n", p)
	}
	if cfg.Placement != "" && cl.Name != "" && cl.Name != cfg.Placement {
		problems = append(problems, fmt.Sprintf("stream %s is in cluster %q, not %q: move it (nats stream cluster ...) or fix nats.placement/datacenters", cfg.Name, cl.Name, cfg.Placement))
	}
	if info.Config.Replicas < cfg.Replicas {
		fmt.Fprintf(&b, "  replicas: %d now; the next start raises them to %d\n", info.Config.Replicas, cfg.Replicas)
	}
	if info.Config.Replicas > 1 && current <= info.Config.Replicas/2 {
		problems = append(problems, fmt.Sprintf("stream %s has %d current replicas of %d: no quorum, publishing stops", cfg.Name, current, info.Config.Replicas))
	}
	for _, want := range cfg.Sources {
		i := slices.IndexFunc(info.Sources, func(si *jetstream.StreamSourceInfo) bool { return si.Name == want.Stream })
		if i < 0 {
			fmt.Fprintf(&b, "  source %s (%s): missing; the next start adds it\n", want.Stream, want.Subject)
			continue
		}
		si := info.Sources[i]
		active := "never"
		if si.Active >= 0 {
			active = si.Active.Round(time.Millisecond).String() + " ago"
		}
		fmt.Fprintf(&b, "  source %s (%s): lag %d messages, last heard %s\n", want.Stream, want.Subject, si.Lag, active)
		if si.Error != nil {
			problems = append(problems, fmt.Sprintf("stream %s cannot copy %s: %v", cfg.Name, want.Stream, si.Error))
		}
	}
	return b.String(), problems, nil
}

// GetMsg reads message seq of stream s. The streams allow direct reads,
// which any replica answers, and a follower that has not yet stored seq
// answers "not found": a message the stream holds (seq at or past its
// first sequence, at or before its last as lastSeq says) that is not found
// is read again for up to a second before GetMsg reports
// jetstream.ErrMsgNotFound (the message was deleted).
func GetMsg(ctx context.Context, s jetstream.Stream, seq, firstSeq, lastSeq uint64) (*jetstream.RawStreamMsg, error) {
	for try := 0; ; try++ {
		m, err := s.GetMsg(ctx, seq)
		if err == nil || !errors.Is(err, jetstream.ErrMsgNotFound) || seq < firstSeq || seq > lastSeq || try == 20 {
			return m, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}
