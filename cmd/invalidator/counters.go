package main

// Denormalized counters: the wiring between wal, counters, batcher and
// NATS, and the repair subcommand.
//
// A counter is kept in the table pgcache_counters (see package batcher for
// the DDL, created at start), one row per group, and read by its cache key:
//
//	SELECT n FROM pgcache_counters WHERE key = 'post:42:likes'   -- no row: 0
//
// Deltas come from two sources, each checkpointed in the same transaction
// as the counts it produced (pgcache_counter_checkpoints):
//
//   - "wal": row changes of the counters' source tables, from the slot the
//     tail role already streams. Its position is (commit LSN of the
//     transaction, ordinal of the change in it), and (end LSN, 0) once the
//     transaction is whole. The LSN confirmed to the slot is the minimum of
//     what JetStream acked (invalidations) and what the batcher committed
//     (counters), so neither a key nor a delta is lost across a crash.
//   - "nats:<stream>": direct increments for counters without a source
//     table. Applications publish {"counter": C, "key": {col: value},
//     "delta": n} to subject counters.incr.C (with JetStream, and a
//     Nats-Msg-Id header so that their own retries are stored once). The
//     stream (increments.stream, default COUNTERS) is created if missing.
//     The invalidator reads it with an ordered consumer from the
//     checkpointed sequence + 1: the checkpoint is the acknowledgement, and
//     a message at or below it is skipped.
//
// Every flush emits pg_logical_emit_message(true, messages.prefix, keys)
// with the changed groups' keys in its own transaction, so the tailer
// invalidates them in every datacenter like any other key.
//
// The first start with a counter on a table counts the rows already there
// (the same recount as `invalidator repair`, see Repair), once: the row
// "init:<counter>" in the checkpoint table records it.

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/pgcache/pgcache/batcher"
	"github.com/pgcache/pgcache/counters"
	"github.com/pgcache/pgcache/row"
	"github.com/pgcache/pgcache/tail"
	"github.com/pgcache/pgcache/wal"
)

// walSource is the batcher source of WAL-derived deltas.
const walSource = "wal"

func natsSource(stream string) string { return "nats:" + stream }

// confirmer confirms to the slot the minimum of the position JetStream
// acked and the position the batcher committed. The wal stream only moves
// its confirmed LSN forward, and advances it on keepalives only when
// everything it delivered is confirmed: so an unflushed delta (whose
// transaction was delivered) holds the slot back too.
type confirmer struct {
	stream *wal.Stream

	mu    sync.Mutex // guards bus, batch
	bus   uint64
	batch uint64
}

func (c *confirmer) busDurable(lsn uint64) {
	c.mu.Lock()
	c.bus = max(c.bus, lsn)
	m := min(c.bus, c.batch)
	c.mu.Unlock()
	c.stream.Confirm(pglogrepl.LSN(m))
}

// batchDurable takes the batcher's durable WAL positions. A position in
// the middle of a transaction (Minor > 0) is not a point the slot can
// restart from; the transaction's end comes later.
func (c *confirmer) batchDurable(src string, p batcher.Pos) {
	if src != walSource || p.Minor != 0 {
		return
	}
	c.mu.Lock()
	c.batch = max(c.batch, p.Major)
	m := min(c.bus, c.batch)
	c.mu.Unlock()
	c.stream.Confirm(pglogrepl.LSN(m))
}

// counterMetrics count counter inputs that could not be applied.
type counterMetrics struct {
	errors *prometheus.CounterVec
}

func newCounterMetrics(reg prometheus.Registerer) *counterMetrics {
	m := &counterMetrics{errors: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "invalidator_counter_errors_total", Help: "Counter inputs that could not be applied, by reason."}, []string{"reason"})}
	reg.MustRegister(m.errors)
	return m
}

func counterReason(err error) string {
	switch {
	case errors.Is(err, counters.ErrOldValueMissing):
		return "old_value_missing"
	case errors.Is(err, counters.ErrColumnMissing):
		return "column_missing"
	case errors.Is(err, counters.ErrUnchangedToast):
		return "unchanged_toast"
	case errors.Is(err, counters.ErrKey):
		return "bad_key"
	case errors.Is(err, counters.ErrBadIncrement):
		return "bad_increment"
	case errors.Is(err, counters.ErrUnknownCounter):
		return "unknown_counter"
	case errors.Is(err, counters.ErrNotIncrementable):
		return "not_incrementable"
	case errors.Is(err, counters.ErrBadRepair):
		return "bad_repair"
	}
	return "other"
}

// counterHandler turns the WAL into batcher inputs. It is used from wal's
// goroutine only.
type counterHandler struct {
	set *counters.Set
	b   *batcher.Batcher
	m   *counterMetrics
	log *zap.Logger

	commit pglogrepl.LSN // the open transaction's commit LSN
	ord    uint64        // ordinal of the last counted input in it
	buf    []counters.Delta
	// reloaded: the checkpoints were read again after this process
	// started to stream (a hot standby that took over has older ones).
	reloaded bool
	// wait bounds a wait on the primary (handlerWait).
	wait time.Duration
}

// handlerWait bounds how long the counter handler waits on the primary
// (a checkpoint read, a flush to make room) inside the WAL stream. Past
// it, the handler returns wal.ErrRetry: the stream lets go of the
// replication connection and delivers the transaction again later. A
// primary shutting down waits for its walsenders' readers, so a handler
// that waited for the primary with the connection open would wait
// forever (seen in the chaos test's primary restart).
const handlerWait = 5 * time.Second

func (h *counterHandler) Begin(ctx context.Context, tx wal.TxInfo) error {
	if !h.reloaded {
		lctx, cancel := context.WithTimeout(ctx, h.wait)
		err := loadCheckpoints(lctx, h.b, h.log, walSource)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return err
			}
			return fmt.Errorf("%w: counter checkpoints unreadable for %s", wal.ErrRetry, h.wait)
		}
		h.reloaded = true
	}
	h.commit, h.ord = tx.CommitLSN, 0
	return nil
}

func (h *counterHandler) Change(ctx context.Context, tx wal.TxInfo, c row.Change) error {
	if !h.set.HasTable(c.Table) {
		return nil
	}
	// Every change of a source table has an ordinal, counted or not, so
	// that a redelivered transaction numbers its changes the same way.
	h.ord++
	ds, resets, errs := h.set.Deltas(h.buf[:0], c)
	h.buf = ds
	for _, err := range errs {
		h.m.errors.WithLabelValues(counterReason(err)).Inc()
		h.log.Warn("change not counted", zap.String("table", c.Table), zap.Stringer("op", c.Op), zap.Error(err))
	}
	if len(ds) == 0 && len(resets) == 0 {
		return nil
	}
	if len(resets) > 0 {
		h.log.Info("source table truncated: counters reset to zero", zap.String("table", c.Table), zap.Strings("counters", resets))
	}
	in := batcher.Input{Source: walSource, Pos: batcher.Pos{Major: uint64(h.commit), Minor: h.ord}, Time: tx.CommitTime,
		Resets: resets, Deltas: toBatcher(ds)}
	return h.add(ctx, in)
}

// add gives in to the batcher, waiting at most h.wait for room.
// Inputs added before a retry are skipped when their transaction comes
// again (the batcher's high-water mark).
func (h *counterHandler) add(ctx context.Context, in batcher.Input) error {
	_, err := h.b.AddWithin(ctx, in, h.wait)
	if errors.Is(err, batcher.ErrBusy) {
		return fmt.Errorf("%w: %w", wal.ErrRetry, err)
	}
	return err
}

func (h *counterHandler) Message(ctx context.Context, tx wal.TxInfo, m wal.Message) error {
	if !m.Transactional {
		// Its own position; nothing to count.
		return h.add(ctx, batcher.Input{Source: walSource, Pos: batcher.Pos{Major: uint64(m.LSN)}, Time: tx.CommitTime})
	}
	if m.Prefix != counters.RepairPrefix {
		return nil
	}
	h.ord++
	resets, sets, err := h.set.ParseRepair(m.Content)
	if err != nil {
		h.m.errors.WithLabelValues(counterReason(err)).Inc()
		h.log.Error("repair marker not applied", zap.Stringer("lsn", m.LSN), zap.Error(err))
		return nil
	}
	h.log.Info("applying a repair", zap.Stringer("lsn", m.LSN), zap.Strings("reset", resets), zap.Int("groups", len(sets)))
	return h.add(ctx, batcher.Input{Source: walSource, Pos: batcher.Pos{Major: uint64(h.commit), Minor: h.ord}, Time: tx.CommitTime,
		Resets: resets, Sets: toBatcher(sets)})
}

func (h *counterHandler) Commit(ctx context.Context, tx wal.TxInfo) error {
	return h.add(ctx, batcher.Input{Source: walSource, Pos: batcher.Pos{Major: uint64(tx.EndLSN)}, Time: tx.CommitTime})
}

func toBatcher(ds []counters.Delta) []batcher.Delta {
	if len(ds) == 0 {
		return nil
	}
	out := make([]batcher.Delta, len(ds))
	for i, d := range ds {
		out[i] = batcher.Delta(d)
	}
	return out
}

// fanout feeds one WAL stream to the invalidation tailer and the counters.
// Repair markers go to the counters only: they hold no cache keys.
type fanout struct {
	tail *tail.Handler
	ctr  *counterHandler
}

func (f fanout) Begin(ctx context.Context, tx wal.TxInfo) error {
	if err := f.tail.Begin(ctx, tx); err != nil {
		return err
	}
	return f.ctr.Begin(ctx, tx)
}

func (f fanout) Change(ctx context.Context, tx wal.TxInfo, c row.Change) error {
	if err := f.tail.Change(ctx, tx, c); err != nil {
		return err
	}
	return f.ctr.Change(ctx, tx, c)
}

func (f fanout) Message(ctx context.Context, tx wal.TxInfo, m wal.Message) error {
	if m.Prefix != counters.RepairPrefix {
		if err := f.tail.Message(ctx, tx, m); err != nil {
			return err
		}
	}
	return f.ctr.Message(ctx, tx, m)
}

func (f fanout) Commit(ctx context.Context, tx wal.TxInfo) error {
	if err := f.tail.Commit(ctx, tx); err != nil {
		return err
	}
	return f.ctr.Commit(ctx, tx)
}

// counterRun is the counters' part of the tail role.
type counterRun struct {
	set  *counters.Set
	b    *batcher.Batcher
	pg   *batcher.PG
	conf *confirmer
	m    *counterMetrics
	// goingAway is signalled when a flush fails because the primary is
	// shutting down or unreachable.
	goingAway chan struct{}
}

// goingAwayFlusher tells runStream when the primary is going away.
type goingAwayFlusher struct {
	*batcher.PG
	signal chan struct{}
}

func (f goingAwayFlusher) Flush(ctx context.Context, b *batcher.Batch) error {
	err := f.PG.Flush(ctx, b)
	if err != nil && serverGoingAway(err) {
		select {
		case f.signal <- struct{}{}:
		default:
		}
	}
	return err
}

// serverGoingAway reports an error that means the server is shutting
// down, restarting or unreachable, rather than a problem of the batch.
func serverGoingAway(err error) bool {
	if errors.Is(err, batcher.ErrCheckpointMoved) || errors.Is(err, context.Canceled) {
		return false
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return strings.HasPrefix(pgErr.Code, "57") || strings.HasPrefix(pgErr.Code, "08")
	}
	return true // no server reply: a connection failure
}

// runStream runs the WAL stream until soft ends or it fails. When a flush
// fails because the primary is going away, it drops the replication
// connection and resumes a moment later: a primary's clean shutdown waits
// until every walsender's client has confirmed all the WAL sent to it,
// which the slot must not do while deltas are unflushed, and the flush
// cannot happen while the server shuts down. Without this, a fast
// shutdown of the primary would hang until the walsender is killed.
// Resuming is safe: the stream redelivers from the last confirmed
// position, and the batcher skips what it already holds.
func (c *counterRun) runStream(soft context.Context, stream *wal.Stream, h wal.Handler, log *zap.Logger) error {
	for {
		sctx, cancel := context.WithCancel(soft)
		released := make(chan struct{})
		go func() {
			select {
			case <-c.goingAway:
				if stream.Stats().State == wal.StateStreaming {
					log.Warn("counters cannot be flushed: the primary is going away; releasing the replication connection so that it can shut down")
				}
				close(released)
				cancel()
			case <-sctx.Done():
			}
		}()
		err := stream.Run(sctx, h)
		cancel()
		select {
		case <-released:
		default:
			return err
		}
		if soft.Err() != nil {
			return nil
		}
		if err != nil {
			return err
		}
		select {
		case <-soft.Done():
			return nil
		case <-time.After(time.Second):
		}
	}
}

// setupCounters creates the tables, loads the checkpoints and returns the
// batcher (not running yet).
func (d *daemon) setupCounters(ctx context.Context, stream *wal.Stream) (*counterRun, error) {
	set := d.cfg.counters
	pg, err := batcher.NewPG(batcher.PGConfig{DSN: d.cfg.Postgres.DSN, Table: d.cfg.Batcher.Table,
		CheckpointTable: d.cfg.Batcher.CheckpointTable, MessagePrefix: d.cfg.Messages.Prefix})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	if err := pg.EnsureSchema(ctx); err != nil {
		pg.Close()
		return nil, err
	}
	if err := d.initCounters(ctx); err != nil {
		pg.Close()
		return nil, err
	}
	conf := &confirmer{stream: stream}
	goingAway := make(chan struct{}, 1)
	b, err := batcher.New(batcher.Config{MaxPending: d.cfg.Batcher.MaxPending, Interval: d.cfg.Batcher.Interval},
		goingAwayFlusher{PG: pg, signal: goingAway}, batcher.NewMetrics(d.reg), conf.batchDurable)
	if err != nil {
		pg.Close()
		return nil, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	if err := b.Load(ctx, walSource, natsSource(d.cfg.Increments.Stream)); err != nil {
		pg.Close()
		return nil, err
	}
	d.log.Info("counters ready", zap.Strings("counters", set.Names()),
		zap.Stringer("wal_checkpoint", b.Checkpoint(walSource)))
	return &counterRun{set: set, b: b, pg: pg, conf: conf, m: newCounterMetrics(d.reg), goingAway: goingAway}, nil
}

// hasIncrements reports whether a counter takes increments over NATS.
func (c *counterRun) hasIncrements() bool {
	for _, n := range c.set.Names() {
		if c.set.Counter(n).Table == "" {
			return true
		}
	}
	return false
}

// runIncrements applies increments from the stream until soft ends. It
// starts once this process streams the slot (the active tail process), so
// a hot standby does not consume them too; two writers would anyway be
// stopped by the checkpoint check (batcher.ErrCheckpointMoved).
func (d *daemon) runIncrements(soft context.Context, js jetstream.JetStream, c *counterRun, stream *wal.Stream) error {
	log := d.log.Named("increments")
	for stream.Stats().State != wal.StateStreaming {
		select {
		case <-soft.Done():
			return nil
		case <-time.After(200 * time.Millisecond):
		}
	}
	name := d.cfg.Increments.Stream
	src := natsSource(name)
	// NATS may be restarting or cut off: wait for it rather than exit.
	var st jetstream.Stream
	for wait, attempt := 200*time.Millisecond, 1; ; attempt++ {
		var err error
		if st, err = ensureIncrementStream(soft, js, name, d.cfg.Increments.Placement); err == nil {
			break
		}
		if soft.Err() != nil {
			return nil
		}
		if attempt == 1 || attempt%10 == 0 {
			log.Warn("increments stream unavailable; retrying", zap.String("stream", name), zap.Int("attempt", attempt), zap.Duration("retry_in", wait), zap.Error(err))
		}
		select {
		case <-soft.Done():
			return nil
		case <-time.After(wait):
		}
		wait = min(2*wait, 5*time.Second)
	}
	// Read the checkpoint now, not at start: a hot standby that took
	// over has an old one.
	if err := loadCheckpoints(soft, c.b, d.log.Named("counters"), src); err != nil {
		if soft.Err() != nil {
			return nil
		}
		return fmt.Errorf("increments: %w", err)
	}
	from := c.b.Checkpoint(src).Major
	if info, err := st.Info(soft); err == nil && from > 0 {
		switch {
		case info.State.LastSeq < from:
			// The stream was deleted and created again: its sequences
			// start over, below the checkpoint, and would all be skipped.
			c.m.errors.WithLabelValues("increments_stream_reset").Inc()
			return fmt.Errorf("%w: increments stream %s ends at sequence %d, before the checkpoint %d: it was recreated; "+
				"delete the row %q of the checkpoint table once its counters are repaired or reset", ErrConfig, name, info.State.LastSeq, from, src)
		case info.State.FirstSeq > from+1:
			c.m.errors.WithLabelValues("increments_expired").Inc()
			log.Error("increments were removed from the stream before they were counted (stream max age or limits); counters without a table may be low",
				zap.Uint64("checkpoint", from), zap.Uint64("first_seq", info.State.FirstSeq))
		}
	}
	occ := jetstream.OrderedConsumerConfig{FilterSubjects: []string{counters.IncrementSubjectPrefix + ">"}, DeliverPolicy: jetstream.DeliverAllPolicy}
	if from > 0 {
		occ.DeliverPolicy, occ.OptStartSeq = jetstream.DeliverByStartSequencePolicy, from+1
	}
	cons, err := js.OrderedConsumer(soft, name, occ)
	if err != nil {
		if soft.Err() != nil {
			return nil
		}
		return fmt.Errorf("increments consumer: %w", err)
	}
	it, err := cons.Messages()
	if err != nil {
		return fmt.Errorf("increments consumer: %w", err)
	}
	stop := context.AfterFunc(soft, it.Stop)
	defer stop()
	defer it.Stop()
	log.Info("consuming increments", zap.String("stream", name), zap.Uint64("from_seq", from+1))
	for {
		msg, err := it.Next()
		if err != nil {
			if soft.Err() != nil || errors.Is(err, jetstream.ErrMsgIteratorClosed) {
				return nil
			}
			log.Warn("increments: next message", zap.Error(err))
			continue
		}
		md, err := msg.Metadata()
		if err != nil {
			log.Warn("increments: message without metadata", zap.Error(err))
			continue
		}
		in := batcher.Input{Source: src, Pos: batcher.Pos{Major: md.Sequence.Stream}, Time: md.Timestamp}
		dl, err := c.set.ParseIncrement(msg.Data())
		if err != nil {
			c.m.errors.WithLabelValues(counterReason(err)).Inc()
			log.Warn("increment not applied", zap.Uint64("seq", md.Sequence.Stream), zap.String("subject", msg.Subject()), zap.Error(err))
		} else if want := counters.IncrementSubjectPrefix + dl.Counter; msg.Subject() != want {
			c.m.errors.WithLabelValues("bad_subject").Inc()
			log.Warn("increment not applied: subject does not match its counter", zap.String("subject", msg.Subject()), zap.String("want", want))
		} else {
			in.Deltas = []batcher.Delta{batcher.Delta(dl)}
		}
		if _, err := c.b.Add(soft, in); err != nil {
			if soft.Err() != nil || errors.Is(err, batcher.ErrClosed) {
				return nil
			}
			return fmt.Errorf("increments: %w", err)
		}
	}
}

// ensureIncrementStream creates the increments stream if it is missing.
func ensureIncrementStream(ctx context.Context, js jetstream.JetStream, name, placement string) (jetstream.Stream, error) {
	s, err := js.Stream(ctx, name)
	if err == nil {
		return s, nil
	}
	if !errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, fmt.Errorf("look up stream %s: %w", name, err)
	}
	sc := jetstream.StreamConfig{
		Name:        name,
		Description: "pgcache counter increments: {counter, key, delta} on counters.incr.<counter>",
		Subjects:    []string{counters.IncrementSubjectPrefix + ">"},
		Retention:   jetstream.LimitsPolicy,
		Storage:     jetstream.FileStorage,
		MaxAge:      7 * 24 * time.Hour,
		Duplicates:  2 * time.Minute,
	}
	if placement != "" {
		sc.Placement = &jetstream.Placement{Cluster: placement}
	}
	s, err = js.CreateStream(ctx, sc)
	if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
		return js.Stream(ctx, name)
	}
	if err != nil {
		return nil, fmt.Errorf("create stream %s: %w", name, err)
	}
	return s, nil
}

// startCounters runs the batcher and the increments consumer in g.
func (d *daemon) startCounters(soft, hard context.Context, g *errgroup.Group, js jetstream.JetStream, c *counterRun, stream *wal.Stream) {
	g.Go(func() error {
		defer c.pg.Close()
		err := c.b.Run(hard)
		if err != nil {
			return fmt.Errorf("counters: %w", err)
		}
		return nil
	})
	if c.hasIncrements() {
		g.Go(func() error { return d.runIncrements(soft, js, c, stream) })
	}
}

// --- invalidator repair ---

// runRepair is `invalidator repair -config F -counter NAME [-group V]...`.
func runRepair(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("invalidator repair", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "invalidator.yaml", "config file")
	name := fs.String("counter", "", "the counter to recompute")
	wait := fs.Duration("wait", 2*time.Minute, "how long to wait for the running invalidator to apply the repair (0: do not wait)")
	var groups groupFlags
	fs.Var(&groups, "group", "a group to recompute: its group_by values, comma-separated, or a JSON array of strings; repeatable. None: every group")
	if err := fs.Parse(args); err != nil {
		return exitConfig
	}
	cfg, _, err := LoadConfig(*path)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitConfig
	}
	c := cfg.counters.Counter(*name)
	if c == nil {
		fmt.Fprintf(stderr, "%v: no counter %q in %s\n", ErrConfig, *name, *path)
		return exitConfig
	}
	if c.Table == "" {
		fmt.Fprintf(stderr, "%v: counter %q has no source table: there is nothing to recount from\n", ErrConfig, *name)
		return exitConfig
	}
	for _, g := range groups {
		if len(g) != len(c.GroupBy) {
			fmt.Fprintf(stderr, "%v: group %q has %d values; counter %q groups by %v\n", ErrConfig, g, len(g), c.Name, c.GroupBy)
			return exitConfig
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if err := Repair(ctx, cfg, c, groups, *wait, stdout); err != nil {
		fmt.Fprintln(stderr, err)
		return exitError
	}
	return exitOK
}

type groupFlags [][]string

func (g *groupFlags) String() string { return fmt.Sprint(*g) }

func (g *groupFlags) Set(v string) error {
	if strings.HasPrefix(strings.TrimSpace(v), "[") {
		var vals []string
		if err := json.Unmarshal([]byte(v), &vals); err != nil {
			return fmt.Errorf("group %q: %w", v, err)
		}
		*g = append(*g, vals)
		return nil
	}
	*g = append(*g, strings.Split(v, ","))
	return nil
}

// Repair recomputes a counter (the given groups, or every group) from its
// source table and reconciles the stored counts, while writes go on.
//
// Why it is exact: the stored count of a group is the count at the
// batcher's checkpoint, plus deltas the batcher has not written yet. A
// count taken at some moment and written directly would be wrong by the
// deltas of transactions on either side of that moment. Instead, Repair
// takes the count at a known point of the WAL and lets the batcher apply
// it at that point:
//
//  1. In one transaction, LOCK TABLE <source> IN SHARE MODE. It waits
//     for every transaction that wrote the table to finish, and keeps new
//     writers out until this transaction ends. So every write to the table
//     that commits before this transaction's commit record is visible to
//     the count below, and every write after it commits later in the WAL.
//  2. Count the groups (a statement taken after the lock, READ COMMITTED,
//     sees every committed write).
//  3. Emit a transactional logical message (counters.RepairPrefix) with
//     the counts, and commit. The message's place in the WAL is exactly
//     the point where the counts hold.
//  4. The running invalidator meets the message in WAL order, after every
//     delta before it and before every delta after it, and sets the groups
//     to the counts there (with -group none: every other group to zero).
//     Later deltas add to the repaired values. A crash before that flush
//     replays the message from the WAL, like any delta.
//
// The lock blocks writers of the source table for the duration of the
// count only (an index lookup per group; a full scan without -group).
// Repair then waits until the invalidator's checkpoint passes the message
// and prints the stored values.
func Repair(ctx context.Context, cfg *Config, c *counters.Counter, groups [][]string, wait time.Duration, w io.Writer) error {
	conn, err := pgx.Connect(ctx, cfg.Postgres.DSN)
	if err != nil {
		return fmt.Errorf("repair: connect: %w", err)
	}
	defer conn.Close(context.Background())
	table, ckptTable := counterTables(cfg)
	r, msgLSN, err := recount(ctx, conn, c, groups, "", "")
	if err != nil {
		return fmt.Errorf("repair: %w", err)
	}
	fmt.Fprintf(w, "counter %s: recounted %d group(s) at WAL position %s\n", c.Name, len(r.Groups), msgLSN)
	lsn, err := pglogrepl.ParseLSN(msgLSN)
	if err != nil {
		return fmt.Errorf("repair: %w", err)
	}
	if wait <= 0 {
		fmt.Fprintln(w, "not waiting: the running invalidator applies it when it reads that position")
		return nil
	}
	deadline := time.Now().Add(wait)
	for {
		var pos int64
		err := conn.QueryRow(ctx, `SELECT pos FROM `+ckptTable+` WHERE source = $1`, walSource).Scan(&pos)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("repair: read checkpoint: %w", err)
		}
		if uint64(pos) > uint64(lsn) {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("repair: the invalidator has not applied the repair within %s (is the tail role running?); it will when it reads WAL position %s", wait, msgLSN)
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, g := range r.Groups {
		var n int64
		err := conn.QueryRow(ctx, `SELECT n FROM `+table+` WHERE counter = $1 AND grp = $2`, c.Name, counters.Group(g.Group)).Scan(&n)
		if errors.Is(err, pgx.ErrNoRows) {
			n, err = 0, nil
		}
		if err != nil {
			return fmt.Errorf("repair: read %v: %w", g.Group, err)
		}
		fmt.Fprintf(w, "  %v: recounted %d; stored now %d (later writes included)\n", g.Group, g.N, n)
	}
	fmt.Fprintln(w, "applied")
	return nil
}

func counterTables(cfg *Config) (table, ckptTable string) {
	table, ckptTable = batcher.DefaultTable, batcher.DefaultCheckpointTable
	if cfg.Batcher.Table != "" {
		table = cfg.Batcher.Table
	}
	if cfg.Batcher.CheckpointTable != "" {
		ckptTable = cfg.Batcher.CheckpointTable
	}
	return table, ckptTable
}

// recount counts groups of c's source table (every group when groups is
// empty) under a SHARE lock and emits the repair marker in the same
// transaction; see Repair. It returns the marker and its LSN. With initRow
// set, it first inserts that row into ckptTable, and does nothing (an
// empty msgLSN) if the row exists: the counter was initialized already.
func recount(ctx context.Context, conn *pgx.Conn, c *counters.Counter, groups [][]string, initRow, ckptTable string) (r counters.Repair, msgLSN string, err error) {
	schema, rel, _ := strings.Cut(c.Table, ".")
	var qtable string
	if err := conn.QueryRow(ctx, `SELECT quote_ident($1) || '.' || quote_ident($2)`, schema, rel).Scan(&qtable); err != nil {
		return r, "", err
	}
	types := make([]string, len(c.GroupBy))
	qcols := make([]string, len(c.GroupBy))
	for i, col := range c.GroupBy {
		qcols[i] = pgx.Identifier{col}.Sanitize()
		if err := conn.QueryRow(ctx, `SELECT format_type(atttypid, atttypmod) FROM pg_attribute
			WHERE attrelid = $1::regclass AND attname = $2 AND attnum > 0 AND NOT attisdropped`, qtable, col).Scan(&types[i]); err != nil {
			return r, "", fmt.Errorf("column %s of %s: %w", col, c.Table, err)
		}
	}
	r = counters.Repair{Counter: c.Name, All: len(groups) == 0}
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if initRow != "" {
			tag, err := tx.Exec(ctx, `INSERT INTO `+ckptTable+` (source, pos, sub) VALUES ($1, 0, 0) ON CONFLICT (source) DO NOTHING`, initRow)
			if err != nil {
				return fmt.Errorf("mark %s initialized: %w", c.Name, err)
			}
			if tag.RowsAffected() == 0 {
				return nil // initialized before
			}
		}
		if _, err := tx.Exec(ctx, `LOCK TABLE `+qtable+` IN SHARE MODE`); err != nil {
			return fmt.Errorf("lock %s: %w", c.Table, err)
		}
		if r.All {
			sel := make([]string, len(qcols))
			notNull := make([]string, len(qcols))
			for i, q := range qcols {
				sel[i] = "format('%s', " + q + ")"
				notNull[i] = q + " IS NOT NULL"
			}
			rows, err := tx.Query(ctx, `SELECT ARRAY[`+strings.Join(sel, ", ")+`], count(*) FROM `+qtable+
				` WHERE `+strings.Join(notNull, " AND ")+` GROUP BY 1`)
			if err != nil {
				return fmt.Errorf("count %s: %w", c.Table, err)
			}
			for rows.Next() {
				var g counters.RepairGroup
				if err := rows.Scan(&g.Group, &g.N); err != nil {
					rows.Close()
					return err
				}
				r.Groups = append(r.Groups, g)
			}
			if err := rows.Err(); err != nil {
				return fmt.Errorf("count %s: %w", c.Table, err)
			}
		} else {
			canon := make([]string, len(qcols))
			where := make([]string, len(qcols))
			for i := range qcols {
				canon[i] = fmt.Sprintf("format('%%s', $%d::text::%s)", i+1, types[i])
				where[i] = fmt.Sprintf("%s = $%d::text::%s", qcols[i], i+1, types[i])
			}
			q := `SELECT ARRAY[` + strings.Join(canon, ", ") + `], (SELECT count(*) FROM ` + qtable + ` WHERE ` + strings.Join(where, " AND ") + `)`
			for _, vals := range groups {
				args := make([]any, len(vals))
				for i, v := range vals {
					args[i] = v
				}
				var g counters.RepairGroup
				if err := tx.QueryRow(ctx, q, args...).Scan(&g.Group, &g.N); err != nil {
					return fmt.Errorf("count group %v: %w", vals, err)
				}
				r.Groups = append(r.Groups, g)
			}
		}
		return tx.QueryRow(ctx, `SELECT pg_logical_emit_message(true, $1, $2::text)::text`, counters.RepairPrefix, string(r.Encode())).Scan(&msgLSN)
	})
	return r, msgLSN, err
}

// initCounters counts, once per counter, the rows its source table held
// before the counter was configured: the same recount as Repair, at a
// WAL position the slot (created before) will deliver. A row
// "init:<counter>" in the checkpoint table, written in the same
// transaction, marks it done.
func (d *daemon) initCounters(ctx context.Context) error {
	_, ckptTable := counterTables(d.cfg)
	var conn *pgx.Conn
	for _, name := range d.cfg.counters.Names() {
		c := d.cfg.counters.Counter(name)
		if c.Table == "" {
			continue
		}
		if conn == nil {
			var err error
			if conn, err = pgx.Connect(ctx, d.cfg.Postgres.DSN); err != nil {
				return fmt.Errorf("counters: initial count: connect: %w", err)
			}
			defer conn.Close(context.Background())
		}
		r, lsn, err := recount(ctx, conn, c, nil, "init:"+c.Name, ckptTable)
		if err != nil {
			return fmt.Errorf("counters: initial count of %s: %w", c.Name, err)
		}
		if lsn != "" {
			d.log.Info("counted the rows present before the counter existed", zap.String("counter", c.Name),
				zap.Int("groups", len(r.Groups)), zap.String("lsn", lsn))
		}
	}
	return nil
}

// loadCheckpoints reads the checkpoints of sources again, retrying with
// backoff while the primary cannot answer (a restart, a failover): only
// ctx ends the wait, so a restarting primary does not stop the process.
func loadCheckpoints(ctx context.Context, b *batcher.Batcher, log *zap.Logger, sources ...string) error {
	wait := 100 * time.Millisecond
	for attempt := 1; ; attempt++ {
		err := b.Load(ctx, sources...)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if attempt == 1 || attempt%10 == 0 {
			log.Warn("cannot read the counter checkpoints; retrying", zap.Strings("sources", sources), zap.Int("attempt", attempt), zap.Duration("retry_in", wait), zap.Error(err))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		wait = min(2*wait, 5*time.Second)
	}
}
