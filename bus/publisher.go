package bus

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/pgcache/pgcache/backoff"
	"go.uber.org/zap"
)

// ErrClosed is returned by a Publisher used after Close.
var ErrClosed = errors.New("bus: publisher closed")

// StreamConfig says which stream carries invalidations and how it is kept.
type StreamConfig struct {
	Name    string // stream name; default INVALIDATIONS
	Subject string // the stream's subject (wildcards allowed); default "pgcache.invalidations"
	// Description is shown by nats stream info; default: the invalidation
	// batches' format.
	Description string
	// Placement is the NATS cluster (datacenter) the stream is created in
	// when missing; empty lets NATS choose.
	Placement string
	Replicas  int           // stream replicas within its cluster; 0 means 1
	MaxAge    time.Duration // how long messages are kept; 0 means 72h
	// Duplicates is the window in which a republished batch (same MsgID)
	// is stored once; 0 means 2m.
	Duplicates time.Duration
	// Sources are other streams whose subjects this one copies (the
	// per-datacenter Layout).
	Sources []Source
}

func (c *StreamConfig) defaults() {
	if c.Name == "" {
		c.Name = "INVALIDATIONS"
	}
	if c.Subject == "" {
		c.Subject = "pgcache.invalidations"
	}
	if c.Description == "" {
		c.Description = "pgcache invalidation batches (format: bus.Batch)"
	}
	if c.Replicas == 0 {
		c.Replicas = 1
	}
	if c.MaxAge == 0 {
		c.MaxAge = 72 * time.Hour
	}
	if c.Duplicates == 0 {
		c.Duplicates = 2 * time.Minute
	}
}

// EnsureStream creates the stream if it is missing and returns it. An
// existing stream is used as it is, except that the sources it lacks are
// added and its replicas raised to cfg's. A cluster too small for the
// replicas gives ErrReplicas.
func EnsureStream(ctx context.Context, js jetstream.JetStream, cfg StreamConfig) (jetstream.Stream, error) {
	cfg.defaults()
	s, err := js.Stream(ctx, cfg.Name)
	if err == nil {
		return ensureSources(ctx, js, s, cfg)
	}
	if !errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, fmt.Errorf("look up stream %s: %w", cfg.Name, err)
	}
	sc := jetstream.StreamConfig{
		Name:        cfg.Name,
		Description: cfg.Description,
		Subjects:    []string{cfg.Subject},
		Retention:   jetstream.LimitsPolicy,
		Storage:     jetstream.FileStorage,
		Replicas:    cfg.Replicas,
		MaxAge:      cfg.MaxAge,
		Duplicates:  cfg.Duplicates,
		// Reads by sequence (the timeline journal, chaos's checker) are
		// answered by any replica, also while JetStream's meta group has
		// no leader (a two-datacenter supercluster that lost one).
		AllowDirect: true,
	}
	if cfg.Placement != "" {
		sc.Placement = &jetstream.Placement{Cluster: cfg.Placement}
	}
	for _, src := range cfg.Sources {
		sc.Sources = append(sc.Sources, &jetstream.StreamSource{Name: src.Stream, FilterSubject: src.Subject})
	}
	s, err = js.CreateStream(ctx, sc)
	if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
		return js.Stream(ctx, cfg.Name)
	}
	if err != nil {
		return nil, replicasErr(fmt.Errorf("create stream %s: %w", cfg.Name, err), cfg)
	}
	return s, nil
}

// PublisherConfig tunes batching and flow control.
type PublisherConfig struct {
	Stream StreamConfig
	Origin string // this datacenter's name, written in every batch
	// MaxBatchKeys flushes a batch when it holds this many distinct keys;
	// a larger transaction is split into parts. 0 means 1000.
	MaxBatchKeys int
	// MaxBatchBytes caps a batch's encoded size in bytes; the server's
	// max_payload caps it too, whichever is lower. 0 means the server's.
	MaxBatchBytes int
	// Linger is how long a batch of whole transactions may wait for more
	// before it is published: DefaultPublisherConfig has 200µs; 0
	// publishes a batch as soon as its transaction ends.
	Linger time.Duration
	// MaxInFlight bounds the batches published but not yet acked; the
	// caller blocks beyond it. 0 means 256.
	MaxInFlight int
	// AckTimeout is how long one publish waits for its ack before it is
	// sent again (with the same MsgID). 0 means 5s.
	AckTimeout time.Duration
	// Remotes are other datacenters' streams that copy Stream (see
	// Layout.Remotes); RemoteNeed of them must hold a batch before the
	// Acks of its transactions are done. RemoteNeed 0: JetStream's ack
	// of Stream is enough.
	Remotes    []StreamConfig
	RemoteNeed int
	// CopyTimeout is how long a batch waits for its remote copies; past
	// it the batch is confirmed with the copies it has, counted in
	// CopyTimeouts and logged. 0 means it waits as long as it takes: a
	// datacenter that is down then holds back every confirmation (and
	// the slot retains WAL) until it returns or is taken out of the
	// layout.
	CopyTimeout time.Duration
	// MaxUncopied bounds the batches acked by Stream that wait for their
	// remote copies; the publisher blocks beyond it, so a partition from
	// the other datacenters stops the tail after that many batches (the
	// local purge has them all by then). 0 means 65536.
	MaxUncopied int
}

// DefaultPublisherConfig returns the defaults.
func DefaultPublisherConfig() PublisherConfig {
	c := PublisherConfig{MaxBatchKeys: 1000, Linger: 200 * time.Microsecond, MaxInFlight: 256, AckTimeout: 5 * time.Second}
	c.Stream.defaults()
	return c
}

// Validate checks the configuration.
func (c PublisherConfig) Validate() error {
	if c.Origin == "" {
		return errors.New("bus: publisher origin (dc) is empty")
	}
	if c.MaxBatchKeys < 1 || c.MaxInFlight < 1 || c.Linger < 0 || c.AckTimeout <= 0 || c.MaxUncopied < 0 {
		return fmt.Errorf("bus: bad publisher limits (max_batch_keys %d, max_in_flight %d, linger %s, ack_timeout %s, max_uncopied %d)",
			c.MaxBatchKeys, c.MaxInFlight, c.Linger, c.AckTimeout, c.MaxUncopied)
	}
	if c.RemoteNeed < 0 || c.RemoteNeed > len(c.Remotes) {
		return fmt.Errorf("bus: %d remote copies needed of %d remote streams", c.RemoteNeed, len(c.Remotes))
	}
	return nil
}

// PublisherStats are counters for metrics.
type PublisherStats struct {
	Batches, Keys, Retries uint64
	InFlight               int
	DurableLSN             uint64
	// Uncopied is the batches stored in the local stream that wait for
	// their copies in other datacenters; CopiesBehind is how many local
	// sequences the remotes (the RemoteNeed-th of them) lack.
	Uncopied     int
	CopiesBehind uint64
	// CopyTimeouts counts the batches confirmed after CopyTimeout without
	// all their remote copies.
	CopyTimeouts uint64
}

// Ack is the acknowledgement of one transaction handed to the publisher
// (wal.Ack implements it): Done is called once every batch holding keys
// of the transaction is acked by JetStream.
type Ack interface{ Done() }

// pending is one published batch waiting for its ack, or transactions
// without keys to acknowledge once everything before them is acked.
type pending struct {
	fut     jetstream.PubAckFuture // nil for an entry without keys
	msg     *nats.Msg
	sent    time.Time // when fut was published
	confirm uint64    // the end LSN of its last whole transaction (0: none), for stats
	acks    []Ack     // the transactions that end in this batch
	keys    int
}

// Publisher groups transactions' keys into batches and publishes them
// asynchronously. Its lifecycle: NewPublisher, then Run in a goroutine
// (it awaits JetStream's acks in order and does the transactions' Acks),
// then BeginTx/Add/EndTx from one producer goroutine, then Drain (soft
// stop) or cancel Run's ctx (hard stop).
//
// The Ack given to EndTx is done, in WAL order, once every batch holding
// keys of its transaction, and of every transaction before it, is acked
// by JetStream. A transaction's Ack is never done before that, so a
// position is confirmed only when its keys are durable (invariant I1).
type Publisher struct {
	js    jetstream.JetStream
	cfg   PublisherConfig
	log   *zap.Logger
	queue chan pending
	done  chan struct{} // closed when Run has handled the closed queue
	kick  chan struct{} // a batch started: the linger timer starts
	// copies follows the remote copies (nil: none needed); uncopied holds
	// the acked batches waiting for them, in order.
	copies   *copies
	uncopied chan copyWait
	lastSeq  atomic.Uint64 // the local sequence of the last acked batch

	mu       sync.Mutex // guards cur, seen, started, confirm, acks, part, inTx, txCommit, txTime, closed
	cur      Batch
	seen     map[string]struct{}
	started  time.Time // when cur got its first transaction
	confirm  uint64    // end LSN of the last whole transaction in cur
	acks     []Ack     // the Acks of the whole transactions in cur
	curBytes int       // the encoded size of cur's keys (KeyBytes)
	limit    int       // maxBytes when cur started
	part     int       // parts already published of the open transaction
	inTx     bool
	txCommit uint64
	txTime   time.Time
	closed   bool

	timeline atomic.Uint32 // the primary's timeline, written in every batch

	obs StageObserver // nil: none; set before Run

	statsMu sync.Mutex // guards stats
	stats   PublisherStats
}

// StageObserver is told how long each published batch spent in each
// stage of the tail (the part of commit-to-purge before JetStream
// stores it): StageReceive, commit to the batch's first keys handed to
// the publisher (the walsender's decoding, the replication connection,
// this process's reading and rendering); StageBatch, from then to the
// publish (linger, batching); StageAck, the publish to its ack read by
// the tracker (the client's flusher, JetStream's store, the ack's way
// back, and batches before it in the tracker's order).
type StageObserver interface {
	ObserveStage(stage string, d time.Duration)
}

// The stages told to a StageObserver.
const (
	StageReceive = "receive"
	StageBatch   = "batch"
	StageAck     = "ack"
)

// SetStageObserver sets the observer of every batch's stages; call it
// before the first transaction.
func (p *Publisher) SetStageObserver(o StageObserver) { p.obs = o }

// NewPublisher validates cfg and returns a publisher on js.
func NewPublisher(js jetstream.JetStream, cfg PublisherConfig, log *zap.Logger) (*Publisher, error) {
	cfg.Stream.defaults()
	if cfg.MaxUncopied == 0 {
		cfg.MaxUncopied = 1 << 16
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	p := &Publisher{
		js: js, cfg: cfg, log: log,
		queue: make(chan pending, cfg.MaxInFlight),
		done:  make(chan struct{}),
		kick:  make(chan struct{}, 1),
		seen:  make(map[string]struct{}, cfg.MaxBatchKeys),
	}
	if cfg.RemoteNeed > 0 {
		p.copies = newCopies(js, cfg.Stream, cfg.Remotes, cfg.RemoteNeed, log)
		p.uncopied = make(chan copyWait, cfg.MaxUncopied)
	}
	return p, nil
}

// copyWait is a batch acked by the local stream at seq (0: no message),
// waiting for its remote copies before its Acks are done.
type copyWait struct {
	seq uint64
	at  time.Time // when the local stream acked it
	it  pending
}

// BeginTx opens a transaction with its commit LSN and time.
func (p *Publisher) BeginTx(commitLSN uint64, commitTime time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.inTx, p.txCommit, p.txTime, p.part = true, commitLSN, commitTime, 0
}

// Add adds keys of the open transaction. When the batch is full it is
// published as a part, which blocks while MaxInFlight batches are unacked.
func (p *Publisher) Add(ctx context.Context, keys ...string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return ErrClosed
	}
	for _, k := range keys {
		if _, dup := p.seen[k]; dup {
			continue
		}
		kb := KeyBytes(k)
		if len(p.cur.Keys) > 0 && p.curBytes+kb > p.limit {
			// The key would take the message over the server's max
			// payload: what the batch holds goes first, as a part.
			if err := p.flushLocked(ctx, false); err != nil {
				return err
			}
			p.part++
		}
		if len(p.cur.Keys) == 0 && p.cur.Txs == 0 {
			p.startBatch()
		}
		p.seen[k] = struct{}{}
		p.cur.Keys = append(p.cur.Keys, k)
		p.curBytes += kb
		p.noteTx()
		if len(p.cur.Keys) >= p.cfg.MaxBatchKeys {
			if err := p.flushLocked(ctx, false); err != nil {
				return err
			}
			p.part++
		}
	}
	return nil
}

// maxBytes is the most key bytes a batch may hold: the server's max
// payload (or MaxBatchBytes when lower), less room for the other fields
// and headers. Called with p.mu held.
func (p *Publisher) maxBytes() int {
	limit := p.cfg.MaxBatchBytes
	if nc := p.js.Conn(); nc != nil {
		if mp := int(nc.MaxPayload()); mp > 0 && (limit == 0 || mp < limit) {
			limit = mp
		}
	}
	if limit <= 0 {
		limit = 1 << 20 // NATS's default max_payload
	}
	return max(limit-batchOverhead, 1)
}

// noteTx records the open transaction's position in the current batch.
func (p *Publisher) noteTx() {
	if p.txCommit > p.cur.CommitLSN {
		p.cur.CommitLSN = p.txCommit
	}
	if p.cur.CommitTime.IsZero() || p.txTime.Before(p.cur.CommitTime) {
		p.cur.CommitTime = p.txTime
	}
}

// EndTx closes the open transaction, whose commit record ends at endLSN,
// and takes its Ack (nil: none), done once the transaction's keys are
// durable. A transaction without keys is acknowledged in its turn too.
// On an error the Ack is not taken.
func (p *Publisher) EndTx(ctx context.Context, endLSN uint64, ack Ack) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return ErrClosed
	}
	if ack != nil {
		p.acks = append(p.acks, ack)
	}
	if p.cur.Txs == 0 && len(p.cur.Keys) == 0 {
		p.startBatch()
	}
	p.noteTx()
	p.cur.Txs++
	p.cur.EndLSN = endLSN
	p.confirm = endLSN
	p.inTx = false
	if len(p.cur.Keys) >= p.cfg.MaxBatchKeys || p.part > 0 {
		return p.flushLocked(ctx, true)
	}
	return nil
}

// Flush publishes the current batch of whole transactions now.
func (p *Publisher) Flush(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.flushIdle(ctx, 0)
}

// flushIdle publishes the batch if it holds whole transactions only and is
// older than age.
func (p *Publisher) flushIdle(ctx context.Context, age time.Duration) error {
	if p.inTx || (p.cur.Txs == 0 && len(p.cur.Keys) == 0) || time.Since(p.started) < age {
		return nil
	}
	return p.flushLocked(ctx, true)
}

// flushLocked publishes cur (final: it ends at a transaction boundary) and
// queues it for the ack tracker.
func (p *Publisher) flushLocked(ctx context.Context, final bool) error {
	b := p.cur
	b.Origin = p.cfg.Origin
	b.Timeline = p.timeline.Load()
	b.Final = final
	b.Part = p.part
	if !final {
		b.EndLSN = 0
	}
	confirm, acks := p.confirm, p.acks
	p.cur, p.curBytes = Batch{}, 0
	p.confirm, p.acks = 0, nil
	clear(p.seen)
	if p.inTx {
		// The open transaction continues in the next batch.
		p.noteTx()
	}
	item := pending{confirm: confirm, acks: acks, keys: len(b.Keys)}
	if len(b.Keys) > 0 {
		data, err := b.Encode()
		if err != nil {
			return fmt.Errorf("encode batch: %w", err)
		}
		msg := nats.NewMsg(p.cfg.Stream.Subject)
		msg.Data = data
		msg.Header.Set(jetstream.MsgIDHeader, b.MsgID())
		item.msg = msg
		item.sent = time.Now()
		if p.obs != nil {
			if !b.CommitTime.IsZero() {
				p.obs.ObserveStage(StageReceive, max(p.started.Sub(b.CommitTime), 0))
			}
			p.obs.ObserveStage(StageBatch, item.sent.Sub(p.started))
		}
		fut, err := p.js.PublishMsgAsync(msg)
		if err != nil {
			// Sent again by the tracker; the position waits for it.
			p.log.Warn("publish failed; will retry", zap.Error(err))
		}
		item.fut = fut
		p.statsMu.Lock()
		p.stats.Batches++
		p.stats.Keys += uint64(len(b.Keys))
		p.statsMu.Unlock()
	}
	select {
	case p.queue <- item:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Run awaits acks in publish order, republishes what failed, reports
// durable positions, and publishes lingering batches. It returns when ctx
// ends or after Drain.
func (p *Publisher) Run(ctx context.Context) error {
	lctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		p.linger(lctx)
	}()
	copied := make(chan struct{})
	if p.copies != nil {
		wg.Add(2)
		go func() {
			defer wg.Done()
			p.copies.run(lctx)
		}()
		go func() {
			defer wg.Done()
			defer close(copied)
			p.awaitCopies(lctx)
		}()
	} else {
		close(copied)
	}
	defer func() {
		cancel()
		wg.Wait()
	}()
	// The tracker never takes p.mu: a producer blocked on a full queue
	// holds it.
	for {
		select {
		case <-ctx.Done():
			return nil
		case it, ok := <-p.queue:
			if !ok {
				if p.copies != nil {
					close(p.uncopied)
				}
				select {
				case <-copied:
					close(p.done)
				case <-ctx.Done():
				}
				return nil
			}
			seq, err := p.await(ctx, it)
			if err != nil {
				return nil // ctx ended
			}
			if p.copies == nil {
				p.confirmed(it)
				continue
			}
			select {
			case p.uncopied <- copyWait{seq: seq, at: time.Now(), it: it}:
			case <-ctx.Done():
				return nil
			}
		}
	}
}

// awaitCopies does the Acks of each acked batch, in order, once enough
// remote datacenters hold it.
func (p *Publisher) awaitCopies(ctx context.Context) {
	var lastLog time.Time
	for w := range p.uncopied {
		if w.seq > 0 {
			wctx, cancel := ctx, context.CancelFunc(func() {})
			if p.cfg.CopyTimeout > 0 {
				wctx, cancel = context.WithDeadline(ctx, w.at.Add(p.cfg.CopyTimeout))
			}
			err := p.copies.wait(wctx, w.seq)
			cancel()
			if ctx.Err() != nil {
				return
			}
			if err != nil {
				p.statsMu.Lock()
				p.stats.CopyTimeouts++
				p.statsMu.Unlock()
				if time.Since(lastLog) > 10*time.Second {
					lastLog = time.Now()
					p.log.Warn("confirming batches that other datacenters do not hold yet (copy_timeout passed): losing this datacenter now would lose them",
						zap.Uint64("seq", w.seq), zap.Duration("copy_timeout", p.cfg.CopyTimeout), zap.Uint64("copies_behind", p.copies.behind(w.seq)))
				}
			}
		}
		p.confirmed(w.it)
	}
}

// confirmed does the Acks of a batch that is durable.
func (p *Publisher) confirmed(it pending) {
	if it.confirm > 0 {
		p.statsMu.Lock()
		p.stats.DurableLSN = it.confirm
		p.statsMu.Unlock()
	}
	for _, a := range it.acks {
		a.Done()
	}
}

// startBatch notes that cur got its first transaction and starts the
// linger timer. Called with p.mu held.
func (p *Publisher) startBatch() {
	p.started = time.Now()
	p.limit = p.maxBytes()
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// linger publishes a batch of whole transactions once it is Linger old. It
// sleeps while no batch is open: an idle publisher costs no wake-ups.
func (p *Publisher) linger(ctx context.Context) {
	t := time.NewTimer(time.Hour)
	t.Stop()
	defer t.Stop()
	sleep := func(d time.Duration) bool {
		t.Reset(d)
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
			return true
		}
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.kick:
		}
		for {
			p.mu.Lock()
			open := !p.closed && (p.cur.Txs > 0 || len(p.cur.Keys) > 0)
			wait := time.Until(p.started.Add(p.cfg.Linger))
			if open && wait <= 0 && p.inTx {
				// A transaction is still coming in: look again soon.
				wait = max(p.cfg.Linger, 100*time.Microsecond)
			} else if open && wait <= 0 {
				_ = p.flushIdle(ctx, p.cfg.Linger) // fails only when ctx ends
				open = false
			}
			p.mu.Unlock()
			if !open {
				break
			}
			if !sleep(wait) {
				return
			}
		}
	}
}

// await waits for one item's ack, republishing until JetStream stores
// it, and returns the batch's sequence in the stream (0: no message).
func (p *Publisher) await(ctx context.Context, it pending) (uint64, error) {
	var seq uint64
	if it.msg != nil {
		ok := false
		if it.fut != nil {
			// AckTimeout counts from the publish, not from when the
			// tracker reaches the batch: publishes lost together (a
			// leader election) time out together, not one after another.
			timeout := time.NewTimer(time.Until(it.sent.Add(p.cfg.AckTimeout)))
			defer timeout.Stop()
			select {
			case pa := <-it.fut.Ok():
				ok, seq = true, pa.Sequence
				if p.obs != nil {
					p.obs.ObserveStage(StageAck, time.Since(it.sent))
				}
			case err := <-it.fut.Err():
				p.log.Warn("publish not acked; retrying", zap.Error(err))
			case <-timeout.C:
				p.log.Warn("publish ack timed out; retrying", zap.Duration("timeout", p.cfg.AckTimeout))
			case <-ctx.Done():
				return 0, ctx.Err()
			}
		}
		for attempt := 0; !ok; attempt++ {
			p.statsMu.Lock()
			p.stats.Retries++
			p.statsMu.Unlock()
			pa, err := p.publish(ctx, it.msg)
			if err == nil {
				seq = pa.Sequence // a duplicate's is the stored one's
				break
			}
			if ctx.Err() != nil {
				return 0, ctx.Err()
			}
			d := retry.Delay(attempt)
			p.log.Warn("republish failed", zap.Error(err), zap.Duration("retry_in", d))
			if err := backoff.Wait(ctx, d); err != nil {
				return 0, err
			}
		}
		p.lastSeq.Store(seq)
	}
	return seq, nil
}

// publish publishes msg and waits for its ack, for at most AckTimeout.
func (p *Publisher) publish(ctx context.Context, msg *nats.Msg) (*jetstream.PubAck, error) {
	actx, cancel := context.WithTimeout(ctx, p.cfg.AckTimeout)
	defer cancel()
	return p.js.PublishMsg(actx, msg)
}

// Drain publishes what is buffered and waits until every batch is acked
// and reported. Add and EndTx fail afterwards. Run returns after Drain.
func (p *Publisher) Drain(ctx context.Context) error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	// A transaction cut off by the stop is published with the rest: its
	// keys are purged once more than needed, and since its Ack never came
	// it is delivered again after a restart.
	p.inTx = false
	err := p.flushIdle(ctx, 0)
	p.closed = true
	close(p.queue)
	p.mu.Unlock()
	if err != nil {
		return err
	}
	select {
	case <-p.done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("drain publisher: %w", ctx.Err())
	}
}

// SetTimeline sets the primary's timeline, written in every batch from
// now on (see Batch.Timeline).
func (p *Publisher) SetTimeline(tli uint32) { p.timeline.Store(tli) }

// Announce publishes b on its own, outside the batches, and waits until
// JetStream stores it, retrying until ctx ends: the announcement of a
// pool flush after a slot loss, which must be durable before the stream
// goes on.
func (p *Publisher) Announce(ctx context.Context, b *Batch) error {
	b.Origin = p.cfg.Origin
	b.Final = true
	data, err := b.Encode()
	if err != nil {
		return fmt.Errorf("encode announcement: %w", err)
	}
	msg := nats.NewMsg(p.cfg.Stream.Subject)
	msg.Data = data
	msg.Header.Set(jetstream.MsgIDHeader, b.MsgID())
	for attempt := 0; ; attempt++ {
		// Stored here is enough: the batches after it are confirmed
		// only once copied, and a stream copies in order.
		_, err := p.publish(ctx, msg)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("announce: %w", err)
		}
		d := retry.Delay(attempt)
		p.log.Warn("announcement not stored; retrying", zap.Error(err), zap.Duration("retry_in", d))
		if err := backoff.Wait(ctx, d); err != nil {
			return fmt.Errorf("announce: %w", err)
		}
	}
}

// Stats returns counters for metrics.
func (p *Publisher) Stats() PublisherStats {
	p.statsMu.Lock()
	s := p.stats
	p.statsMu.Unlock()
	s.InFlight = len(p.queue)
	if p.copies != nil {
		s.Uncopied = len(p.uncopied)
		s.CopiesBehind = p.copies.behind(p.lastSeq.Load())
	}
	return s
}

// retry is the backoff between attempts to publish or consume: 50ms
// doubling to 5s.
var retry = backoff.Policy{Min: 50 * time.Millisecond, Max: 5 * time.Second}
