package mcpool

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/pgcache/pgcache/backoff"
)

// Config configures a Pool.
type Config struct {
	// Servers are the server specs, "host:port[:weight][ name]" (see
	// ParseServer). Order matters for modula; for ketama the names do.
	Servers []string
	// Hash is HashKetama or HashModula.
	Hash string
	// ConnsPerServer is the number of pipelined connections per server.
	ConnsPerServer int
	// Timeout is the deadline of a request whose ctx has none: it fails
	// with ErrTimeout between Timeout and Timeout + 2*max(Timeout/8, 1ms)
	// after it began (all keys of a multi-key call from the call's
	// start; later, never sooner, on a machine too busy to run the
	// expiry on time), or, if the server has begun to send its response, when
	// that ends or IOTimeout passes. A ctx deadline always wins, longer
	// or shorter.
	Timeout time.Duration
	// DialTimeout bounds one connection attempt.
	DialTimeout time.Duration
	// ReconnectMin and ReconnectMax bound the backoff between failed
	// connection attempts to a server: it starts at ReconnectMin, doubles
	// up to ReconnectMax, with jitter, and resets on success.
	ReconnectMin time.Duration
	ReconnectMax time.Duration
	// MaxInFlight bounds the requests in flight on one connection (see
	// ConnConfig).
	MaxInFlight int
	// IOTimeout is the liveness timeout of a connection (see ConnConfig).
	IOTimeout time.Duration
	// MaxValueSize is the largest value in bytes (see ConnConfig).
	MaxValueSize int
	// Breaker configures each server's circuit breaker.
	Breaker BreakerConfig
	// OnBreakerChange, if set, is called on every breaker transition, in
	// order, for export as metrics. It must not block or make requests on
	// the Pool; it may call Stats and BreakerState.
	OnBreakerChange func(server int, addr string, from, to BreakerState)
}

// DefaultConfig returns a Config with every field but Servers set:
// ketama, 2 connections per server, Timeout 1s, DialTimeout 1s, reconnect
// backoff 50ms to 5s, the DefaultConnConfig limits, and a breaker that
// opens after 5 consecutive failures for 1s.
func DefaultConfig() Config {
	cc := DefaultConnConfig()
	return Config{
		Hash:           HashKetama,
		ConnsPerServer: 2,
		Timeout:        time.Second,
		DialTimeout:    time.Second,
		ReconnectMin:   50 * time.Millisecond,
		ReconnectMax:   5 * time.Second,
		MaxInFlight:    cc.MaxInFlight,
		IOTimeout:      cc.IOTimeout,
		MaxValueSize:   cc.MaxValueSize,
		Breaker:        BreakerConfig{Failures: 5, OpenFor: time.Second},
	}
}

// Validate checks the fields and their relations, and parses the servers.
func (c Config) Validate() error {
	if len(c.Servers) == 0 {
		return fmt.Errorf("%w: no servers", ErrConfig)
	}
	if _, err := NewRing(c.Hash, c.Servers); err != nil {
		return err
	}
	seen := make(map[string]bool, len(c.Servers))
	for _, spec := range c.Servers {
		s, _ := ParseServer(spec)
		if seen[s.Addr] {
			return fmt.Errorf("%w: server %s listed twice", ErrConfig, s.Addr)
		}
		seen[s.Addr] = true
	}
	switch {
	case c.ConnsPerServer < 1:
		return fmt.Errorf("%w: ConnsPerServer (%d) must be at least 1", ErrConfig, c.ConnsPerServer)
	case c.Timeout <= 0:
		return fmt.Errorf("%w: Timeout (%s) must be positive", ErrConfig, c.Timeout)
	case c.DialTimeout <= 0:
		return fmt.Errorf("%w: DialTimeout (%s) must be positive", ErrConfig, c.DialTimeout)
	case c.ReconnectMin <= 0:
		return fmt.Errorf("%w: ReconnectMin (%s) must be positive", ErrConfig, c.ReconnectMin)
	case c.ReconnectMax < c.ReconnectMin:
		return fmt.Errorf("%w: ReconnectMax (%s) cannot be less than ReconnectMin (%s)", ErrConfig, c.ReconnectMax, c.ReconnectMin)
	case c.Breaker.Failures < 1:
		return fmt.Errorf("%w: Breaker.Failures (%d) must be at least 1", ErrConfig, c.Breaker.Failures)
	case c.Breaker.OpenFor <= 0:
		return fmt.Errorf("%w: Breaker.OpenFor (%s) must be positive", ErrConfig, c.Breaker.OpenFor)
	}
	return c.connConfig().Validate()
}

func (c Config) connConfig() ConnConfig {
	return ConnConfig{MaxInFlight: c.MaxInFlight, IOTimeout: c.IOTimeout, MaxValueSize: c.MaxValueSize, minSilence: c.Timeout / 2}
}

// ServerStats are one server's figures, for metrics. Counters only grow.
type ServerStats struct {
	Addr     string
	State    BreakerState
	Conns    int    // connections up
	InFlight int    // requests queued or awaiting a response
	Requests uint64 // requests sent (answered or failed; not TimeoutsQueued)
	Failures uint64 // requests that failed, counted by the breaker: down, silent timeout, protocol error
	Rejected uint64 // requests failed fast by an open breaker
	Opens    uint64 // times the breaker opened
	Dials    uint64 // successful connection attempts
	DialErrs uint64 // failed connection attempts
	// Timeouts by where the request was (see TimeoutWhere). Only
	// TimeoutsSilent are failures (and part of Failures); the others
	// are the client's delay, not the server's.
	TimeoutsQueued    uint64 // never written: waited for a connection, a slot or the write
	TimeoutsLate      uint64 // written less than Timeout/2 before the deadline; nothing came back since
	TimeoutsAnswering uint64 // written; the server kept sending on the connection meanwhile
	TimeoutsSilent    uint64 // written; nothing came back since
}

// TimeoutsOf returns the timeouts counted where w says (for metrics:
// one series per TimeoutQueued ... TimeoutSilent, labelled w.String()).
func (s ServerStats) TimeoutsOf(w TimeoutWhere) uint64 {
	switch w {
	case TimeoutQueued:
		return s.TimeoutsQueued
	case TimeoutLate:
		return s.TimeoutsLate
	case TimeoutAnswering:
		return s.TimeoutsAnswering
	case TimeoutSilent:
		return s.TimeoutsSilent
	}
	return 0
}

// Pool is one datacenter's memcached pool. Its methods are safe for
// concurrent use. New starts a connection manager per connection; Close
// stops them and waits.
type Pool struct {
	cfg     Config
	connCfg ConnConfig
	log     *zap.Logger
	ring    *Ring
	servers []*server
	exp     *expiry

	closing   chan struct{}
	closeOnce sync.Once
	wg        sync.WaitGroup
}

type server struct {
	idx   int
	addr  string
	br    *breaker
	slots []*connSlot
	rr    atomic.Uint32
	// ready is closed once a first connection is up or every slot has
	// had its first attempt: until then a request waits rather than
	// fail with "not connected".
	ready     chan struct{}
	readyOnce sync.Once
	firstDone atomic.Int32 // slots that have had their first attempt

	requests, failures, rejected, opens, dials, dialErrs atomic.Uint64
	timeoutsQueued, timeoutsLate, timeoutsAnswering      atomic.Uint64
	timeoutsSilent                                       atomic.Uint64
}

type connSlot struct {
	conn atomic.Pointer[Conn]
}

// New validates cfg, builds the ring and starts connecting in the
// background: it does not wait for servers, and a server that is down
// only fails its own keys. log may be nil (zap.NewNop); it gets breaker
// transitions only.
func New(cfg Config, log *zap.Logger) (*Pool, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = zap.NewNop()
	}
	ring, err := NewRing(cfg.Hash, cfg.Servers)
	if err != nil {
		return nil, err
	}
	p := &Pool{
		cfg:     cfg,
		connCfg: cfg.connConfig(),
		log:     log,
		ring:    ring,
		exp:     newExpiry(cfg.Timeout),
		closing: make(chan struct{}),
	}
	for i := 0; i < ring.Len(); i++ {
		s := &server{idx: i, addr: ring.Server(i).Addr, ready: make(chan struct{})}
		s.br = newBreaker(cfg.Breaker, p.breakerNotify(s))
		for j := 0; j < cfg.ConnsPerServer; j++ {
			s.slots = append(s.slots, &connSlot{})
		}
		p.servers = append(p.servers, s)
	}
	// Every server and slot exists before the first manager and the
	// expiry run.
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.exp.run(p.closing, p.expire)
	}()
	for _, s := range p.servers {
		for _, slot := range s.slots {
			p.wg.Add(1)
			go p.manage(s, slot)
		}
	}
	return p, nil
}

func (p *Pool) breakerNotify(s *server) func(from, to BreakerState, fails int, cause error) {
	return func(from, to BreakerState, fails int, cause error) {
		switch to {
		case BreakerOpen:
			s.opens.Add(1)
			if from == BreakerClosed {
				p.log.Warn("breaker open", zap.Int("server", s.idx), zap.String("addr", s.addr),
					zap.Int("failures", fails), zap.Duration("open_for", p.cfg.Breaker.OpenFor), zap.Error(cause))
			} else {
				p.log.Debug("breaker probe failed", zap.Int("server", s.idx), zap.String("addr", s.addr), zap.Error(cause))
			}
		case BreakerClosed:
			p.log.Info("breaker closed", zap.Int("server", s.idx), zap.String("addr", s.addr))
		case BreakerHalfOpen:
			p.log.Debug("breaker half-open", zap.Int("server", s.idx), zap.String("addr", s.addr))
		}
		if p.cfg.OnBreakerChange != nil {
			p.cfg.OnBreakerChange(s.idx, s.addr, from, to)
		}
	}
}

// manage keeps one connection of s up until the pool closes.
func (p *Pool) manage(s *server, slot *connSlot) {
	defer p.wg.Done()
	// ctx cancels a dial in progress when the pool closes.
	ctx, cancel := context.WithCancel(context.Background())
	var watch sync.WaitGroup
	watch.Add(1)
	go func() {
		defer watch.Done()
		select {
		case <-p.closing:
			cancel()
		case <-ctx.Done():
		}
	}()
	defer func() {
		cancel()
		watch.Wait()
	}()
	policy := backoff.Policy{Min: p.cfg.ReconnectMin, Max: p.cfg.ReconnectMax}
	attempt := 0
	first := true
	pause := func() bool { // false when the pool closes
		t := time.NewTimer(policy.Delay(attempt))
		attempt++
		defer t.Stop()
		select {
		case <-t.C:
			return true
		case <-p.closing:
			return false
		}
	}
	for {
		dctx, dcancel := context.WithTimeout(ctx, p.cfg.DialTimeout)
		c, err := Dial(dctx, s.addr, p.connCfg)
		dcancel()
		if err == nil {
			s.dials.Add(1)
			slot.conn.Store(c)
		} else {
			s.dialErrs.Add(1)
		}
		if first {
			first = false
			if err == nil || int(s.firstDone.Add(1)) == len(s.slots) {
				s.readyOnce.Do(func() { close(s.ready) })
			}
		}
		if err != nil {
			if !pause() {
				return
			}
			continue
		}
		connected := time.Now()
		select {
		case <-c.Done():
			slot.conn.CompareAndSwap(c, nil)
			_ = c.Close()
			p.log.Debug("connection lost", zap.String("addr", s.addr), zap.Error(c.Err()))
		case <-p.closing:
			slot.conn.CompareAndSwap(c, nil)
			_ = c.Close()
			return
		}
		// A connection that lived long redials at once; one that broke
		// soon after it was made (a server refusing clients) backs off.
		if time.Since(connected) > p.cfg.ReconnectMax {
			attempt = 0
		} else if !pause() {
			return
		}
	}
}

// conn returns a working connection to s, or an ErrServerDown error.
// Right after New, while no connection to s is up yet and some first
// attempts are still under way, it waits for them (within ctx).
func (s *server) conn(ctx context.Context, expired <-chan struct{}) (*Conn, error) {
	if c := s.pick(); c != nil {
		return c, nil
	}
	select {
	case <-s.ready:
	case <-ctx.Done():
		return nil, ctxError(ctx, TimeoutQueued)
	case <-expired:
		return nil, timeoutErrs[TimeoutQueued]
	}
	// Look again even if ready was closed before: the first connection
	// may have come up since the first look.
	if c := s.pick(); c != nil {
		return c, nil
	}
	return nil, fmt.Errorf("%w: %s: not connected", ErrServerDown, s.addr)
}

// pick returns a working connection to s, round robin, or nil.
func (s *server) pick() *Conn {
	n := uint32(len(s.slots))
	if n == 1 {
		if c := s.slots[0].conn.Load(); c != nil && c.Err() == nil {
			return c
		}
		return nil
	}
	start := s.rr.Add(1)
	for i := uint32(0); i < n; i++ {
		if c := s.slots[(start+i)%n].conn.Load(); c != nil && c.Err() == nil {
			return c
		}
	}
	return nil
}

// expire times out, on every connection, the requests due at tick.
func (p *Pool) expire(tick int64) {
	for _, s := range p.servers {
		for _, slot := range s.slots {
			if c := slot.conn.Load(); c != nil {
				c.expire(tick)
			}
		}
	}
}

// deadline returns Config.Timeout for a request begun now, when ctx has
// no deadline: the channel that ends its waits before it is sent, and the
// tick at which the expiry ends it in the pipeline (r.due). With a ctx
// deadline, nil and 0: ctx alone ends it.
func (p *Pool) deadline(ctx context.Context) (expired <-chan struct{}, due int64) {
	if _, ok := ctx.Deadline(); ok {
		return nil, 0
	}
	return p.exp.take()
}

// begin admits a request to server idx and starts it. On success the
// caller must call finish with the request's outcome.
func (p *Pool) begin(ctx context.Context, expired <-chan struct{}, s *server, r *request, corked bool) (c *Conn, probe bool, err error) {
	select {
	case <-p.closing:
		return nil, false, ErrClosed
	default:
	}
	if r.err != nil {
		return nil, false, r.err
	}
	probe, ok := s.br.allow()
	if !ok {
		s.rejected.Add(1)
		return nil, false, fmt.Errorf("%w: %s", ErrBreakerOpen, s.addr)
	}
	c, err = s.conn(ctx, expired)
	if err == nil {
		err = c.start(ctx, expired, r, corked)
	}
	if err != nil {
		p.finish(s, probe, err)
		return nil, false, err
	}
	return c, probe, nil
}

// finish counts a request's outcome and gives it to the breaker.
func (p *Pool) finish(s *server, probe bool, err error) {
	o := classify(err)
	switch o {
	case outcomeSuccess:
		s.requests.Add(1)
	case outcomeNeutral:
	case outcomeFailure:
		s.requests.Add(1)
		s.failures.Add(1)
		if TimeoutWhereOf(err) == TimeoutSilent {
			s.timeoutsSilent.Add(1)
		}
	case outcomeQueued:
		s.timeoutsQueued.Add(1)
	case outcomeLate:
		s.requests.Add(1)
		s.timeoutsLate.Add(1)
	case outcomeAnswering:
		s.requests.Add(1)
		s.timeoutsAnswering.Add(1)
	}
	s.br.record(probe, o, err)
}

func (p *Pool) exec(ctx context.Context, idx int, r *request) (Response, error) {
	// A ctx that has already ended wins over the default timeout, which
	// would otherwise race with it.
	if err := ctx.Err(); err != nil {
		return Response{}, err
	}
	expired, due := p.deadline(ctx)
	r.due = due
	s := p.servers[idx]
	c, probe, err := p.begin(ctx, expired, s, r, false)
	if err != nil {
		r.release()
		return Response{}, err
	}
	resp, ok, err := c.wait(ctx, r)
	if ok {
		r.release()
	}
	p.finish(s, probe, err)
	return resp, err
}

// Ring returns the pool's ring.
func (p *Pool) Ring() *Ring { return p.ring }

// Servers returns the number of servers (the range of Pick).
func (p *Pool) Servers() int { return len(p.servers) }

// Addr returns the address of server i.
func (p *Pool) Addr(i int) string { return p.servers[i].addr }

// FlushAll empties server i ("flush_all noreply", then mn): every item
// on it is gone once it returns nil.
func (p *Pool) FlushAll(ctx context.Context, i int) error {
	if i < 0 || i >= len(p.servers) {
		return fmt.Errorf("%w: server %d of %d", ErrBadRequest, i, len(p.servers))
	}
	_, err := p.exec(ctx, i, &request{kind: kindNop, buf: flushRequest})
	return err
}

var flushRequest = []byte("flush_all noreply\r\nmn\r\n")

// Pick returns the index of the server that holds key.
func (p *Pool) Pick(key string) int { return p.ring.Pick(key) }

// MetaGet sends "mg <key> <flags...>" to key's server (see Conn.MetaGet).
func (p *Pool) MetaGet(ctx context.Context, key string, flags ...string) (Response, error) {
	return p.exec(ctx, p.ring.Pick(placementKey(key, hasB(flags))), buildGet(key, flags))
}

// MetaSet sends an ms to key's server (see Conn.MetaSet).
func (p *Pool) MetaSet(ctx context.Context, key string, value []byte, opt SetOptions) (Response, error) {
	return p.exec(ctx, p.ring.Pick(placementKey(key, hasB(opt.Flags))), buildSet(key, value, opt, p.cfg.MaxValueSize))
}

// MetaDelete sends an md to key's server (see Conn.MetaDelete).
func (p *Pool) MetaDelete(ctx context.Context, key string, opt DeleteOptions) (Response, error) {
	return p.exec(ctx, p.ring.Pick(placementKey(key, hasB(opt.Flags))), buildDelete(key, opt))
}

// MetaGetOn, MetaSetOn and MetaDeleteOn send their request to server i
// (as returned by Pick), wherever key itself would go: for an item that
// must sit beside another key, as a lease record beside its key (so a
// dead server fails only its own keys). Every client that reads such an
// item must route it the same way. An i out of range is ErrBadRequest.
func (p *Pool) MetaGetOn(ctx context.Context, i int, key string, flags ...string) (Response, error) {
	return p.execOn(ctx, i, buildGet(key, flags))
}

// MetaSetOn sends an ms to server i (see MetaGetOn).
func (p *Pool) MetaSetOn(ctx context.Context, i int, key string, value []byte, opt SetOptions) (Response, error) {
	return p.execOn(ctx, i, buildSet(key, value, opt, p.cfg.MaxValueSize))
}

// MetaDeleteOn sends an md to server i (see MetaGetOn).
func (p *Pool) MetaDeleteOn(ctx context.Context, i int, key string, opt DeleteOptions) (Response, error) {
	return p.execOn(ctx, i, buildDelete(key, opt))
}

func (p *Pool) execOn(ctx context.Context, i int, r *request) (Response, error) {
	if i < 0 || i >= len(p.servers) {
		r.release()
		return Response{}, fmt.Errorf("%w: server %d of %d", ErrBadRequest, i, len(p.servers))
	}
	return p.exec(ctx, i, r)
}

// MetaArithmetic sends an ma to key's server (see Conn.MetaArithmetic).
func (p *Pool) MetaArithmetic(ctx context.Context, key string, opt ArithmeticOptions) (Response, error) {
	return p.exec(ctx, p.ring.Pick(placementKey(key, hasB(opt.Flags))), buildArithmetic(key, opt))
}

// Do forwards a meta command to the server of the key it names (see
// Conn.Do; a key sent with the b flag is placed by its decoded bytes,
// as the same key sent as written would be). mn names no key:
// use NoOp.
func (p *Pool) Do(ctx context.Context, request, value []byte) (Response, error) {
	r, key := buildRaw(request, value, p.cfg.MaxValueSize)
	if r.err != nil {
		r.release()
		return Response{}, r.err
	}
	if r.kind == kindNop {
		return Response{}, fmt.Errorf("%w: mn names no server; use NoOp", ErrBadRequest)
	}
	return p.exec(ctx, p.ring.Pick(key), r)
}

// NoOp sends mn to server i and waits for MN.
func (p *Pool) NoOp(ctx context.Context, i int) error {
	if i < 0 || i >= len(p.servers) {
		return fmt.Errorf("%w: server %d of %d", ErrBadRequest, i, len(p.servers))
	}
	_, err := p.exec(ctx, i, &request{kind: kindNop, buf: noopRequest})
	return err
}

// Delete removes key ("md <key>"). A key that is not there counts as
// deleted.
func (p *Pool) Delete(ctx context.Context, key string) error {
	resp, err := p.MetaDelete(ctx, key, DeleteOptions{})
	return deleteResult("md", key, resp, err)
}

// MarkStale marks key stale ("md <key> I T<ttl>"): readers get its value
// with X until it is refilled, and one of them gets W to refill it. ttl,
// rounded up to seconds, caps how long the stale item lives; 0 leaves its
// TTL unchanged. A key that is not there counts as done.
func (p *Pool) MarkStale(ctx context.Context, key string, ttl time.Duration) error {
	resp, err := p.MetaDelete(ctx, key, DeleteOptions{Invalidate: true, TTL: ttl})
	return deleteResult("md I", key, resp, err)
}

func deleteResult(op, key string, resp Response, err error) error {
	if err != nil {
		return fmt.Errorf("%s %s: %w", op, key, err)
	}
	switch resp.Status {
	case StatusHD, StatusNF:
		return nil
	}
	return fmt.Errorf("%w: %s %s answered %s", ErrProtocol, op, key, resp.Status)
}

// DeleteMulti deletes keys as Delete does, pipelined from the calling
// goroutine: the keys of each server go as one chain of quiet deletes
// ("md <key> q O<i>" ... "mn"), so memcached answers only the deletes
// that fail. The result has one error per key (nil: deleted or absent).
// All keys share ctx's deadline (or Config.Timeout).
func (p *Pool) DeleteMulti(ctx context.Context, keys []string) []error {
	return p.chain(ctx, keys, "md", DeleteOptions{})
}

// MarkStaleMulti marks keys stale as MarkStale does, pipelined as
// DeleteMulti.
func (p *Pool) MarkStaleMulti(ctx context.Context, keys []string, ttl time.Duration) []error {
	return p.chain(ctx, keys, "md I", DeleteOptions{Invalidate: true, TTL: ttl})
}

// DeleteMultiOn is DeleteMulti for keys that all live on server i (as
// Pick says): the caller has placed them already, so they are not hashed
// again. Keys placed elsewhere are deleted on server i all the same.
func (p *Pool) DeleteMultiOn(ctx context.Context, i int, keys []string) []error {
	return p.chainOn(ctx, i, keys, "md", DeleteOptions{})
}

// MarkStaleMultiOn is MarkStaleMulti for keys that all live on server i
// (see DeleteMultiOn).
func (p *Pool) MarkStaleMultiOn(ctx context.Context, i int, keys []string, ttl time.Duration) []error {
	return p.chainOn(ctx, i, keys, "md I", DeleteOptions{Invalidate: true, TTL: ttl})
}

func (p *Pool) chainOn(ctx context.Context, i int, keys []string, op string, opt DeleteOptions) []error {
	if i < 0 || i >= len(p.servers) {
		errs := make([]error, len(keys))
		for j, k := range keys {
			errs[j] = fmt.Errorf("%s %s: %w: server %d of %d", op, k, ErrBadRequest, i, len(p.servers))
		}
		return errs
	}
	return p.chain(ctx, keys, op, opt, i)
}

// chain sends keys as one quiet delete chain per server (all to server
// on, if on >= 0) and returns an error per key.
func (p *Pool) chain(ctx context.Context, keys []string, op string, opt DeleteOptions, on ...int) []error {
	errs := make([]error, len(keys))
	if len(keys) == 0 {
		return errs
	}
	if err := ctx.Err(); err != nil {
		for i, k := range keys {
			errs[i] = fmt.Errorf("%s %s: %w", op, k, err)
		}
		return errs
	}
	// Group the keys by server, keeping each key's index.
	byServer := make([][]int, len(p.servers))
	if len(on) > 0 {
		all := make([]int, len(keys))
		for i := range all {
			all[i] = i
		}
		byServer[on[0]] = all
	} else {
		for i, k := range keys {
			s := p.ring.Pick(k)
			byServer[s] = append(byServer[s], i)
		}
	}
	expired, due := p.deadline(ctx) // one deadline for the whole call
	type started struct {
		s     *server
		c     *Conn
		r     *request
		idx   []int // the chain's index i is keys[idx[i]]
		probe bool
	}
	var inflight []started
	var conns []*Conn // to flush, each once
	sub := make([]string, 0, len(keys))
	for si, idx := range byServer {
		if len(idx) == 0 {
			continue
		}
		sub = sub[:0]
		for _, i := range idx {
			sub = append(sub, keys[i])
		}
		r, bad := buildDeleteChain(sub, opt)
		for _, b := range bad {
			errs[idx[b.idx]] = fmt.Errorf("%s %s: %w", op, keys[idx[b.idx]], b.err)
		}
		if r == nil {
			continue
		}
		r.due = due
		s := p.servers[si]
		c, probe, err := p.begin(ctx, expired, s, r, true)
		if err != nil {
			r.release()
			for _, i := range idx {
				if errs[i] == nil {
					errs[i] = fmt.Errorf("%s %s: %w", op, keys[i], err)
				}
			}
			continue
		}
		inflight = append(inflight, started{s, c, r, idx, probe})
		if !slices.Contains(conns, c) {
			conns = append(conns, c)
		}
	}
	for _, c := range conns {
		c.flush()
	}
	for _, st := range inflight {
		_, ok, err := st.c.wait(ctx, st.r)
		if err == nil {
			for _, f := range st.r.fails {
				if f.idx < 0 {
					// An answer that names no delete (a server error
					// line): which one failed is unknown, so all did.
					err = fmt.Errorf("%w: %s answered without its opaque: %v %s", ErrProtocol, op, f.err, f.resp.Status)
					if f.err != nil {
						err = f.err
					}
					break
				}
				i := st.idx[f.idx]
				if errs[i] == nil {
					errs[i] = deleteResult(op, keys[i], f.resp, f.err)
				}
			}
		}
		p.finish(st.s, st.probe, err)
		if err != nil {
			for _, i := range st.idx {
				if errs[i] == nil {
					errs[i] = fmt.Errorf("%s %s: %w", op, keys[i], err)
				}
			}
		}
		if ok {
			st.r.release()
		}
	}
	return errs
}

// MetaGetMulti sends "mg <key> <flags...>" for every key, pipelined from
// the calling goroutine with one write per connection, and returns the
// responses and errors in key order (as MetaGet would for each). All keys
// share ctx's deadline (or Config.Timeout).
func (p *Pool) MetaGetMulti(ctx context.Context, keys []string, flags ...string) ([]Response, []error) {
	resps := make([]Response, len(keys))
	errs := make([]error, len(keys))
	p.pipeline(ctx, keys, hasB(flags), func(k string) *request { return buildGet(k, flags) },
		func(i int, resp Response, err error) { resps[i], errs[i] = resp, err },
		func(i int, err error) { errs[i] = err })
	return resps, errs
}

// pipeline sends a request per key (encoded: the keys are base64, b
// flag), corked so that each connection gets one write, then collects the
// answers: done for a request that was sent, failed for one that was not.
func (p *Pool) pipeline(ctx context.Context, keys []string, encoded bool, build func(string) *request,
	done func(i int, resp Response, err error), failed func(i int, err error)) {
	expired, due := p.deadline(ctx) // one deadline for the whole batch
	type started struct {
		s     *server
		c     *Conn
		r     *request
		probe bool
	}
	inflight := make([]started, len(keys))
	var conns []*Conn // to flush, each once
	for i, k := range keys {
		r := build(k)
		r.due = due
		s := p.servers[p.ring.Pick(placementKey(k, encoded))]
		c, probe, err := p.begin(ctx, expired, s, r, true)
		if err != nil {
			r.release()
			failed(i, err)
			continue
		}
		inflight[i] = started{s, c, r, probe}
		if !slices.Contains(conns, c) {
			conns = append(conns, c)
		}
	}
	for _, c := range conns {
		c.flush()
	}
	for i, st := range inflight {
		if st.c == nil {
			continue
		}
		resp, ok, err := st.c.wait(ctx, st.r)
		if ok {
			st.r.release()
		}
		p.finish(st.s, st.probe, err)
		done(i, resp, err)
	}
}

// BreakerState returns the breaker state of server i.
func (p *Pool) BreakerState(i int) BreakerState { return p.servers[i].br.State() }

// Stats returns each server's figures, in server order.
func (p *Pool) Stats() []ServerStats {
	out := make([]ServerStats, len(p.servers))
	for i, s := range p.servers {
		st := ServerStats{
			Addr:     s.addr,
			State:    s.br.State(),
			Requests: s.requests.Load(),
			Failures: s.failures.Load(),
			Rejected: s.rejected.Load(),
			Opens:    s.opens.Load(),
			Dials:    s.dials.Load(),
			DialErrs: s.dialErrs.Load(),

			TimeoutsQueued:    s.timeoutsQueued.Load(),
			TimeoutsLate:      s.timeoutsLate.Load(),
			TimeoutsAnswering: s.timeoutsAnswering.Load(),
			TimeoutsSilent:    s.timeoutsSilent.Load(),
		}
		for _, slot := range s.slots {
			if c := slot.conn.Load(); c != nil && c.Err() == nil {
				st.Conns++
				st.InFlight += c.InFlight()
			}
		}
		out[i] = st
	}
	return out
}

// Close stops every connection and waits for the pool's goroutines.
// Requests in flight fail with ErrClosed. It is safe to call twice.
func (p *Pool) Close() error {
	p.closeOnce.Do(func() { close(p.closing) })
	p.wg.Wait()
	return nil
}
