package wal

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/pgcache/pgcache/backoff"
	"github.com/pgcache/pgcache/row"
	"go.uber.org/zap"
)

// TxInfo identifies a committed transaction.
type TxInfo struct {
	Xid uint32
	// CommitLSN is the position of the commit record (Begin's final LSN).
	CommitLSN pglogrepl.LSN
	// EndLSN is the end of the commit record, set for Commit only: the
	// position to Confirm once the transaction is handed off.
	EndLSN     pglogrepl.LSN
	CommitTime time.Time
}

// Message is a logical decoding message, sent with
// SELECT pg_logical_emit_message(transactional, prefix, content).
type Message struct {
	// LSN of the message. For a non-transactional message it is also the
	// position to Confirm once it is handed off.
	LSN           pglogrepl.LSN
	Transactional bool
	Prefix        string // one of Config.MessagePrefixes
	// Content is valid only during the Handler call.
	Content []byte
}

// Handler receives committed transactions as a stream, so that a
// transaction of a million rows is never held in memory by wal.
//
// Lifecycle: Run calls the methods from its own goroutine, one at a time,
// in WAL order. A transaction is Begin, then any number of Change and
// Message calls (transactional messages), then Commit with tx.EndLSN set
// and the transaction's acknowledgement. A non-transactional message is
// delivered as a transaction of its own: Begin, Message, Commit, with
// tx.Xid 0, CommitLSN and EndLSN equal to m.LSN, and CommitTime the
// server's send time. After a lost connection, a transaction whose Commit
// was not delivered is delivered again from its Begin: a Begin can follow
// a Begin without a Commit in between, and the handler should drop, or
// keep, what it received of the cut-off transaction (it is committed
// either way).
//
// Commit passes ownership of ack: the handler calls ack.Done once the
// transaction is durably handed off (now or later, from any goroutine),
// or hands parts of it on with ack.Split. Nothing else moves the slot past
// a transaction. If Commit returns an error, the ack is void: the
// transaction is delivered again (ErrRetry) or Run stops.
//
// A Change's Old and New slices, and a Message's Content, are reused after
// the call returns: copy what must outlive the call (the strings inside
// them may be kept).
//
// An error returned by a method stops Run, which returns it wrapped,
// unless it wraps ErrRetry: then Run reconnects and the transaction is
// delivered again from its Begin. The methods get Run's ctx; a method that
// returns because ctx ended makes Run return nil.
type Handler interface {
	Begin(ctx context.Context, tx TxInfo) error
	Change(ctx context.Context, tx TxInfo, c row.Change) error
	Message(ctx context.Context, tx TxInfo, m Message) error
	Commit(ctx context.Context, tx TxInfo, ack *Ack) error
}

// Relation is what the server says of a table it streams, each time it
// describes it (at the start of a connection, and after any change of the
// table's schema or replica identity).
type Relation struct {
	Table string // "schema.table"; the root's name for a partition published through it
	// Identity is the replica identity: 'd' default (primary key), 'n'
	// nothing, 'f' full, 'i' index.
	Identity byte
	// IdentityColumns are the columns an UPDATE's or DELETE's old row
	// carries (all of them with 'f').
	IdentityColumns []string
}

// State is what Run is doing.
type State int32

// States of a Stream.
const (
	StateIdle         State = iota // Run has not been called
	StateConnecting                // connecting, or starting replication
	StateStreaming                 // holding the slot and decoding
	StateStandby                   // another process holds the slot; retrying every StandbyRetry
	StateReconnecting              // waiting to reconnect after a lost connection
	StateStopped                   // Run returned
)

func (s State) String() string {
	switch s {
	case StateIdle:
		return "idle"
	case StateConnecting:
		return "connecting"
	case StateStreaming:
		return "streaming"
	case StateStandby:
		return "standby"
	case StateReconnecting:
		return "reconnecting"
	case StateStopped:
		return "stopped"
	}
	return "State(" + strconv.Itoa(int(s)) + ")"
}

// Stats is a snapshot of a Stream's positions and counters, for metrics.
type Stats struct {
	State State
	// ReceivedLSN is the highest position of a message received.
	ReceivedLSN pglogrepl.LSN
	// ConfirmedLSN is the position reported as flushed to the server: the
	// slot's confirmed_flush_lsn once the next status update is sent.
	ConfirmedLSN pglogrepl.LSN
	// ServerWALEnd is the server's WAL end as last reported by it.
	ServerWALEnd pglogrepl.LSN
	// LagBytes is ServerWALEnd - ConfirmedLSN (0 if negative): the WAL
	// the slot retains because of this stream.
	LagBytes uint64
	// LastCommitTime is the commit time of the last transaction delivered.
	LastCommitTime time.Time
	// DecodeLag is how long after its commit the last transaction was
	// received (both times from the server's clock); 0 once a keepalive
	// shows the stream idle with nothing in flight.
	DecodeLag time.Duration

	Txs             uint64 // transactions delivered (Commit calls that returned nil)
	Unacked         int    // transactions delivered whose Ack is not done yet
	Timeline        uint32 // the primary's timeline at the last session (0 before the first)
	Changes         uint64 // row changes delivered
	Messages        uint64 // logical messages delivered
	IgnoredMessages uint64 // logical messages whose prefix is not configured
	SkippedChanges  uint64 // row changes of tables not in Config.Tables
	// Uncovered counts SkippedChanges per table: a published table that no
	// rule or counter covers (each is logged once).
	Uncovered    map[string]uint64
	DecodeErrors uint64 // messages that could not be decoded (logged)
	Reconnects   uint64 // reconnections after a lost connection
}

// Stream tails the slot. Create it with New, call Setup once, then Run.
type Stream struct {
	cfg Config
	log *zap.Logger

	runMu     sync.Mutex // held by Run while it runs
	stopOnce  sync.Once
	stopc     chan struct{} // closed by Drain: Run stops reading
	acks      *ackTracker
	timeline  atomic.Uint32 // the primary's timeline at the last session; 0 before the first
	confirmed atomic.Uint64 // pglogrepl.LSN; only grows
	received  atomic.Uint64
	walEnd    atomic.Uint64
	reconnect atomic.Uint64
	cnt       counters

	mu         sync.Mutex // guards state, lastCommit, decodeLag, uncovered
	state      State
	uncovered  map[string]uint64 // changes of published tables not configured, per table
	lastCommit time.Time
	decodeLag  time.Duration

	// Owned by Run's goroutine.
	dec          *decoder
	standbySince time.Time
}

// New validates cfg and returns a Stream. log is named "wal".
func New(cfg Config, log *zap.Logger) (*Stream, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	if log == nil {
		log = zap.NewNop()
	}
	s := &Stream{cfg: cfg, log: log.Named("wal")}
	s.stopc = make(chan struct{})
	s.acks = newAckTracker(s.confirm)
	s.dec = newDecoder(cfg.Tables, cfg.MessagePrefixes, &s.cnt, s.acks)
	s.dec.onRelation = cfg.OnRelation
	s.dec.onSkip = s.skipped
	return s, nil
}

// confirm records that everything up to lsn is durably handed off (a
// transaction whose every Ack part is done, a keepalive or a filtered
// message while nothing is in flight, the slot's own position). Run sends
// it to the server as the flushed position with the next status update.
// A position lower than one already confirmed is ignored. It is the only
// way a position reaches the slot.
func (s *Stream) confirm(lsn pglogrepl.LSN) {
	atomicMax(&s.confirmed, uint64(lsn))
}

func atomicMax(a *atomic.Uint64, v uint64) {
	for {
		cur := a.Load()
		if v <= cur || a.CompareAndSwap(cur, v) {
			return
		}
	}
}

// Stats returns the current positions and counters.
func (s *Stream) Stats() Stats {
	st := Stats{
		ReceivedLSN:     pglogrepl.LSN(s.received.Load()),
		ConfirmedLSN:    pglogrepl.LSN(s.confirmed.Load()),
		ServerWALEnd:    pglogrepl.LSN(s.walEnd.Load()),
		Txs:             s.cnt.txs.Load(),
		Changes:         s.cnt.changes.Load(),
		Messages:        s.cnt.messages.Load(),
		IgnoredMessages: s.cnt.ignoredMessages.Load(),
		SkippedChanges:  s.cnt.skippedChanges.Load(),
		DecodeErrors:    s.cnt.decodeErrors.Load(),
		Reconnects:      s.reconnect.Load(),
		Unacked:         s.acks.pending(),
		Timeline:        s.timeline.Load(),
	}
	if st.ServerWALEnd > st.ConfirmedLSN {
		st.LagBytes = uint64(st.ServerWALEnd - st.ConfirmedLSN)
	}
	s.mu.Lock()
	st.State, st.LastCommitTime, st.DecodeLag = s.state, s.lastCommit, s.decodeLag
	if len(s.uncovered) > 0 {
		st.Uncovered = maps.Clone(s.uncovered)
	}
	s.mu.Unlock()
	return st
}

// skipped counts a change of a published table that no rule covers, and
// logs the table the first time: a gap in the rules must not hide.
func (s *Stream) skipped(table string) {
	s.mu.Lock()
	if s.uncovered == nil {
		s.uncovered = make(map[string]uint64)
	}
	n := s.uncovered[table]
	s.uncovered[table] = n + 1
	s.mu.Unlock()
	if n == 0 {
		s.log.Warn("changes of a published table that no rule or counter covers are dropped; add a rule, or remove the table from the publication",
			zap.String("table", table), zap.String("publication", s.cfg.Publication))
	}
}

func (s *Stream) setState(st State) {
	s.mu.Lock()
	s.state = st
	s.mu.Unlock()
}

// Run streams the slot and calls h until ctx ends (it then returns nil),
// h returns an error (other than ErrRetry, which reconnects), the slot is
// gone (ErrSlotGone), or a non-retryable error occurs. A lost connection
// is retried with backoff; a slot held by another process is retried
// every StandbyRetry (hot standby). Run may be called again after it
// returns; it resumes after the last transaction h accepted.
func (s *Stream) Run(ctx context.Context, h Handler) error {
	if !s.runMu.TryLock() {
		return ErrRunning
	}
	defer s.runMu.Unlock()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() { // ends with Run: cancel above
		select {
		case <-s.stopc:
			cancel()
		case <-ctx.Done():
		}
	}()
	defer s.setState(StateStopped)

	retry := backoff.Policy{Min: s.cfg.ReconnectMin, Max: s.cfg.ReconnectMax}
	attempt := 0
	var unknownRelAt pglogrepl.LSN
	for {
		if ctx.Err() != nil {
			return nil
		}
		if s.standbySince.IsZero() {
			s.setState(StateConnecting)
		}
		started, lsn, err := s.session(ctx, h)
		if ctx.Err() != nil {
			return nil
		}
		if started {
			attempt = 0
		}
		var herr *handlerError
		switch {
		case errors.As(err, &herr) && !errors.Is(err, ErrRetry):
			return err
		case errors.Is(err, ErrSlotInUse):
			if s.standbySince.IsZero() {
				s.standbySince = time.Now()
				s.log.Info("replication slot in use by another process; waiting as hot standby",
					zap.String("slot", s.cfg.Slot), zap.Duration("retry", s.cfg.StandbyRetry), zap.Error(err))
			}
			s.setState(StateStandby)
			if backoff.Wait(ctx, s.cfg.StandbyRetry) != nil {
				return nil
			}
			continue
		case errors.Is(err, ErrSlotGone):
			s.log.Error("replication slot gone", zap.String("slot", s.cfg.Slot), zap.Error(err))
			return err
		case errors.Is(err, ErrUnknownRelation):
			s.cnt.decodeErrors.Add(1)
			if unknownRelAt == lsn {
				s.log.Error("row change for an undescribed relation again after reconnecting", zap.Error(err))
				return err
			}
			unknownRelAt = lsn
			s.log.Warn("row change for an undescribed relation; reconnecting so the server describes it again", zap.Error(err))
		case Retryable(err):
		default:
			return err
		}
		s.reconnect.Add(1)
		s.setState(StateReconnecting)
		wait := retry.Delay(attempt)
		attempt++
		s.log.Warn("replication connection lost; reconnecting", zap.Duration("in", wait), zap.Error(err))
		if backoff.Wait(ctx, wait) != nil {
			return nil
		}
	}
}

// withTimeout applies d when ctx has no deadline.
func withTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, d)
}

const (
	connectTimeout = 10 * time.Second
	writeTimeout   = 10 * time.Second
)

func (s *Stream) connectRepl(ctx context.Context) (*pgconn.PgConn, error) {
	pc, err := pgconn.ParseConfig(s.cfg.DSN)
	if err != nil {
		return nil, fmt.Errorf("wal: parse DSN: %w", err)
	}
	pc.RuntimeParams["replication"] = "database"
	if pc.ConnectTimeout == 0 {
		pc.ConnectTimeout = connectTimeout
	}
	conn, err := pgconn.ConnectConfig(ctx, pc)
	if err != nil {
		return nil, classify("connect", err)
	}
	return conn, nil
}

// classify turns a server or network error into the package's errors:
// ErrSlotInUse, ErrConnLost (retryable), or a fatal error.
func classify(doing string, err error) error {
	if errors.Is(err, ErrSlotGone) || errors.Is(err, ErrSlotInUse) || errors.Is(err, ErrConnLost) {
		return err
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "55006" { // object_in_use
		return fmt.Errorf("%w: %s: %w", ErrSlotInUse, doing, err)
	}
	if pgErr == nil || GoingAway(err) { // no server reply, or the server is going away
		return fmt.Errorf("%w: %s: %w", ErrConnLost, doing, err)
	}
	return fmt.Errorf("wal: %s: %w", doing, err)
}

// GoingAway reports whether err means the Postgres server is shutting
// down, restarting, out of resources or unreachable, rather than a
// problem with the request: no server reply at all (a connection
// failure), or SQLSTATE class 08 (connection exception), 53
// (insufficient resources) or 57P (operator intervention: shutdown,
// crash, not yet accepting connections). A cancelled ctx is not. It is
// the one definition that every package retrying against Postgres uses.
func GoingAway(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return false
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		c := pgErr.Code
		return len(c) == 5 && (c[:2] == "08" || c[:2] == "53" || c[:3] == "57P")
	}
	return true
}

// session runs one connection: connect, check the slot, start
// replication, stream until an error. started reports that replication
// started; lsn is the position of the last message received.
func (s *Stream) session(ctx context.Context, h Handler) (started bool, lsn pglogrepl.LSN, err error) {
	cctx, cancel := withTimeout(ctx, connectTimeout)
	defer cancel()
	conn, err := s.connectRepl(cctx)
	if err != nil {
		return false, 0, err
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = conn.Close(cctx)
	}()

	if err := s.checkTimeline(cctx, conn); err != nil {
		return false, 0, err
	}
	if err := s.checkSlot(cctx, conn); err != nil {
		return false, 0, err
	}
	start := max(pglogrepl.LSN(s.confirmed.Load()), s.dec.lastDispatched)
	err = pglogrepl.StartReplication(cctx, conn, s.cfg.Slot, start, pglogrepl.StartReplicationOptions{
		Mode: pglogrepl.LogicalReplication,
		PluginArgs: []string{
			"proto_version '1'",
			"publication_names '" + s.cfg.Publication + "'",
			"messages 'true'",
		},
	})
	if err != nil {
		return false, 0, s.classifyStream(ctx, "start replication", err, true)
	}
	cancel()

	s.dec.reset()
	s.setState(StateStreaming)
	if !s.standbySince.IsZero() {
		s.log.Info("took over the replication slot", zap.String("slot", s.cfg.Slot),
			zap.Duration("waited", time.Since(s.standbySince)))
		s.standbySince = time.Time{}
	}
	s.log.Info("streaming", zap.String("slot", s.cfg.Slot), zap.Stringer("from", start))

	// Status updates go out from their own goroutine, straight to the
	// socket, so the server hears from us while the handler blocks.
	nc := conn.Conn()
	fctx, fcancel := context.WithCancel(context.Background())
	reply := make(chan struct{}, 1)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.feedback(fctx, nc, reply)
	}()
	// Cancelling ctx interrupts a blocked read.
	stop := context.AfterFunc(ctx, func() { _ = nc.SetReadDeadline(time.Now()) })

	lsn, err = s.stream(ctx, h, conn, reply)

	stop()
	fcancel()
	wg.Wait()
	if ctx.Err() != nil {
		// Soft stop: report the last confirmed position before closing.
		if err := s.sendStatus(nc); err != nil {
			s.log.Debug("final status update", zap.Error(err))
		}
		return true, lsn, nil
	}
	return true, lsn, err
}

// checkSlot looks the slot up on the replication connection.
func (s *Stream) checkSlot(ctx context.Context, conn *pgconn.PgConn) error {
	res, err := conn.Exec(ctx, "SELECT slot_type, plugin, database = current_database(), active_pid, "+
		"confirmed_flush_lsn, wal_status FROM pg_replication_slots WHERE slot_name = '"+s.cfg.Slot+"'").ReadAll()
	if err != nil {
		return classify("look up slot", err)
	}
	if len(res) != 1 || len(res[0].Rows) == 0 {
		return slotGone(s.cfg.Slot, "does not exist")
	}
	row := res[0].Rows[0]
	if len(row) != 6 {
		return fmt.Errorf("wal: look up slot: got %d columns", len(row))
	}
	if string(row[0]) != "logical" || string(row[1]) != "pgoutput" {
		return fmt.Errorf("wal: slot %q is a %s slot with plugin %q; want logical with pgoutput", s.cfg.Slot, row[0], row[1])
	}
	if string(row[2]) != "t" {
		return fmt.Errorf("wal: slot %q belongs to another database", s.cfg.Slot)
	}
	if string(row[5]) == "lost" {
		return slotGone(s.cfg.Slot, "was invalidated (wal_status lost: the WAL it needs was removed)")
	}
	if row[3] != nil {
		return fmt.Errorf("%w: slot %q held by pid %s", ErrSlotInUse, s.cfg.Slot, row[3])
	}
	if row[4] != nil {
		if lsn, err := pglogrepl.ParseLSN(string(row[4])); err == nil {
			s.confirm(lsn)
		}
	}
	return nil
}

// classifyStream classifies an error of START_REPLICATION (starting) or of
// the stream. A missing slot, or an invalidated one (SQLSTATE 55000, which
// also covers other states), is checked on a fresh connection.
func (s *Stream) classifyStream(ctx context.Context, doing string, err error, starting bool) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		if starting && pgErr.Code == "42704" { // undefined_object
			return slotGone(s.cfg.Slot, "does not exist")
		}
		if pgErr.Code == "55000" { // object_not_in_prerequisite_state
			cctx, cancel := withTimeout(ctx, connectTimeout)
			defer cancel()
			if info, serr := SlotStatus(cctx, s.cfg.DSN, s.cfg.Slot); serr == nil && (!info.Exists || info.WALStatus == "lost") {
				return slotGone(s.cfg.Slot, "was invalidated: "+pgErr.Message)
			}
		}
	}
	return classify(doing, err)
}

// stream reads the replication stream until an error.
func (s *Stream) stream(ctx context.Context, h Handler, conn *pgconn.PgConn, reply chan<- struct{}) (pglogrepl.LSN, error) {
	var last pglogrepl.LSN
	for {
		if ctx.Err() != nil {
			return last, ctx.Err()
		}
		msg, err := conn.ReceiveMessage(context.Background())
		if err != nil {
			if ctx.Err() != nil {
				return last, ctx.Err()
			}
			return last, s.classifyStream(ctx, "receive", err, false)
		}
		switch m := msg.(type) {
		case *pgproto3.CopyData:
			lsn, err := s.handleCopyData(ctx, h, m.Data, reply)
			if lsn != 0 {
				last = lsn
			}
			if err != nil {
				return last, err
			}
		case *pgproto3.ErrorResponse:
			return last, s.classifyStream(ctx, "stream", pgconn.ErrorResponseToPgError(m), false)
		case *pgproto3.CopyDone:
			return last, fmt.Errorf("%w: server ended the replication stream", ErrConnLost)
		default:
			// NoticeResponse, ParameterStatus: nothing to do.
		}
	}
}

// handleCopyData handles one message of the replication stream: a
// keepalive or an XLogData. lsn is the XLogData's position (0 for a
// keepalive). An error ends the stream.
func (s *Stream) handleCopyData(ctx context.Context, h Handler, data []byte, reply chan<- struct{}) (lsn pglogrepl.LSN, err error) {
	if len(data) == 0 {
		s.cnt.decodeErrors.Add(1)
		s.log.Warn("empty CopyData message; ignored")
		return 0, nil
	}
	switch data[0] {
	case pglogrepl.PrimaryKeepaliveMessageByteID:
		ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(data[1:])
		if err != nil {
			s.cnt.decodeErrors.Add(1)
			s.log.Warn("bad keepalive; ignored", zap.Error(err))
			return 0, nil
		}
		atomicMax(&s.walEnd, uint64(ka.ServerWALEnd))
		if s.idle() {
			// Invariant I5: nothing in flight, and everything before the
			// server's position was decoded and delivered, or not published.
			s.confirm(ka.ServerWALEnd)
			s.mu.Lock()
			s.decodeLag = 0
			s.mu.Unlock()
		}
		if ka.ReplyRequested {
			select {
			case reply <- struct{}{}:
			default:
			}
		}
		return 0, nil

	case pglogrepl.XLogDataByteID:
		xld, err := pglogrepl.ParseXLogData(data[1:])
		if err != nil {
			s.cnt.decodeErrors.Add(1)
			return 0, fmt.Errorf("%w: %w", ErrDecode, err)
		}
		atomicMax(&s.received, uint64(xld.WALStart))
		atomicMax(&s.walEnd, uint64(xld.ServerWALEnd))
		skipped, err := s.dec.decode(ctx, h, xld.WALStart, xld.ServerTime, xld.WALData)
		if err != nil {
			if errors.Is(err, errUnknownType) {
				s.cnt.decodeErrors.Add(1)
				s.log.Warn("unknown pgoutput message; skipped", zap.Error(err))
				return xld.WALStart, nil
			}
			if isFatalDecode(err) {
				s.cnt.decodeErrors.Add(1)
				s.log.Error("cannot decode pgoutput message", zap.Stringer("lsn", xld.WALStart), zap.Error(err))
			}
			return xld.WALStart, err
		}
		if xld.WALData[0] == 'C' {
			s.mu.Lock()
			s.lastCommit = s.dec.tx.CommitTime
			s.decodeLag = max(0, xld.ServerTime.Sub(s.dec.tx.CommitTime))
			s.mu.Unlock()
		}
		if skipped && s.idle() {
			s.confirm(xld.WALStart)
		}
		return xld.WALStart, nil
	}
	s.cnt.decodeErrors.Add(1)
	s.log.Warn("unknown replication message; ignored", zap.Uint8("type", data[0]))
	return 0, nil
}

// idle reports that no transaction is open and everything delivered has
// been confirmed.
func (s *Stream) idle() bool {
	return !s.dec.inTx && s.acks.pending() == 0
}

// feedback sends a status update every StatusInterval and when the server
// asks for one, until ctx ends. A failed write closes the socket, which
// ends the stream with ErrConnLost.
func (s *Stream) feedback(ctx context.Context, nc net.Conn, reply <-chan struct{}) {
	t := time.NewTicker(s.cfg.StatusInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-reply:
		}
		if err := s.sendStatus(nc); err != nil {
			s.log.Warn("status update failed; closing the connection", zap.Error(err))
			_ = nc.Close()
			return
		}
	}
}

// sendStatus writes a Standby Status Update: written = received, flushed
// and applied = confirmed. It is only called by one goroutine at a time.
func (s *Stream) sendStatus(nc net.Conn) error {
	confirmed := s.confirmed.Load()
	written := max(s.received.Load(), confirmed)
	var b [39]byte
	b[0] = 'd'
	binary.BigEndian.PutUint32(b[1:], 38)
	b[5] = pglogrepl.StandbyStatusUpdateByteID
	binary.BigEndian.PutUint64(b[6:], written)
	binary.BigEndian.PutUint64(b[14:], confirmed)
	binary.BigEndian.PutUint64(b[22:], confirmed)
	binary.BigEndian.PutUint64(b[30:], uint64(time.Since(pgEpoch).Microseconds()))
	// b[38] = 0: no reply requested.
	if err := nc.SetWriteDeadline(time.Now().Add(writeTimeout)); err != nil {
		return err
	}
	_, err := nc.Write(b[:])
	return err
}
