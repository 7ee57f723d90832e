// Package purge applies invalidation batches to one datacenter's
// memcached pool: it waits for the datacenter's replica to replay each
// transaction (the LSN gate), splits every batch's keys by server and
// hands them to one worker per server, which deletes (or stale-marks)
// everything queued for its server as one pipelined chain of quiet
// deletes and retries failures with exponential backoff and jitter. A
// batch is acked only when each of its keys is applied, or durably
// recorded for a server that is down (see Backlog), so a dead server
// holds up only its own keys. When the gate gives up on a lagging
// replica, the batch is purged at once and again once the replica has
// replayed its commit (see Replayer). It leaves WAL decoding, message
// transport and key placement to others.
package purge

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/semaphore"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/mckey"
)

// Modes of applying a key.
const (
	ModeDelete = "delete" // delete the key
	ModeStale  = "stale"  // mark it stale (md I T<n>), for leaseproxy's stale serving
)

// Errors.
var (
	// ErrConfig wraps every configuration error.
	ErrConfig = errors.New("purge: bad config")
	// ErrClosed is returned by Handle once Drain or Close has begun: the
	// delivery is not acked and comes again.
	ErrClosed = errors.New("purge: purger closed")
)

// Deleter applies keys to one datacenter's pool; mcpool.Pool implements
// it. Servers are numbered 0..Servers()-1 as Pick numbers them.
type Deleter interface {
	Servers() int
	Addr(server int) string
	Pick(key string) int
	// DeleteMultiOn and MarkStaleMultiOn apply keys that all live on
	// server (as Pick placed them) and return one error per key; a key
	// that is not there counts as applied. Errors are retried.
	DeleteMultiOn(ctx context.Context, server int, keys []string) []error
	MarkStaleMultiOn(ctx context.Context, server int, keys []string, ttl time.Duration) []error
	// NoOp checks that a server answers.
	NoOp(ctx context.Context, server int) error
	// FlushAll empties a server.
	FlushAll(ctx context.Context, server int) error
}

// Acker acknowledges one delivered batch; bus.Delivery implements it.
type Acker interface {
	Ack(ctx context.Context) error // every key applied or recorded
	InProgress() error             // still working: do not redeliver yet
}

// Waiter is the LSN gate; Gate implements it.
type Waiter interface {
	Wait(ctx context.Context, commitLSN, endLSN uint64) error
}

// passer is a Waiter that can tell without waiting that a commit is
// replayed; Gate is one.
type passer interface {
	Passed(commitLSN, endLSN uint64) bool
}

// Replayer is a Waiter that can also wait with no time limit; Gate is
// one. With such a gate the purger purges a batch a second time once the
// replica has replayed its commit, when the first purge went ahead
// because the gate timed out: a reader that refilled from the lagging
// replica in between stored the old row, and the second purge removes
// it.
type Replayer interface {
	WaitReplay(ctx context.Context, commitLSN, endLSN uint64) error
}

// Config configures one datacenter's purger. Zero fields take the
// defaults of DefaultConfig.
type Config struct {
	DC   string
	Mode string // ModeDelete (default) or ModeStale
	// StaleTTL is the TTL given to a stale-marked item (T flag): how long
	// it may be served stale while one client refills it. 0 means 30s.
	StaleTTL time.Duration
	// MaxBatches is the number of batches being applied at once; beyond it
	// Handle blocks (and so stops reading the stream). 0 means 1024.
	MaxBatches int
	// MaxBytes bounds the memory of the batches being applied at once,
	// counted as their keys' bytes plus 32 per key; beyond it Handle
	// blocks. A batch larger than MaxBytes is taken alone. 0 means 4 MiB
	// (about 95,000 keys of 10 bytes: at a million keys a second, far
	// more than the gate's and memcached's round trips need in flight).
	// The purge role gives its consumer a quarter of it for messages
	// pulled and not yet handled.
	MaxBytes int64
	// MaxChunk is the most keys one server's worker sends in one
	// pipelined chain. 0 means 4096.
	MaxChunk int
	// Timeout bounds one attempt at a server (a chain of deletes, a
	// probe, a flush), whatever the ctx's deadline. 0 means 1s.
	Timeout time.Duration
	// RetryMin and RetryMax bound the backoff between attempts at a
	// server's failed keys. 0 means 10ms and 5s.
	RetryMin, RetryMax time.Duration
	// Progress is how often a batch still being applied tells JetStream it
	// is alive, so that it is not redelivered. 0 means 10s. It must be
	// below the consumer's AckWait.
	Progress time.Duration
	// RecordAfter is how long a server may fail every attempt before its
	// keys are recorded in the Backlog instead of retried (so their
	// batches can be acked). 0 means 2s. Without a Backlog keys are
	// retried until the server answers.
	RecordAfter time.Duration
	// MaxRePurgeBytes bounds the keys held in memory for a second purge
	// after gate timeouts, in bytes of keys; beyond it keys are not
	// purged a second time (counted in RePurgeDropped). 0 means 16 MiB.
	MaxRePurgeBytes int64
	// MaxBacklogBytes bounds the keys recorded for one down server, in
	// bytes of keys. Past it the server is marked for a flush_all when it
	// returns, and its further keys are not recorded (the flush covers
	// them). 0 means 64 MiB.
	MaxBacklogBytes int64
}

// DefaultConfig returns the defaults.
func DefaultConfig() Config {
	return Config{Mode: ModeDelete, StaleTTL: 30 * time.Second, MaxBatches: 1024, MaxBytes: 4 << 20, MaxChunk: 4096,
		Timeout: time.Second, RetryMin: 10 * time.Millisecond, RetryMax: 5 * time.Second, Progress: 10 * time.Second,
		RecordAfter: 2 * time.Second, MaxBacklogBytes: 64 << 20, MaxRePurgeBytes: 16 << 20}
}

// Validate checks the configuration.
func (c Config) Validate() error {
	switch {
	case c.DC == "":
		return fmt.Errorf("%w: dc is empty", ErrConfig)
	case c.Mode != ModeDelete && c.Mode != ModeStale:
		return fmt.Errorf("%w: mode %q: want %q or %q", ErrConfig, c.Mode, ModeDelete, ModeStale)
	case c.MaxBatches < 1 || c.MaxChunk < 1 || c.MaxBytes < 1:
		return fmt.Errorf("%w: max batches (%d), max bytes (%d) and max chunk (%d) must be positive", ErrConfig, c.MaxBatches, c.MaxBytes, c.MaxChunk)
	case c.RetryMin <= 0 || c.RetryMax < c.RetryMin:
		return fmt.Errorf("%w: retry min (%s) must be positive and not above retry max (%s)", ErrConfig, c.RetryMin, c.RetryMax)
	case c.StaleTTL < time.Second:
		return fmt.Errorf("%w: stale ttl (%s) must be at least 1s", ErrConfig, c.StaleTTL)
	case c.Progress <= 0 || c.RecordAfter <= 0 || c.Timeout <= 0:
		return fmt.Errorf("%w: progress (%s), record after (%s) and timeout (%s) must be positive", ErrConfig, c.Progress, c.RecordAfter, c.Timeout)
	case c.MaxBacklogBytes < mckey.MaxLen || c.MaxRePurgeBytes < mckey.MaxLen:
		return fmt.Errorf("%w: max backlog bytes (%d) and max re-purge bytes (%d) must hold at least one key", ErrConfig, c.MaxBacklogBytes, c.MaxRePurgeBytes)
	}
	return nil
}

func (c *Config) defaults() {
	d := DefaultConfig()
	set := func(v *time.Duration, def time.Duration) {
		if *v == 0 {
			*v = def
		}
	}
	if c.Mode == "" {
		c.Mode = d.Mode
	}
	if c.MaxBatches == 0 {
		c.MaxBatches = d.MaxBatches
	}
	if c.MaxChunk == 0 {
		c.MaxChunk = d.MaxChunk
	}
	if c.MaxBytes == 0 {
		c.MaxBytes = d.MaxBytes
	}
	if c.MaxBacklogBytes == 0 {
		c.MaxBacklogBytes = d.MaxBacklogBytes
	}
	if c.MaxRePurgeBytes == 0 {
		c.MaxRePurgeBytes = d.MaxRePurgeBytes
	}
	set(&c.StaleTTL, d.StaleTTL)
	set(&c.Timeout, d.Timeout)
	set(&c.RetryMin, d.RetryMin)
	set(&c.RetryMax, d.RetryMax)
	set(&c.Progress, d.Progress)
	set(&c.RecordAfter, d.RecordAfter)
}

// Purger applies batches to one datacenter's pool.
//
// Lifecycle: New; Run(ctx) in a goroutine (it runs the per-server
// workers and returns when ctx ends, or after Drain); Handle for every
// delivery, from the consumer's goroutine; then Drain(ctx) for a soft
// stop (every batch received is finished, then Run returns) or cancel
// Run's ctx for a hard stop (unfinished batches are not acked and come
// again); Close, which is idempotent, stops everything and waits for
// every goroutine the purger started.
type Purger struct {
	cfg  Config
	del  Deleter
	gate Waiter // nil: no gate
	log  *zap.Logger
	m    *Metrics
	// backlog records keys of down servers; nil: they are retried.
	backlog Backlog

	workers []*worker
	batches chan struct{}       // semaphore: batches in progress
	mem     *semaphore.Weighted // bytes of the batches in progress
	again   *rePurge            // nil: the gate cannot wait with no limit

	mu       sync.Mutex // guards draining, closed, and wg.Add against Close's wg.Wait
	draining bool
	closed   bool

	inflight  sync.WaitGroup // batches in progress
	wg        sync.WaitGroup // every goroutine started by Handle and Run
	closing   chan struct{}  // closed by Close
	closeOnce sync.Once
	drained   chan struct{} // closed when Drain has finished every batch
	drainOnce sync.Once
	stopped   chan struct{} // closed when Run's workers have stopped
	stopOnce  sync.Once
	startOnce sync.Once // Run runs once
}

// New validates cfg (zero fields take DefaultConfig's values) and
// returns a purger of del's servers. gate may be nil (no LSN gate); m
// may be nil (metrics not registered).
func New(cfg Config, del Deleter, gate Waiter, m *Metrics, log *zap.Logger) (*Purger, error) {
	cfg.defaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if del == nil || del.Servers() < 1 {
		return nil, fmt.Errorf("%w: no pool", ErrConfig)
	}
	if m == nil {
		m = NewMetrics(nil, cfg.DC)
	}
	if log == nil {
		log = zap.NewNop()
	}
	p := &Purger{cfg: cfg, del: del, gate: gate, log: log, m: m,
		batches: make(chan struct{}, cfg.MaxBatches), mem: semaphore.NewWeighted(cfg.MaxBytes),
		closing: make(chan struct{}), drained: make(chan struct{}),
		stopped: make(chan struct{})}
	for i := 0; i < del.Servers(); i++ {
		p.workers = append(p.workers, newWorker(p, i, del.Addr(i)))
	}
	ws := p.workers
	m.servers.workers.Store(&ws)
	if r, ok := gate.(Replayer); ok {
		p.again = newRePurge(p, r)
	}
	return p, nil
}

// Run runs one worker per server until ctx ends, Close is called, or
// Drain has finished every batch. It returns nil then: a hard stop
// (ctx) leaves unfinished batches unacked.
func (p *Purger) Run(ctx context.Context) error {
	first := false
	p.startOnce.Do(func() { first = true })
	if !first {
		return errors.New("purge: Run called twice")
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.wg.Add(1) // Run itself: Close waits for it
	p.mu.Unlock()
	defer p.wg.Done()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var workers sync.WaitGroup
	for _, w := range p.workers {
		workers.Add(1)
		go func() {
			defer workers.Done()
			w.run(ctx)
		}()
		if p.backlog != nil {
			workers.Add(1)
			go func() {
				defer workers.Done()
				w.loadBacklog(ctx)
			}()
		}
	}
	if p.again != nil {
		workers.Add(1)
		go func() {
			defer workers.Done()
			p.again.run(ctx)
		}()
	}
	select {
	case <-ctx.Done():
	case <-p.closing:
	case <-p.drained:
	}
	cancel()
	workers.Wait()
	p.stopOnce.Do(func() { close(p.stopped) })
	return nil
}

// Handle starts applying one delivered batch, acked through d once each
// key is applied (or recorded for a down server). It blocks while
// MaxBatches are in progress, which stops the consumer from reading
// more. ctx bounds the batch's work: when it ends first, the batch is
// not acked and comes again. After Drain or Close it returns ErrClosed.
func (p *Purger) Handle(ctx context.Context, b *bus.Batch, d Acker) error {
	p.mu.Lock()
	if p.draining {
		p.mu.Unlock()
		return ErrClosed
	}
	p.inflight.Add(1)
	p.mu.Unlock()
	select {
	case p.batches <- struct{}{}:
	case <-ctx.Done():
		p.inflight.Done()
		return ctx.Err()
	case <-p.closing:
		p.inflight.Done()
		return ErrClosed
	}
	handled := time.Now()
	size := batchBytes(b, p.cfg.MaxBytes)
	if err := p.acquire(ctx, size); err != nil {
		<-p.batches
		p.inflight.Done()
		return err
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		p.mem.Release(size)
		<-p.batches
		p.inflight.Done()
		return ErrClosed
	}
	p.wg.Add(1)
	p.mu.Unlock()
	go func() {
		defer p.wg.Done()
		defer p.inflight.Done()
		defer func() { <-p.batches }()
		defer p.mem.Release(size)
		p.m.stHandle.Observe(time.Since(handled).Seconds())
		p.apply(ctx, b, d)
	}()
	return nil
}

// batchBytes is what a batch counts against MaxBytes (at most max).
func batchBytes(b *bus.Batch, max int64) int64 {
	n := int64(64)
	for _, k := range b.Keys {
		n += int64(len(k)) + 32
	}
	return min(n, max)
}

// acquire takes n bytes of MaxBytes, waiting while ctx lasts and the
// purger is open.
func (p *Purger) acquire(ctx context.Context, n int64) error {
	if p.mem.TryAcquire(n) {
		return nil
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if !p.goTracked(func() {
		select {
		case <-p.closing:
			cancel()
		case <-ctx.Done():
		}
	}) {
		return ErrClosed
	}
	if err := p.mem.Acquire(ctx, n); err != nil {
		select {
		case <-p.closing:
			return ErrClosed
		default:
		}
		return err
	}
	return nil
}

// Drain is the soft stop: Handle takes no more batches, every batch
// already taken is finished (applied or recorded, and acked), and then
// Run returns. It returns ctx's error if ctx ends first (the batches
// left are not acked and come again).
func (p *Purger) Drain(ctx context.Context) error {
	p.mu.Lock()
	p.draining = true
	p.mu.Unlock()
	done := make(chan struct{})
	if !p.goTracked(func() {
		p.inflight.Wait()
		close(done)
	}) {
		return ErrClosed
	}
	select {
	case <-done:
		p.drainOnce.Do(func() { close(p.drained) })
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-p.closing:
		return ErrClosed
	}
}

// goTracked runs f in a goroutine that Close waits for; false (and f
// not run) once Close has begun.
func (p *Purger) goTracked(f func()) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		f()
	}()
	return true
}

// Close stops the purger at once (batches not finished are not acked)
// and waits for every goroutine it started. It is safe to call twice.
func (p *Purger) Close() {
	p.mu.Lock()
	p.draining, p.closed = true, true
	p.mu.Unlock()
	p.closeOnce.Do(func() { close(p.closing) })
	p.wg.Wait()
}

// Stats returns each server's pending state, in server order.
func (p *Purger) Stats() []ServerStats {
	now := time.Now()
	out := make([]ServerStats, len(p.workers))
	for i, w := range p.workers {
		out[i] = w.stats(now)
	}
	return out
}

// tracker follows one batch's parts: done is closed when the last part
// is applied or recorded.
type tracker struct {
	mu        sync.Mutex // guards remaining
	remaining int
	done      chan struct{}
}

func (t *tracker) finish() {
	t.mu.Lock()
	t.remaining--
	last := t.remaining == 0
	t.mu.Unlock()
	if last {
		close(t.done)
	}
}

func (p *Purger) apply(ctx context.Context, b *bus.Batch, d Acker) {
	if b.Flush {
		p.applyFlush(ctx, b, d)
		return
	}
	keys := p.validKeys(b)
	p.m.Pending.Add(float64(len(keys)))
	defer p.m.Pending.Sub(float64(len(keys)))

	// Tell JetStream the batch is alive while the gate or a slow server
	// holds it.
	progress := time.NewTicker(p.cfg.Progress)
	defer progress.Stop()

	if tg, ok := p.gate.(timelineWaiter); ok && len(keys) > 0 && b.Timeline > 0 {
		// Positions are compared on the batch's timeline only.
		_ = tg.WaitTimeline(ctx, b.Timeline)
	}
	if pg, ok := p.gate.(passer); ok && len(keys) > 0 && pg.Passed(b.CommitLSN, b.EndLSN) {
		// The hot path: the replica was already seen past the commit,
		// so no goroutine waits on the gate.
		p.m.GateWait.Observe(0)
	} else if p.gate != nil && len(keys) > 0 {
		begin := time.Now()
		err := p.waitGate(ctx, b, d, progress.C)
		p.m.GateWait.Observe(time.Since(begin).Seconds())
		switch {
		case errors.Is(err, ErrGateTimeout):
			p.m.GateTimeout.Inc()
			p.log.Debug("purging without the replica's replay (gate timed out)", zap.Uint64("commit_lsn", b.CommitLSN), zap.Error(err))
			if p.again != nil {
				p.again.add(ctx, b.CommitLSN, b.EndLSN, keys)
			}
		case err != nil:
			return // ctx ended: not acked, delivered again
		}
	}

	if len(keys) > 0 {
		begin := time.Now()
		t := p.submit(keys)
	wait:
		for {
			select {
			case <-t.done:
				break wait
			case <-progress.C:
				_ = d.InProgress()
			case <-ctx.Done():
				return // not acked: delivered again
			case <-p.closing:
				return
			case <-p.stopped:
				return // the workers stopped (hard stop)
			}
		}
		p.m.stApply.Observe(time.Since(begin).Seconds())
	}
	acking := time.Now()
	if err := d.Ack(ctx); err != nil {
		// The keys are applied; a lost ack means one more harmless delivery.
		p.log.Warn("ack failed; the batch will be applied again", zap.Uint64("commit_lsn", b.CommitLSN), zap.Error(err))
		return
	}
	p.m.stAck.Observe(time.Since(acking).Seconds())
	p.m.Batches.Inc()
	if !b.CommitTime.IsZero() {
		p.m.Latency.Observe(time.Since(b.CommitTime).Seconds())
	}
}

// waitGate waits for the gate, sending progress signals meanwhile. The
// wait ends with ctx, or when the purger closes or its workers stop.
func (p *Purger) waitGate(ctx context.Context, b *bus.Batch, d Acker, tick <-chan time.Time) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	res := make(chan error, 1)
	go func() { res <- p.gate.Wait(ctx, b.CommitLSN, b.EndLSN) }()
	for {
		select {
		case err := <-res:
			return err
		case <-tick:
			_ = d.InProgress()
		case <-p.closing:
			cancel()
		case <-p.stopped:
			cancel()
		}
	}
}

// validKeys returns the batch's keys that memcached can take, counting
// and logging the others (they are dropped: no server could apply them,
// and retrying them would stall the stream).
func (p *Purger) validKeys(b *bus.Batch) []string {
	bad := 0
	for _, k := range b.Keys {
		if mckey.Check(k) != nil {
			bad++
		}
	}
	if bad == 0 {
		return b.Keys
	}
	keys := make([]string, 0, len(b.Keys)-bad)
	for _, k := range b.Keys {
		err := mckey.Check(k)
		if err == nil {
			keys = append(keys, k)
			continue
		}
		reason := mckey.Reason(err)
		p.m.InvalidKeys.WithLabelValues(reason).Inc()
		shown := k
		if len(shown) > 64 {
			shown = shown[:64] + "..."
		}
		p.log.Error("invalid key dropped", zap.String("reason", reason), zap.String("key", shown), zap.Int("len", len(k)),
			zap.Uint64("commit_lsn", b.CommitLSN), zap.String("origin", b.Origin), zap.Error(err))
	}
	return keys
}

// submit splits keys by server and queues each part on its server's
// worker; the tracker's done closes when every part is through.
func (p *Purger) submit(keys []string) *tracker {
	t := &tracker{done: make(chan struct{})}
	p.queue(keys, t)
	return t
}

// queue splits keys by server and queues the parts, tracked by t (nil:
// nobody waits for them).
func (p *Purger) queue(keys []string, t *tracker) {
	if len(p.workers) == 1 {
		if t != nil {
			t.remaining = 1
		}
		p.workers[0].enqueue(&part{t: t, keys: keys, since: time.Now()})
		return
	}
	// Place each key once, then lay the keys out server by server in one
	// array.
	var small [64]int32
	picks := small[:0]
	if len(keys) > len(small) {
		picks = make([]int32, 0, len(keys))
	}
	counts := make([]int, len(p.workers)+1)
	for _, k := range keys {
		i := p.del.Pick(k)
		picks = append(picks, int32(i))
		counts[i+1]++
	}
	for i := 1; i < len(counts); i++ {
		counts[i] += counts[i-1] // counts[i]: where server i's keys start
	}
	laid := make([]string, len(keys))
	next := append([]int(nil), counts[:len(p.workers)]...)
	for j, k := range keys {
		i := picks[j]
		laid[next[i]] = k
		next[i]++
	}
	now := time.Now()
	parts := make([]*part, 0, len(p.workers))
	for i := range p.workers {
		if ks := laid[counts[i]:counts[i+1]]; len(ks) > 0 {
			parts = append(parts, &part{t: t, keys: ks[:len(ks):len(ks)], since: now, server: i})
		}
	}
	if t != nil {
		t.remaining = len(parts)
	}
	for _, pt := range parts {
		p.workers[pt.server].enqueue(pt)
	}
}
