package tail

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/pgcache/pgcache/backoff"
	"github.com/pgcache/pgcache/batcher"
	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/counters"
	"github.com/pgcache/pgcache/counterstore"
	"github.com/pgcache/pgcache/keys"
	"github.com/pgcache/pgcache/lifecycle"
	"github.com/pgcache/pgcache/wal"
)

// Config configures the tail role.
type Config struct {
	// WAL is the slot, publication and tables to stream.
	WAL wal.Config
	// Publisher is the invalidation stream and how batches are published.
	Publisher bus.PublisherConfig
	// Counters are the counter rules; nil or empty means no counters, and
	// Batcher, Store and Increments are not used.
	Counters *counters.Set
	Batcher  batcher.Config
	Store    counterstore.Config
	// Increments is the stream of direct increments (Name, Placement).
	Increments bus.StreamConfig
	// SetupTimeout bounds the setup of the slot, the streams and the
	// counter tables. 0 means 30s.
	SetupTimeout time.Duration
	// OnSlotLoss is SlotLossExit (default) or SlotLossFlush.
	OnSlotLoss string
	// State is where the pipeline's state is kept; empty: the one bucket
	// bus.StateBucket in the stream's placement.
	State bus.StateConfig
	// StateInterval is how often the pipeline's state is saved in
	// JetStream. 0 means 5s.
	StateInterval time.Duration
	// CheckInterval is how often the tables are checked again against
	// the rules (columns, replica identity of each table and partition),
	// besides the relation messages of the stream. 0 means 1m; negative
	// turns the periodic check off.
	CheckInterval time.Duration
}

// Validate checks cfg with the rules it will render.
func (c Config) Validate() error {
	if err := c.WAL.Validate(); err != nil {
		return err
	}
	if err := c.Publisher.Validate(); err != nil {
		return err
	}
	if c.counting() {
		if err := c.Batcher.Validate(); err != nil {
			return err
		}
		if err := c.Store.Validate(); err != nil {
			return err
		}
		if c.Increments.Name == "" {
			return errors.New("tail: config: the increments stream has no name")
		}
	}
	if c.OnSlotLoss != "" && c.OnSlotLoss != SlotLossExit && c.OnSlotLoss != SlotLossFlush {
		return fmt.Errorf("tail: config: on_slot_loss %q: want %q or %q", c.OnSlotLoss, SlotLossExit, SlotLossFlush)
	}
	if c.SetupTimeout < 0 {
		return fmt.Errorf("tail: config: SetupTimeout (%s) is negative", c.SetupTimeout)
	}
	return nil
}

func (c Config) counting() bool { return c.Counters != nil && c.Counters.Len() > 0 }

// Role is the tail role. Lifecycle: New, then Run (blocks); Drain is the
// soft stop (stop reading the WAL, publish and flush what was read,
// confirm the last position, then Run returns nil); cancelling Run's ctx
// is the hard stop (what is unconfirmed is delivered again after a
// restart). Close releases what Run did not (it is safe twice).
type Role struct {
	cfg   Config
	js    jetstream.JetStream
	log   *zap.Logger
	reg   prometheus.Registerer
	keys  *Handler
	ctrm  *counterMetrics
	incUp prometheus.Gauge // 1 while the increments consumer runs
	ready chan struct{}

	stream  *wal.Stream
	pub     *bus.Publisher
	batcher *batcher.Batcher // nil without counters
	store   *counterstore.Store

	system   wal.System // the primary, identified at setup
	slotLost prometheus.Counter
	repurged prometheus.Counter
	stateMu  sync.Mutex    // guards state
	state    bus.TailState // the pipeline's state, saved in JetStream

	// goingAway is signalled when a counter flush fails because the
	// primary is shutting down or unreachable.
	goingAway chan struct{}

	soft      *lifecycle.Soft
	closeOnce sync.Once
}

// New validates cfg and returns the role, which renders keys with rules
// (see SetRules) and registers its metrics with reg (nil: none).
func New(cfg Config, rules *keys.Set, js jetstream.JetStream, reg prometheus.Registerer, log *zap.Logger) (*Role, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.SetupTimeout == 0 {
		cfg.SetupTimeout = 30 * time.Second
	}
	if cfg.CheckInterval == 0 {
		cfg.CheckInterval = time.Minute
	}
	if cfg.StateInterval == 0 {
		cfg.StateInterval = 5 * time.Second
	}
	if cfg.OnSlotLoss == "" {
		cfg.OnSlotLoss = SlotLossExit
	}
	// The keys handler follows the tables' replica identity from the
	// relation messages.
	var kh *Handler
	cfg.WAL.OnRelation = func(rel wal.Relation) { kh.Relation(rel) }
	var role *Role
	cfg.WAL.OnTimeline = func(ctx context.Context, sw wal.TimelineSwitch) error { return role.onTimeline(ctx, sw) }
	var store *counterstore.Store
	if cfg.counting() {
		var err error
		if store, err = counterstore.New(cfg.Store); err != nil {
			return nil, err
		}
		// Repair requests are rows of the repair table, read from the WAL.
		if t := store.RepairTable(); !slices.Contains(cfg.WAL.Tables, t) {
			cfg.WAL.Tables = append(slices.Clone(cfg.WAL.Tables), t)
		}
	}
	stream, err := wal.New(cfg.WAL, log)
	if err != nil {
		return nil, err
	}
	pub, err := bus.NewPublisher(js, cfg.Publisher, log.Named("bus"))
	if err != nil {
		return nil, err
	}
	r := &Role{cfg: cfg, js: js, log: log, reg: reg, stream: stream, pub: pub, store: store,
		ready: make(chan struct{}), soft: lifecycle.New("tail"), goingAway: make(chan struct{}, 1)}
	role = r
	r.slotLost = prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_slot_losses_total",
		Help: "Times this process found its replication slot lost (missing after it ran before, or invalidated)."})
	r.repurged = prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_timeline_repurged_keys_total",
		Help: "Keys published again after a promotion because they were published past the old timeline's end (possible phantoms)."})
	if reg != nil {
		reg.MustRegister(r.slotLost, r.repurged)
	}
	pub.SetStageObserver(newStageMetrics(reg))
	r.keys = NewHandler(rules, pub, NewMetrics(reg), log)
	r.keys.id.need = func(t string) []string { return NeedOld(t, r.keys.rules, cfg.Counters) }
	kh = r.keys
	if cfg.counting() {
		r.ctrm = newCounterMetrics(reg)
		r.incUp = prometheus.NewGauge(prometheus.GaugeOpts{Name: "invalidator_increments_up",
			Help: "1 while the counter increments are consumed; 0 when they stopped (a counters fault: invalidation goes on)."})
		if reg != nil && hasIncrements(cfg.Counters) {
			reg.MustRegister(r.incUp)
		}
		if r.batcher, err = batcher.New(cfg.Batcher, goingAwayFlusher{Store: r.store, signal: r.goingAway}, batcher.NewMetrics(reg)); err != nil {
			return nil, err
		}
	}
	r.register(reg)
	return r, nil
}

// SetRules replaces the rules (a config reload); they apply from the next
// transaction.
func (r *Role) SetRules(rules *keys.Set) { r.keys.SetRules(rules) }

// Ready is closed once the slot, the publication, the streams and the
// counter tables are set up (a hot standby is ready while it waits).
func (r *Role) Ready() <-chan struct{} { return r.ready }

// Stats returns the WAL stream's positions, for health checks.
func (r *Role) Stats() wal.Stats { return r.stream.Stats() }

// Run sets up and runs the role until Drain completes (nil), ctx ends
// (nil), or a component fails.
func (r *Role) Run(ctx context.Context) error {
	defer r.soft.Stopped()
	defer r.Close()
	if err := r.setup(ctx); err != nil {
		return err
	}
	close(r.ready)
	g, gctx := errgroup.WithContext(ctx)
	// Every component runs until the hard stop, or until the WAL side has
	// drained (then they are stopped in order below).
	bctx, stopBack := context.WithCancel(gctx)
	defer stopBack()
	g.Go(func() error { return r.pub.Run(bctx) })
	if r.cfg.CheckInterval > 0 {
		g.Go(func() error { r.watchIdentity(bctx, r.cfg.CheckInterval); return nil })
	}
	g.Go(func() error { r.keepState(bctx, r.cfg.StateInterval); return nil })
	if r.batcher != nil {
		g.Go(func() error {
			if err := r.batcher.Run(bctx); err != nil {
				return fmt.Errorf("counters: %w", err)
			}
			return nil
		})
		if hasIncrements(r.cfg.Counters) {
			g.Go(func() error { r.superviseIncrements(bctx); return nil })
		}
	}
	g.Go(func() error {
		defer stopBack()
		err := r.runStream(gctx)
		if err != nil && !errors.Is(err, context.Canceled) {
			return fmt.Errorf("wal: %w", err)
		}
		if gctx.Err() != nil {
			return nil // hard stop
		}
		// Soft stop: reading has stopped. Publish what was read and
		// flush the deltas (each resolves its part of the transactions'
		// Acks), then wal confirms the last position.
		if err := r.pub.Drain(gctx); err != nil {
			return err
		}
		if r.batcher != nil {
			if err := r.batcher.Drain(gctx); err != nil && !errors.Is(err, batcher.ErrClosed) {
				return fmt.Errorf("counters: %w", err)
			}
		}
		if err := r.stream.Drain(gctx); err != nil {
			r.log.Warn("drain: not every transaction was acknowledged; the rest is delivered again after a restart", zap.Error(err))
		}
		return nil
	})
	return g.Wait()
}

// Drain is the soft stop; it returns when Run has, or when ctx ends.
func (r *Role) Drain(ctx context.Context) error { return r.soft.Drain(ctx) }

// Close releases the counter store's connection. Run calls it; it is
// safe to call again.
func (r *Role) Close() {
	r.closeOnce.Do(func() {
		if r.store != nil {
			r.store.Close()
		}
	})
}

func (r *Role) setup(ctx context.Context) error {
	sctx, cancel := context.WithTimeout(ctx, r.cfg.SetupTimeout)
	defer cancel()
	if r.batcher != nil {
		// The repair table is streamed: it must exist first.
		if err := r.store.EnsureSchema(sctx); err != nil {
			return err
		}
	}
	if _, err := bus.EnsureStream(sctx, r.js, r.cfg.Publisher.Stream); err != nil {
		return err
	}
	lost, err := r.checkSlot(sctx)
	if err != nil {
		return err
	}
	if err := r.stream.Setup(sctx); err != nil {
		return fmt.Errorf("set up slot and publication: %w", err)
	}
	if r.batcher != nil {
		if err := r.setupCounters(sctx); err != nil {
			return err
		}
	}
	if lost {
		return r.recover(sctx)
	}
	// A promotion while no tail ran: purge again what was published past
	// the old timeline's end.
	r.stateMu.Lock()
	prev := r.state
	r.stateMu.Unlock()
	if prev.SystemID == r.system.ID && prev.Timeline != 0 && prev.Timeline < r.system.Timeline {
		end, err := r.stream.TimelineEnd(sctx, prev.Timeline, r.system.Timeline)
		if err != nil {
			return err
		}
		if err := r.onTimeline(sctx, wal.TimelineSwitch{From: prev.Timeline, To: r.system.Timeline, SwitchLSN: end}); err != nil {
			return err
		}
	}
	return r.saveState(sctx)
}

// setupCounters counts what the counters' tables held before they were
// configured, and loads the checkpoints.
func (r *Role) setupCounters(sctx context.Context) error {
	if err := r.store.InitCounters(sctx, r.cfg.Counters, r.log.Named("counters")); err != nil {
		return err
	}
	if err := r.batcher.Load(sctx, WALSource, NATSSource(r.cfg.Increments.Name)); err != nil {
		return err
	}
	r.log.Info("counters ready", zap.Strings("counters", r.cfg.Counters.Names()),
		zap.Stringer("wal_checkpoint", r.batcher.Checkpoint(WALSource)))
	return nil
}

// handler is what the WAL stream feeds: the keys, and the counters when
// there are any.
func (r *Role) handler() wal.Handler {
	if r.batcher == nil {
		return r.keys
	}
	return fanout{keys: r.keys, ctr: &counterHandler{set: r.cfg.Counters, b: r.batcher, m: r.ctrm,
		log: r.log.Named("counters"), wait: handlerWait, repairs: r.store.RepairTable()}}
}

// runStream runs the WAL stream until Drain or ctx, or until it fails.
// When a counter flush fails because the primary is going away, it drops
// the replication connection and resumes a moment later: a primary's
// clean shutdown waits until every walsender's client has confirmed all
// the WAL sent to it, which the slot must not do while deltas are
// unflushed, and the flush cannot happen while the server shuts down.
// Without this, a fast shutdown of the primary would hang until the
// walsender is killed. Resuming is safe: the stream delivers again from
// the last confirmed position, and the batcher skips what it holds.
func (r *Role) runStream(ctx context.Context) error {
	h := r.handler()
	for {
		sctx, cancel := context.WithCancel(ctx)
		released := make(chan struct{})
		go func() {
			select {
			case <-r.goingAway:
				if r.stream.Stats().State == wal.StateStreaming {
					r.log.Warn("counters cannot be flushed: the primary is going away; releasing the replication connection so that it can shut down")
				}
				close(released)
				cancel()
			case <-r.soft.Draining():
				cancel()
			case <-sctx.Done():
			}
		}()
		err := r.stream.Run(sctx, h)
		cancel()
		if errors.Is(err, wal.ErrSlotGone) && r.cfg.OnSlotLoss == SlotLossFlush && ctx.Err() == nil {
			// Dropped or invalidated while streaming: a new slot, and a
			// flush of every pool for the stretch in between.
			r.slotLost.Inc()
			r.log.Error("the replication slot was lost while streaming; on_slot_loss: flush", zap.Error(err))
			if rerr := r.recoverRunning(ctx); rerr != nil {
				return fmt.Errorf("%w (recovering: %w)", err, rerr)
			}
			continue
		}
		select {
		case <-released:
		default:
			return err
		}
		if err != nil {
			return err
		}
		select {
		case <-r.soft.Draining():
			return nil
		default:
		}
		if backoff.Wait(ctx, time.Second) != nil {
			return nil
		}
	}
}

// recoverRunning replaces a slot lost while streaming.
func (r *Role) recoverRunning(ctx context.Context) error {
	sctx, cancel := context.WithTimeout(ctx, r.cfg.SetupTimeout)
	defer cancel()
	if err := r.stream.DropSlot(sctx); err != nil {
		return err
	}
	if err := r.stream.Setup(sctx); err != nil {
		return err
	}
	return r.recover(sctx)
}

// goingAwayFlusher tells runStream when the primary is going away.
type goingAwayFlusher struct {
	*counterstore.Store
	signal chan struct{}
}

func (f goingAwayFlusher) Flush(ctx context.Context, b *batcher.Batch) error {
	err := f.Store.Flush(ctx, b)
	if err != nil && !errors.Is(err, batcher.ErrCheckpointMoved) && wal.GoingAway(err) {
		select {
		case f.signal <- struct{}{}:
		default:
		}
	}
	return err
}

func (r *Role) register(reg prometheus.Registerer) {
	if reg == nil {
		return
	}
	s, p := r.stream, r.pub
	gauge := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f)
	}
	b2f := func(b bool) float64 {
		if b {
			return 1
		}
		return 0
	}
	reg.MustRegister(
		gauge("invalidator_slot_lag_bytes", "Server WAL end minus the LSN confirmed to the slot.", func() float64 { return float64(s.Stats().LagBytes) }),
		gauge("invalidator_replication_lag_seconds", "Server send time minus commit time of the last decoded transaction (0 when idle).", func() float64 { return s.Stats().DecodeLag.Seconds() }),
		gauge("invalidator_slot_confirmed_lsn", "LSN confirmed to the slot, as a number.", func() float64 { return float64(s.Stats().ConfirmedLSN) }),
		gauge("invalidator_slot_active", "1 while this process holds the slot and streams.", func() float64 { return b2f(s.Stats().State == wal.StateStreaming) }),
		gauge("invalidator_unacknowledged_transactions", "Transactions delivered by the WAL stream whose keys or deltas are not yet durable.", func() float64 { return float64(s.Stats().Unacked) }),
		gauge("invalidator_publish_in_flight", "Batches published and not yet acked by JetStream.", func() float64 { return float64(p.Stats().InFlight) }),
		gauge("invalidator_publish_uncopied", "Batches stored in this datacenter's stream that wait for their copies in other datacenters before they are confirmed (nats.datacenters).", func() float64 { return float64(p.Stats().Uncopied) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "invalidator_publish_copy_timeouts_total", Help: "Batches confirmed after nats.copy_timeout without all their copies in other datacenters."}, func() float64 { return float64(p.Stats().CopyTimeouts) }),
		gauge("invalidator_publish_copies_behind", "Messages of this datacenter's stream that the other datacenters (the durable_dcs-th copy) do not hold yet.", func() float64 { return float64(p.Stats().CopiesBehind) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "invalidator_published_batches_total", Help: "Batches published since start."}, func() float64 { return float64(p.Stats().Batches) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "invalidator_publish_retries_total", Help: "Batches published again after a failed or missing ack."}, func() float64 { return float64(p.Stats().Retries) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "invalidator_wal_reconnects_total", Help: "Replication connections made again: after a lost connection, or a handler's retry."}, func() float64 { return float64(s.Stats().Reconnects) }),
		uncoveredCollector{s: s, desc: prometheus.NewDesc("invalidator_uncovered_changes_total",
			"Row changes of published tables that no rule or counter covers, dropped, per table.", []string{"table"}, nil)},
	)
}

// uncoveredCollector exports the stream's uncovered changes per table.
type uncoveredCollector struct {
	s    *wal.Stream
	desc *prometheus.Desc
}

func (c uncoveredCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c uncoveredCollector) Collect(ch chan<- prometheus.Metric) {
	for t, n := range c.s.Stats().Uncovered {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.CounterValue, float64(n), t)
	}
}
