// Package batcher aggregates counter deltas in memory, per counter and
// group, and has them written in one transaction per batch (a Flusher):
// an upsert of every pending group together with the input positions the
// batch covers (a checkpoint per source), so that after a crash no delta is
// lost and none is counted twice. It knows nothing of counter rules, the
// WAL or NATS: callers hand it deltas at positions, and it tells them which
// positions are durable. It never logs; it returns errors and stats.
//
// # Positions and exactly once
//
// Every input comes from a source (for example "wal", or
// "nats:COUNTERS") at a position (Pos) that grows with each input of that
// source. The batch transaction stores, per source, the position of the
// last input it holds. Load reads those checkpoints; Add then skips every
// input at or below the source's position (a redelivery after a restart or
// a reconnect), so an input is applied exactly once if its source delivers
// it again in the same order at the same position, which the WAL and a
// JetStream stream both do.
//
// The caller must not drop an input it could not apply before it is
// durable: an Input's Ack is done once every input of its source up to
// its position is committed (or carried no delta). The WAL's confirmed
// LSN moves only with those Acks.
//
// # Bounded memory and backpressure
//
// At most MaxPending groups wait in memory while one batch is being
// written. When the pending groups reach MaxPending, Add blocks until the
// batch in flight has committed and the pending ones were taken for the
// next flush: a slow database slows the input instead of growing memory.
// One input is applied whole, so a single input larger than MaxPending
// (a repair of many groups) may exceed it by its own size.
//
// The Flusher writes a Batch in one transaction; package counterstore is
// the Postgres one (its tables, and how an application reads a counter,
// are documented there).
package batcher

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/pgcache/pgcache/backoff"
	"github.com/prometheus/client_golang/prometheus"
)

// Errors.
var (
	// ErrClosed: Add after Drain, or Drain twice.
	ErrClosed = errors.New("batcher: closed")
	// ErrNotLoaded: Add or Run before Load.
	ErrNotLoaded = errors.New("batcher: checkpoints not loaded")
	// ErrCheckpointMoved: the stored checkpoint is neither where this
	// batcher left it nor where its batch would put it: another process
	// wrote the counters. Run returns it; the caller must restart from
	// Load (its pending deltas are dropped and redelivered).
	ErrCheckpointMoved = errors.New("batcher: checkpoint moved by another writer")
	// ErrPosition: an input's position is not after the last one of its
	// source. Add skips it (it reports false) unless it is a position
	// without data.
	ErrPosition = errors.New("batcher: position not after the last input")
	// ErrBusy: AddWithin waited its limit for the pending groups to be
	// taken by a flush (the database is slow or down). The input was not
	// applied.
	ErrBusy = errors.New("batcher: pending groups not flushed in time")
)

// Pos is a position in one source: Major is an LSN or a stream sequence,
// Minor orders inputs at the same Major (WAL: the change ordinal inside the
// transaction whose commit is at Major; 0 means every input at Major is
// included). Positions compare by Major, then Minor.
type Pos struct {
	Major, Minor uint64
}

// Less reports whether p comes before q.
func (p Pos) Less(q Pos) bool {
	return p.Major < q.Major || (p.Major == q.Major && p.Minor < q.Minor)
}

func (p Pos) String() string { return fmt.Sprintf("%d/%d", p.Major, p.Minor) }

// Delta is a change to one group of one counter. Group identifies the
// group within the counter; Key is the cache key invalidated after the
// flush.
type Delta struct {
	Counter string
	Group   string
	Key     string
	N       int64
}

// Input is everything one source delivered at one position. It applies in
// this order: Resets (every group of each counter set to zero), Sets
// (absolute values), Deltas.
type Input struct {
	Source string
	Pos    Pos
	// Ack (may be nil) is done once this input, and every input of its
	// source before it, is committed or carried nothing: at once for an
	// input already durable, after the flush that holds it otherwise.
	// Add takes it only when it returns no error.
	Ack Ack
	// Time is when the input happened (a commit time); the lag metric
	// measures from it. Zero: when Add is called.
	Time   time.Time
	Resets []string
	Sets   []Delta
	Deltas []Delta
}

func (in *Input) empty() bool { return len(in.Resets)+len(in.Sets)+len(in.Deltas) == 0 }

// Group is one group's change in a Batch: N is added to the stored count,
// or, when Set, replaces it.
type Group struct {
	Counter, Group, Key string
	N                   int64
	Set                 bool
}

// Checkpoint moves one source's stored position from Prev to Pos.
type Checkpoint struct {
	Source    string
	Prev, Pos Pos
}

// Batch is one flush: Resets first (delete every group of those counters),
// then Groups, then the Checkpoints, all in one transaction.
type Batch struct {
	Resets      []string
	Groups      []Group
	Checkpoints []Checkpoint
}

// Flusher stores batches. Lifecycle: Load once before the first Flush;
// Flush is called by one goroutine at a time, and may be called again with
// the same batch after an error (it must then detect a batch that had in
// fact committed: see ErrCheckpointMoved and PG.Flush).
type Flusher interface {
	// Load returns the stored checkpoint of each source (zero when none).
	Load(ctx context.Context, sources []string) (map[string]Pos, error)
	// Flush applies b atomically.
	Flush(ctx context.Context, b *Batch) error
}

// Config tunes batching.
type Config struct {
	// MaxPending is how many groups may wait before a flush is started
	// and, while a flush is in flight, before Add blocks. 0 means 10000.
	MaxPending int
	// Interval is the longest a delta waits before its flush starts. 0
	// means 100ms.
	Interval time.Duration
	// RetryMin and RetryMax bound the backoff between failed flushes. 0
	// means 50ms and 5s.
	RetryMin, RetryMax time.Duration
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{MaxPending: 10000, Interval: 100 * time.Millisecond, RetryMin: 50 * time.Millisecond, RetryMax: 5 * time.Second}
}

func (c Config) withDefaults() Config {
	d := DefaultConfig()
	if c.MaxPending == 0 {
		c.MaxPending = d.MaxPending
	}
	if c.Interval == 0 {
		c.Interval = d.Interval
	}
	if c.RetryMin == 0 {
		c.RetryMin = d.RetryMin
	}
	if c.RetryMax == 0 {
		c.RetryMax = d.RetryMax
	}
	return c
}

// Validate checks c with zero fields taken as defaults.
func (c Config) Validate() error {
	c = c.withDefaults()
	if c.MaxPending < 1 {
		return fmt.Errorf("batcher: config: MaxPending (%d) must be positive", c.MaxPending)
	}
	if c.Interval < 0 || c.RetryMin < 0 || c.RetryMax < 0 {
		return errors.New("batcher: config: durations must not be negative")
	}
	if c.RetryMin > c.RetryMax {
		return fmt.Errorf("batcher: config: RetryMin (%s) cannot be larger than RetryMax (%s)", c.RetryMin, c.RetryMax)
	}
	return nil
}

// Metrics are the batcher's Prometheus collectors. Their names are fixed:
// alert rules use them.
type Metrics struct {
	Flushes       prometheus.Counter   // invalidator_batcher_flushes_total
	FlushErrors   prometheus.Counter   // invalidator_batcher_flush_errors_total
	Deltas        prometheus.Counter   // invalidator_batcher_deltas_total
	PendingGroups prometheus.Gauge     // invalidator_batcher_pending_groups
	Lag           prometheus.Gauge     // invalidator_batcher_lag_seconds
	FlushSeconds  prometheus.Histogram // invalidator_batcher_flush_seconds
}

// NewMetrics creates the collectors and registers them with reg (nil: not
// registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Flushes:       prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_batcher_flushes_total", Help: "Counter batches committed."}),
		FlushErrors:   prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_batcher_flush_errors_total", Help: "Counter batch flushes that failed (each is retried)."}),
		Deltas:        prometheus.NewCounter(prometheus.CounterOpts{Name: "invalidator_batcher_deltas_total", Help: "Counter deltas (and set values) absorbed."}),
		PendingGroups: prometheus.NewGauge(prometheus.GaugeOpts{Name: "invalidator_batcher_pending_groups", Help: "Counter groups waiting to be flushed, in flight included."}),
		Lag:           prometheus.NewGauge(prometheus.GaugeOpts{Name: "invalidator_batcher_lag_seconds", Help: "Now minus the commit time of the oldest delta not yet flushed; 0 when nothing is pending."}),
		FlushSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "invalidator_batcher_flush_seconds", Help: "Duration of one counter batch transaction.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14)}),
	}
	if reg != nil {
		reg.MustRegister(m.Flushes, m.FlushErrors, m.Deltas, m.PendingGroups, m.Lag, m.FlushSeconds)
	}
	return m
}

// Stats is a snapshot for metrics and tests.
type Stats struct {
	Flushes, FlushErrors, Deltas, Skipped uint64
	PendingGroups                         int           // pending plus in flight
	Lag                                   time.Duration // see invalidator_batcher_lag_seconds
}

// batch is a set of pending groups.
type batch struct {
	groups map[string]*Group // by counter + "\x00" + group
	resets map[string]bool
	pos    map[string]Pos  // last position per source
	has    map[string]bool // sources with data in the batch
	oldest time.Time       // earliest input time with data
	first  time.Time       // when the first data arrived
}

func newBatch() *batch {
	return &batch{groups: map[string]*Group{}, resets: map[string]bool{}, pos: map[string]Pos{}, has: map[string]bool{}}
}

func (b *batch) dirty() bool { return len(b.groups) > 0 || len(b.resets) > 0 }

// Batcher aggregates deltas and flushes them. Lifecycle: New, Load, then
// Run in a goroutine and Add from any goroutines; Drain for a soft stop
// (flush everything, then Run returns), or cancel Run's ctx for a hard
// stop (pending deltas are dropped; their inputs are redelivered since
// they were never reported durable).
type Batcher struct {
	cfg Config
	fl  Flusher
	m   *Metrics

	mu       sync.Mutex // guards everything below
	loaded   bool
	closed   bool // Drain called: no more input
	hw       map[string]Pos
	stored   map[string]Pos
	durable  map[string]Pos
	pend     *batch
	flushing *batch              // nil when no flush is in flight
	swapped  chan struct{}       // closed when pend is taken for a flush (or on drain)
	drained  chan struct{}       // closed when Run has flushed everything after Drain
	stats    Stats               // counters only
	waiting  map[string][]waiter // Acks of inputs not yet durable, per source, by position
	kick     chan struct{}       // wakes Run
	runDone  chan struct{}       // closed when Run returns
	runOnce  sync.Once
}

// Ack is the acknowledgement of an input (wal.Ack implements it).
type Ack interface{ Done() }

// waiter is an input's Ack waiting for its position to be durable.
type waiter struct {
	pos Pos
	ack Ack
}

// New returns a batcher writing with fl. m may be nil.
func New(cfg Config, fl Flusher, m *Metrics) (*Batcher, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if fl == nil {
		return nil, errors.New("batcher: nil Flusher")
	}
	if m == nil {
		m = NewMetrics(nil)
	}
	return &Batcher{
		cfg: cfg.withDefaults(), fl: fl, m: m, waiting: map[string][]waiter{},
		hw: map[string]Pos{}, stored: map[string]Pos{}, durable: map[string]Pos{},
		pend: newBatch(), swapped: make(chan struct{}), drained: make(chan struct{}),
		kick: make(chan struct{}, 1), runDone: make(chan struct{}),
	}, nil
}

// Load reads the stored checkpoints of sources; inputs of other sources
// start from zero. It may be called again, for example when a hot
// standby takes over from a process that went on writing: a source with
// nothing pending or in flight then moves to the stored checkpoint if it
// is ahead (positions never move back).
func (b *Batcher) Load(ctx context.Context, sources ...string) error {
	cps, err := b.fl.Load(ctx, sources)
	if err != nil {
		return fmt.Errorf("batcher: load checkpoints: %w", err)
	}
	defer b.report() // Acks of inputs the stored checkpoints cover
	b.mu.Lock()
	defer b.mu.Unlock()
	for src, p := range cps {
		if b.pend.has[src] || (b.flushing != nil && b.flushing.has[src]) {
			continue
		}
		if b.stored[src].Less(p) {
			b.stored[src] = p
		}
		if b.hw[src].Less(p) {
			b.hw[src] = p
		}
		if b.durable[src].Less(p) {
			b.durable[src] = p
		}
	}
	b.loaded = true
	return nil
}

// Checkpoint returns the position after which a source's inputs are
// accepted: the stored checkpoint, or a later input already added.
func (b *Batcher) Checkpoint(source string) Pos {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.hw[source]
}

// Durable returns the source's durable position (see New).
func (b *Batcher) Durable(source string) Pos {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.durable[source]
}

// Add applies one input. It reports false, and does nothing, when the
// input is at or below the source's last position (a redelivery). It
// blocks while MaxPending groups are pending and a flush is in flight
// (backpressure); it returns ctx's error if ctx ends first, and ErrClosed
// after Drain.
func (b *Batcher) Add(ctx context.Context, in Input) (bool, error) {
	return b.add(ctx, in, 0)
}

// AddWithin is Add with a limit on the backpressure wait: after limit it
// returns ErrBusy, the input not applied. A caller that holds something
// the flush may need (a replication connection to the primary being
// restarted) lets go of it and comes back.
func (b *Batcher) AddWithin(ctx context.Context, in Input, limit time.Duration) (bool, error) {
	return b.add(ctx, in, limit)
}

// add is Add; limit > 0 bounds the backpressure wait. Its timer is made
// only when the wait begins, off the fast path.
func (b *Batcher) add(ctx context.Context, in Input, limit time.Duration) (bool, error) {
	var expired <-chan time.Time
	b.mu.Lock()
	if err := b.usable(); err != nil {
		b.mu.Unlock()
		return false, err
	}
	if !b.hw[in.Source].Less(in.Pos) {
		// Added before (a redelivery): its Ack waits for the first
		// delivery's flush, or is done now if that committed.
		b.stats.Skipped++
		b.waitLocked(in)
		b.mu.Unlock()
		b.report()
		return false, nil
	}
	if in.empty() {
		b.hw[in.Source] = in.Pos
		if !b.pend.has[in.Source] && (b.flushing == nil || !b.flushing.has[in.Source]) {
			b.durable[in.Source] = in.Pos
		}
		b.pend.pos[in.Source] = in.Pos
		b.waitLocked(in)
		b.mu.Unlock()
		b.report()
		return true, nil
	}
	// Backpressure: wait until the pending groups are taken for a flush.
	for len(b.pend.groups) >= b.cfg.MaxPending {
		ch := b.swapped
		b.wake()
		b.mu.Unlock()
		if limit > 0 && expired == nil {
			t := time.NewTimer(limit)
			defer t.Stop()
			expired = t.C
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return false, ctx.Err()
		case <-expired:
			return false, fmt.Errorf("%w: %d groups pending for %s", ErrBusy, b.cfg.MaxPending, limit)
		}
		b.mu.Lock()
		if err := b.usable(); err != nil {
			b.mu.Unlock()
			return false, err
		}
		if !b.hw[in.Source].Less(in.Pos) {
			b.mu.Unlock()
			return false, fmt.Errorf("%w: %s at %s", ErrPosition, in.Source, in.Pos)
		}
	}
	p := b.pend
	for _, c := range in.Resets {
		for k, g := range p.groups {
			if g.Counter == c {
				delete(p.groups, k)
			}
		}
		p.resets[c] = true
	}
	for _, d := range in.Sets {
		g := p.group(d)
		g.N, g.Set = d.N, true
	}
	for _, d := range in.Deltas {
		p.group(d).N += d.N
	}
	now := time.Now()
	t := in.Time
	if t.IsZero() {
		t = now
	}
	if p.oldest.IsZero() || t.Before(p.oldest) {
		p.oldest = t
	}
	if p.first.IsZero() {
		p.first = now
	}
	p.has[in.Source] = true
	p.pos[in.Source] = in.Pos
	b.hw[in.Source] = in.Pos
	b.waitLocked(in)
	n := uint64(len(in.Sets) + len(in.Deltas))
	b.stats.Deltas += n
	pending := len(p.groups)
	if b.flushing != nil {
		pending += len(b.flushing.groups)
	}
	if len(p.groups) >= b.cfg.MaxPending {
		b.wake()
	}
	b.mu.Unlock()
	b.m.Deltas.Add(float64(n))
	b.m.PendingGroups.Set(float64(pending))
	return true, nil
}

func (b *Batcher) usable() error {
	if b.closed {
		return ErrClosed
	}
	if !b.loaded {
		return ErrNotLoaded
	}
	return nil
}

// group returns the pending group of d, created if missing. A new group
// of a counter reset in this batch starts from zero (Set).
func (p *batch) group(d Delta) *Group {
	k := d.Counter + "\x00" + d.Group
	g := p.groups[k]
	if g == nil {
		g = &Group{Counter: d.Counter, Group: d.Group, Key: d.Key, Set: p.resets[d.Counter]}
		p.groups[k] = g
	}
	return g
}

func (b *Batcher) wake() {
	select {
	case b.kick <- struct{}{}:
	default:
	}
}

// waitLocked queues in's Ack until its position is durable. b.mu is held.
func (b *Batcher) waitLocked(in Input) {
	if in.Ack == nil {
		return
	}
	ws := b.waiting[in.Source]
	i := sort.Search(len(ws), func(i int) bool { return in.Pos.Less(ws[i].pos) })
	ws = append(ws, waiter{})
	copy(ws[i+1:], ws[i:])
	ws[i] = waiter{pos: in.Pos, ack: in.Ack}
	b.waiting[in.Source] = ws
}

// releaseLocked takes the Acks whose positions are durable. b.mu is held.
func (b *Batcher) releaseLocked() []Ack {
	var done []Ack
	for src, ws := range b.waiting {
		d := b.durable[src]
		n := 0
		for n < len(ws) && !d.Less(ws[n].pos) {
			done = append(done, ws[n].ack)
			n++
		}
		if n == len(ws) {
			delete(b.waiting, src)
		} else if n > 0 {
			b.waiting[src] = slices.Delete(ws, 0, n)
		}
	}
	return done
}

// report does the Acks of the inputs that became durable.
func (b *Batcher) report() {
	b.mu.Lock()
	done := b.releaseLocked()
	b.mu.Unlock()
	for _, a := range done {
		a.Done()
	}
}

// Drain flushes everything pending and waits for it; Run then returns.
// Add fails with ErrClosed afterwards.
func (b *Batcher) Drain(ctx context.Context) error {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return ErrClosed
	}
	b.closed = true
	close(b.swapped) // wake blocked Adds: they fail with ErrClosed
	b.swapped = make(chan struct{})
	b.mu.Unlock()
	b.wake()
	select {
	case <-b.drained:
		return nil
	case <-b.runDone:
		select {
		case <-b.drained:
			return nil
		default:
		}
		return errors.New("batcher: Run stopped before the drain finished")
	case <-ctx.Done():
		return fmt.Errorf("batcher: drain: %w", ctx.Err())
	}
}

// Stats returns counters for metrics and tests.
func (b *Batcher) Stats() Stats {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.stats
	s.PendingGroups = len(b.pend.groups)
	oldest := b.pend.oldest
	if f := b.flushing; f != nil {
		s.PendingGroups += len(f.groups)
		if !f.oldest.IsZero() {
			oldest = f.oldest
		}
	}
	if !oldest.IsZero() && (b.pend.dirty() || b.flushing != nil) {
		s.Lag = max(0, time.Since(oldest))
	}
	return s
}

// Run flushes pending groups when MaxPending are pending or the oldest has
// waited Interval, until ctx ends (hard stop: it returns nil and drops
// what is pending) or a Drain completes (nil). A failed flush is retried
// with backoff; ErrCheckpointMoved is returned.
func (b *Batcher) Run(ctx context.Context) error {
	b.mu.Lock()
	if !b.loaded {
		b.mu.Unlock()
		return ErrNotLoaded
	}
	b.mu.Unlock()
	defer b.runOnce.Do(func() { close(b.runDone) })
	tick := min(max(b.cfg.Interval/4, time.Millisecond), time.Second)
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		b.mu.Lock()
		draining := b.closed
		b.mu.Unlock()
		if !draining {
			select {
			case <-ctx.Done():
				return nil
			case <-t.C:
			case <-b.kick:
			}
		} else if ctx.Err() != nil {
			return nil
		}
		b.mu.Lock()
		draining = b.closed
		p := b.pend
		due := p.dirty() && (draining || len(p.groups) >= b.cfg.MaxPending || time.Since(p.first) >= b.cfg.Interval)
		if !due {
			b.mu.Unlock()
			b.updateGauges()
			if draining && !p.dirty() {
				close(b.drained)
				return nil
			}
			continue
		}
		b.flushing = p
		b.pend = newBatch()
		close(b.swapped)
		b.swapped = make(chan struct{})
		bt := b.build(p)
		b.mu.Unlock()
		b.updateGauges()

		if err := b.flush(ctx, bt); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		b.mu.Lock()
		for _, c := range bt.Checkpoints {
			b.stored[c.Source] = c.Pos
			if b.durable[c.Source].Less(c.Pos) {
				b.durable[c.Source] = c.Pos
			}
		}
		// Positions without data that arrived during the flush.
		for src, pos := range b.pend.pos {
			if !b.pend.has[src] && b.durable[src].Less(pos) {
				b.durable[src] = pos
			}
		}
		b.flushing = nil
		b.stats.Flushes++
		b.mu.Unlock()
		b.m.Flushes.Inc()
		b.updateGauges()
		b.report()
	}
}

// build turns p into a Batch; b.mu is held.
func (b *Batcher) build(p *batch) *Batch {
	bt := &Batch{Groups: make([]Group, 0, len(p.groups))}
	for c := range p.resets {
		bt.Resets = append(bt.Resets, c)
	}
	sort.Strings(bt.Resets)
	for _, g := range p.groups {
		bt.Groups = append(bt.Groups, *g)
	}
	// A fixed order keeps concurrent writers of the same rows (a repair)
	// from deadlocking with a flush.
	sort.Slice(bt.Groups, func(i, j int) bool {
		a, c := &bt.Groups[i], &bt.Groups[j]
		if a.Counter != c.Counter {
			return a.Counter < c.Counter
		}
		return a.Group < c.Group
	})
	for src, pos := range p.pos {
		bt.Checkpoints = append(bt.Checkpoints, Checkpoint{Source: src, Prev: b.stored[src], Pos: pos})
	}
	sort.Slice(bt.Checkpoints, func(i, j int) bool { return bt.Checkpoints[i].Source < bt.Checkpoints[j].Source })
	return bt
}

// flush writes bt, retrying with backoff until it commits, ctx ends, or
// the checkpoint moved.
func (b *Batcher) flush(ctx context.Context, bt *Batch) error {
	for attempt := 0; ; attempt++ {
		start := time.Now()
		err := b.fl.Flush(ctx, bt)
		b.m.FlushSeconds.Observe(time.Since(start).Seconds())
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		b.mu.Lock()
		b.stats.FlushErrors++
		b.mu.Unlock()
		b.m.FlushErrors.Inc()
		if errors.Is(err, ErrCheckpointMoved) {
			return err
		}
		if err := (backoff.Policy{Min: b.cfg.RetryMin, Max: b.cfg.RetryMax}).Sleep(ctx, attempt); err != nil {
			return err
		}
	}
}

func (b *Batcher) updateGauges() {
	s := b.Stats()
	b.m.PendingGroups.Set(float64(s.PendingGroups))
	b.m.Lag.Set(s.Lag.Seconds())
}
