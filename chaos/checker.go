package chaos

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/mcpool"
)

// Pool is one datacenter's memcached pool as its readers and purger see it.
type Pool struct {
	DC      string   `yaml:"dc"`
	Servers []string `yaml:"servers"` // host:port[:weight][ name], in the purger's order
	Hash    string   `yaml:"hash"`    // ketama (default) | modula
}

// CheckerConfig configures a Checker.
type CheckerConfig struct {
	// PrimaryDSN is the database the rules' queries run on (the primary,
	// so that "fresh" means as new as the last commit).
	PrimaryDSN string
	// NATSURL is a NATS server of the cluster that holds the stream.
	NATSURL string
	// Stream is the JetStream stream of invalidation batches (bus.Batch);
	// default INVALIDATIONS.
	Stream string
	// Pools are the datacenters' pools; each sampled key is checked in
	// every one.
	Pools []Pool
	// Rules render keys to their expected values. Keys that match no rule
	// are not sampled.
	Rules []Rule
	// Delay is M: a key still stale M after its commit counts against the
	// nines. Default 5s.
	Delay time.Duration
	// SampleRate is the share of matching keys checked, in (0, 1];
	// default 0.2.
	SampleRate float64
	// MaxTracked bounds the samples followed at once; beyond it keys are
	// skipped (and counted). Default 500.
	MaxTracked int
	// Track is how long a stale sample is followed to measure its window
	// before it is given up as stale (window open). Default 10×Delay, at
	// least 30s.
	Track time.Duration
	// StartSeq is the first stream sequence read; 0 means the next message
	// after Run starts.
	StartSeq uint64
	// RecordKeys keeps every key read from the stream (Keys), for the
	// lost-invalidation check of a scenario. Off for long runs.
	RecordKeys bool
}

// DefaultCheckerConfig returns the defaults; PrimaryDSN, NATSURL, Pools and
// Rules are left to fill.
func DefaultCheckerConfig() CheckerConfig {
	return CheckerConfig{Stream: "INVALIDATIONS", Delay: 5 * time.Second, SampleRate: 0.2, MaxTracked: 500}
}

// Validate checks the config.
func (c CheckerConfig) Validate() error {
	switch {
	case c.PrimaryDSN == "":
		return fmt.Errorf("%w: primary dsn is empty", ErrConfig)
	case c.NATSURL == "":
		return fmt.Errorf("%w: nats url is empty", ErrConfig)
	case c.Stream == "":
		return fmt.Errorf("%w: stream is empty", ErrConfig)
	case len(c.Pools) == 0:
		return fmt.Errorf("%w: no pools", ErrConfig)
	case c.Delay <= 0:
		return fmt.Errorf("%w: delay (%s) must be positive", ErrConfig, c.Delay)
	case c.SampleRate <= 0 || c.SampleRate > 1:
		return fmt.Errorf("%w: sample rate %v: want (0, 1]", ErrConfig, c.SampleRate)
	case c.MaxTracked < 1:
		return fmt.Errorf("%w: max tracked (%d) must be at least 1", ErrConfig, c.MaxTracked)
	case c.Track != 0 && c.Track < c.Delay:
		return fmt.Errorf("%w: track (%s) cannot be shorter than delay (%s)", ErrConfig, c.Track, c.Delay)
	}
	seen := map[string]bool{}
	for _, p := range c.Pools {
		if p.DC == "" || seen[p.DC] {
			return fmt.Errorf("%w: pool dc %q empty or listed twice", ErrConfig, p.DC)
		}
		seen[p.DC] = true
		mc := mcpool.DefaultConfig()
		mc.Servers = p.Servers
		if p.Hash != "" {
			mc.Hash = p.Hash
		}
		if err := mc.Validate(); err != nil {
			return fmt.Errorf("%w: pool %s: %w", ErrConfig, p.DC, err)
		}
	}
	_, err := compileRules(c.Rules)
	return err
}

// CheckReport is what a Checker observed.
type CheckReport struct {
	Delay   time.Duration
	Batches int    // stream messages read
	Keys    int    // keys in them
	LastSeq uint64 // last stream sequence read
	// Samples counts (key, datacenter) observations that finished; a key
	// that could never be read in a DC (its server down throughout) is
	// not one.
	Samples int
	// Stale counts those still stale Delay after their commit.
	Stale     int
	StaleByDC map[string]int
	// Worst is the longest staleness window seen: from the commit until
	// the key was seen fresh in WorstDC. WorstOpen means it was still
	// stale when given up, so the window is a lower bound.
	Worst     time.Duration
	WorstKey  string
	WorstDC   string
	WorstOpen bool
	Skipped   int // matching keys not followed: MaxTracked reached
	Errors    int // failed reads (cache or database); the sample went on
}

// Nines is -log10 of the stale share: 3 means 99.9% fresh within Delay.
// With no stale sample it is +Inf (see NinesString for the honest bound).
func (r CheckReport) Nines() float64 {
	if r.Samples == 0 {
		return 0
	}
	if r.Stale == 0 {
		return math.Inf(1)
	}
	return -math.Log10(float64(r.Stale) / float64(r.Samples))
}

// NinesString is "N nines within M s" with the samples behind it. With no
// stale sample, N samples support at most log10(N) nines, so that bound
// is given.
func (r CheckReport) NinesString() string {
	m := r.Delay.Seconds()
	switch {
	case r.Samples == 0:
		return fmt.Sprintf("no samples within %gs", m)
	case r.Stale == 0:
		return fmt.Sprintf(">=%.1f nines within %gs (0/%d stale)", math.Log10(float64(r.Samples)), m, r.Samples)
	default:
		return fmt.Sprintf("%.2f nines within %gs (%d/%d stale)", r.Nines(), m, r.Stale, r.Samples)
	}
}

// WorstString describes the worst window.
func (r CheckReport) WorstString() string {
	if r.WorstKey == "" {
		return "none seen"
	}
	s := r.Worst.Round(10 * time.Millisecond).String()
	if r.WorstOpen {
		s = ">" + s + " (never fresh)"
	}
	return fmt.Sprintf("%s (%s in %s)", s, r.WorstKey, r.WorstDC)
}

// Checker samples keys from the invalidation stream and follows each in
// every datacenter's pool until it is fresh. Create it with NewChecker,
// call Run once; Report and Keys may be called at any time.
type Checker struct {
	cfg   CheckerConfig
	rules []*rule
	log   *zap.Logger

	readSeq atomic.Uint64

	mu      sync.Mutex // guards report, keys, flushes
	flushes []uint64   // CommitLSN of each flush announcement read
	report  CheckReport
	keys    map[string]struct{}
}

// NewChecker validates cfg and returns a Checker.
func NewChecker(cfg CheckerConfig, log *zap.Logger) (*Checker, error) {
	d := DefaultCheckerConfig()
	if cfg.Stream == "" {
		cfg.Stream = d.Stream
	}
	if cfg.Delay == 0 {
		cfg.Delay = d.Delay
	}
	if cfg.SampleRate == 0 {
		cfg.SampleRate = d.SampleRate
	}
	if cfg.MaxTracked == 0 {
		cfg.MaxTracked = d.MaxTracked
	}
	if cfg.Track == 0 {
		cfg.Track = max(10*cfg.Delay, 30*time.Second)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	rules, _ := compileRules(cfg.Rules)
	return &Checker{cfg: cfg, rules: rules, log: log.Named("checker"),
		report: CheckReport{Delay: cfg.Delay, StaleByDC: map[string]int{}}, keys: map[string]struct{}{}}, nil
}

// Report returns a snapshot of what was observed so far.
func (c *Checker) Report() CheckReport {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := c.report
	r.StaleByDC = make(map[string]int, len(c.report.StaleByDC))
	for k, v := range c.report.StaleByDC {
		r.StaleByDC[k] = v
	}
	return r
}

// ReadSeq is the last stream sequence read (0 before the first).
func (c *Checker) ReadSeq() uint64 { return c.readSeq.Load() }

// Flushes returns the positions of the pool flushes announced on the
// stream (after a slot loss): every key written before one is covered.
func (c *Checker) Flushes() []uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]uint64(nil), c.flushes...)
}

// Keys returns every key read from the stream (with RecordKeys).
func (c *Checker) Keys() map[string]struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]struct{}, len(c.keys))
	for k := range c.keys {
		out[k] = struct{}{}
	}
	return out
}

// Run reads the stream and checks samples until ctx ends. Samples past
// their Delay when ctx ends are counted as they stand; younger ones are
// dropped. Run returns nil on cancellation, or the setup error.
func (c *Checker) Run(ctx context.Context) error {
	db := newConnPool(c.cfg.PrimaryDSN, 16)
	defer db.Close()
	if err := db.queryRow(ctx, "SELECT 1", nil, new(int)); err != nil {
		return fmt.Errorf("checker: connect primary: %w", err)
	}
	var err error
	pools := make([]*mcpool.Pool, len(c.cfg.Pools))
	for i, p := range c.cfg.Pools {
		mc := mcpool.DefaultConfig()
		mc.Servers = p.Servers
		if p.Hash != "" {
			mc.Hash = p.Hash
		}
		pools[i], err = mcpool.New(mc, c.log.Named(p.DC))
		if err != nil {
			return fmt.Errorf("checker: pool %s: %w", p.DC, err)
		}
		defer pools[i].Close()
	}
	nc, err := nats.Connect(c.cfg.NATSURL, nats.MaxReconnects(-1), nats.ReconnectWait(200*time.Millisecond))
	if err != nil {
		return fmt.Errorf("checker: connect nats: %w", err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("checker: jetstream: %w", err)
	}
	var stream jetstream.Stream
	for {
		stream, err = js.Stream(ctx, c.cfg.Stream)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return nil
		}
		c.log.Debug("stream not available yet", zap.Error(err))
		sleep(ctx, 250*time.Millisecond)
	}
	seq := c.cfg.StartSeq
	if seq == 0 {
		info, err := stream.Info(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("checker: stream info: %w", err)
		}
		seq = info.State.LastSeq + 1
	}
	c.readSeq.Store(seq - 1)
	sem := make(chan struct{}, c.cfg.MaxTracked)
	var wg sync.WaitGroup
	defer wg.Wait()
	for ctx.Err() == nil {
		msg, err := stream.GetMsg(ctx, seq)
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			if errors.Is(err, jetstream.ErrMsgNotFound) {
				info, ierr := stream.Info(ctx)
				switch {
				case ierr != nil:
					sleep(ctx, 200*time.Millisecond)
				case info.State.FirstSeq > seq:
					seq = info.State.FirstSeq // aged out before we read it
				case info.State.LastSeq >= seq:
					// Stored since the first read (on the replica that
					// answered), or deleted: read again now that the
					// stream is known to be past it.
					if _, err := bus.GetMsg(ctx, stream, seq, info.State.FirstSeq, info.State.LastSeq); errors.Is(err, jetstream.ErrMsgNotFound) {
						c.readSeq.Store(seq) // deleted
						seq++
					}
				default:
					sleep(ctx, 50*time.Millisecond)
				}
				continue
			}
			c.count(func(r *CheckReport) { r.Errors++ })
			c.log.Debug("read stream", zap.Uint64("seq", seq), zap.Error(err))
			sleep(ctx, 200*time.Millisecond)
			continue
		}
		b, err := bus.Decode(msg.Data)
		c.readSeq.Store(seq)
		seq++
		if err != nil {
			c.count(func(r *CheckReport) { r.Errors++ })
			continue
		}
		commit := b.CommitTime
		if commit.IsZero() {
			commit = time.Now()
		}
		c.mu.Lock()
		c.report.Batches++
		c.report.Keys += len(b.Keys)
		c.report.LastSeq = msg.Sequence
		if c.cfg.RecordKeys {
			for _, k := range b.Keys {
				c.keys[k] = struct{}{}
			}
		}
		if b.Flush {
			c.flushes = append(c.flushes, b.CommitLSN)
		}
		c.mu.Unlock()
		for _, k := range b.Keys {
			r, args := matchRule(c.rules, k)
			if r == nil || rand.Float64() >= c.cfg.SampleRate {
				continue
			}
			select {
			case sem <- struct{}{}:
			default:
				c.count(func(r *CheckReport) { r.Skipped++ })
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				c.follow(ctx, db, pools, r, k, args, commit)
			}()
		}
	}
	return nil
}

func (c *Checker) count(f func(r *CheckReport)) {
	c.mu.Lock()
	f(&c.report)
	c.mu.Unlock()
}

// follow checks one key in every pool until it is fresh in each, or the
// Track time runs out, or ctx ends.
func (c *Checker) follow(ctx context.Context, db querier, pools []*mcpool.Pool, r *rule, key string, args []any, commit time.Time) {
	want, found, err := r.expected(ctx, db, args)
	if err != nil {
		if ctx.Err() == nil {
			c.count(func(r *CheckReport) { r.Errors++ })
		}
		return
	}
	pending := make([]bool, len(pools))
	sawStale := make([]bool, len(pools))
	left := len(pools)
	for i := range pending {
		pending[i] = true
	}
	interval := 25 * time.Millisecond
	for {
		for i, p := range pools {
			if !pending[i] {
				continue
			}
			fresh, err := c.fresh(ctx, db, p, r, key, args, want, found)
			if err != nil {
				if ctx.Err() != nil {
					break
				}
				c.count(func(r *CheckReport) { r.Errors++ })
				continue
			}
			if !fresh {
				sawStale[i] = true
				continue
			}
			now := time.Now()
			pending[i] = false
			left--
			c.finish(c.cfg.Pools[i].DC, key, sawStale[i], now.Sub(commit), false)
		}
		if left == 0 {
			return
		}
		now := time.Now()
		if ctx.Err() != nil || now.Sub(commit) > c.cfg.Track {
			if now.Sub(commit) < c.cfg.Delay {
				return // too young to judge
			}
			for i := range pools {
				// A key never read (its server down throughout) is
				// unknown, not stale: it is left out.
				if pending[i] && sawStale[i] {
					c.finish(c.cfg.Pools[i].DC, key, true, now.Sub(commit), true)
				}
			}
			return
		}
		sleep(ctx, interval)
		interval = min(2*interval, 500*time.Millisecond)
	}
}

// finish records one (key, dc) observation.
func (c *Checker) finish(dc, key string, sawStale bool, window time.Duration, open bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := &c.report
	r.Samples++
	if !sawStale {
		return
	}
	if window > r.Delay {
		r.Stale++
		r.StaleByDC[dc]++
	}
	if window > r.Worst || r.WorstKey == "" {
		r.Worst, r.WorstKey, r.WorstDC, r.WorstOpen = window, key, dc, open
	}
}

// fresh reads key from one pool and compares it to the database. An
// absent key, an empty lease placeholder and a value marked stale (md I)
// are fresh: none of them is served as a current value.
func (c *Checker) fresh(ctx context.Context, db querier, p *mcpool.Pool, r *rule, key string, args []any, want string, found bool) (bool, error) {
	resp, err := p.MetaGet(ctx, key, "v")
	if err != nil {
		return false, err
	}
	if resp.Status != mcpool.StatusVA || len(resp.Value) == 0 || resp.Stale {
		return true, nil
	}
	cached := string(resp.Value)
	if found && r.fresh(cached, want) {
		return true, nil
	}
	// The row may have moved on since want was read: the cached value may
	// be newer than want and current.
	now, ok, err := r.expected(ctx, db, args)
	if err != nil {
		return false, err
	}
	return ok && r.fresh(cached, now), nil
}

// sleep waits d or until ctx ends.
func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
