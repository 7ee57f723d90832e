package wal

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/pgcache/pgcache/row"
)

// This file decodes pgoutput protocol version 1 messages (text format) and
// calls the Handler. It is written against the protocol description
// (https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html)
// rather than pglogrepl.Parse, because every length must be checked before
// it is used (pglogrepl.Parse indexes past the end of short input) and
// because a row change is decoded into reused slices, not fresh structs.

// counters are the decoder's and stream's event counts, read by Stats from
// any goroutine.
type counters struct {
	txs, changes, messages, ignoredMessages, skippedChanges, decodeErrors atomic.Uint64
}

// relation is what a Relation message said about a table.
type relation struct {
	table    string   // "schema.table"
	cols     []string // column names in tuple order
	key      []bool   // column is part of the replica identity (flag 1)
	identity byte     // the relation's replica identity: 'd', 'n', 'f' or 'i'
	wanted   bool     // passes the table filter
}

// decoder turns pgoutput messages into Handler calls. It is owned by one
// goroutine.
type decoder struct {
	rels     map[uint32]*relation
	tables   map[string]bool // nil: every table is wanted
	prefixes []string
	cnt      *counters
	acks     *ackTracker
	// onRelation (may be nil) is told of every wanted relation the server
	// describes, with its replica identity; onSkip of every change of a
	// published table that is not wanted.
	onRelation func(Relation)
	onSkip     func(table string)

	inTx bool
	tx   TxInfo
	// lastDispatched is the end LSN of the last transaction whose Commit
	// the handler accepted, or the LSN of the last non-transactional
	// message it accepted.
	lastDispatched pglogrepl.LSN

	change   row.Change
	old, new []row.Column
}

func newDecoder(tables []string, prefixes []string, cnt *counters, acks *ackTracker) *decoder {
	d := &decoder{rels: make(map[uint32]*relation), prefixes: prefixes, cnt: cnt, acks: acks}
	if len(tables) > 0 {
		d.tables = make(map[string]bool, len(tables))
		for _, t := range tables {
			d.tables[t] = true
		}
	}
	return d
}

// reset forgets the connection's state: relations are described again on
// a new connection, and an open transaction is sent again from its Begin.
// skip counts a change of a published table that is not wanted.
func (d *decoder) skip(table string) {
	d.cnt.skippedChanges.Add(1)
	if d.onSkip != nil {
		d.onSkip(table)
	}
}

func (d *decoder) reset() {
	clear(d.rels)
	d.inTx = false
	d.tx = TxInfo{}
}

// errUnknownType marks a message type the decoder does not know; the
// stream logs, counts and skips it.
var errUnknownType = fmt.Errorf("%w: unknown message type", ErrDecode)

// handlerError is an error returned by the Handler.
type handlerError struct {
	op  string
	lsn pglogrepl.LSN
	err error
}

func (e *handlerError) Error() string {
	return fmt.Sprintf("wal: handler %s at %s: %v", e.op, e.lsn, e.err)
}

func (e *handlerError) Unwrap() error { return e.err }

func decodeErr(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrDecode}, args...)...)
}

// reader reads big-endian protocol fields; a read past the end sets bad
// and returns zero values.
type reader struct {
	b   []byte
	bad bool
}

func (r *reader) u8() byte {
	if len(r.b) < 1 {
		r.bad = true
		return 0
	}
	v := r.b[0]
	r.b = r.b[1:]
	return v
}

func (r *reader) u16() uint16 {
	if len(r.b) < 2 {
		r.bad = true
		return 0
	}
	v := binary.BigEndian.Uint16(r.b)
	r.b = r.b[2:]
	return v
}

func (r *reader) u32() uint32 {
	if len(r.b) < 4 {
		r.bad = true
		return 0
	}
	v := binary.BigEndian.Uint32(r.b)
	r.b = r.b[4:]
	return v
}

func (r *reader) u64() uint64 {
	if len(r.b) < 8 {
		r.bad = true
		return 0
	}
	v := binary.BigEndian.Uint64(r.b)
	r.b = r.b[8:]
	return v
}

// cstr reads a NUL-terminated string, without the NUL.
func (r *reader) cstr() []byte {
	i := bytes.IndexByte(r.b, 0)
	if i < 0 {
		r.bad = true
		r.b = nil
		return nil
	}
	s := r.b[:i]
	r.b = r.b[i+1:]
	return s
}

func (r *reader) bytes(n uint32) []byte {
	if uint64(n) > uint64(len(r.b)) {
		r.bad = true
		r.b = nil
		return nil
	}
	s := r.b[:n]
	r.b = r.b[n:]
	return s
}

// done reports an error if the message was short or has bytes left.
func (r *reader) done(what string) error {
	if r.bad {
		return decodeErr("%s message truncated", what)
	}
	if len(r.b) != 0 {
		return decodeErr("%s message has %d trailing bytes", what, len(r.b))
	}
	return nil
}

// pgEpoch is 2000-01-01 UTC, the origin of Postgres timestamps.
var pgEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

// pgTime converts microseconds since 2000-01-01, clamping values a
// time.Duration cannot hold.
func pgTime(us int64) time.Time {
	const maxUs = math.MaxInt64 / int64(time.Microsecond)
	if us > maxUs {
		us = maxUs
	} else if us < -maxUs {
		us = -maxUs
	}
	return pgEpoch.Add(time.Duration(us) * time.Microsecond)
}

// decode handles one pgoutput message that the server sent in an XLogData
// at walStart, at serverTime. skipped reports a non-transactional message
// that was filtered out, after which the stream may move the confirmed
// position when nothing is in flight.
//
// Errors: errUnknownType (skip it), a *handlerError, ErrUnknownRelation,
// or ErrDecode for a malformed message or one out of protocol order.
// Calls to h are made in the order of the messages.
func (d *decoder) decode(ctx context.Context, h Handler, walStart pglogrepl.LSN, serverTime time.Time, data []byte) (skipped bool, err error) {
	if len(data) == 0 {
		return false, decodeErr("empty message")
	}
	r := reader{b: data[1:]}
	switch data[0] {
	case 'B':
		final := pglogrepl.LSN(r.u64())
		ct := pgTime(int64(r.u64()))
		xid := r.u32()
		if err := r.done("Begin"); err != nil {
			return false, err
		}
		if d.inTx {
			return false, decodeErr("Begin of xid %d at %s inside xid %d", xid, walStart, d.tx.Xid)
		}
		d.inTx = true
		d.tx = TxInfo{Xid: xid, CommitLSN: final, CommitTime: ct}
		if err := h.Begin(ctx, d.tx); err != nil {
			return false, &handlerError{"Begin", walStart, err}
		}
		return false, nil

	case 'C':
		_ = r.u8() // flags, unused
		commit := pglogrepl.LSN(r.u64())
		end := pglogrepl.LSN(r.u64())
		ct := pgTime(int64(r.u64()))
		if err := r.done("Commit"); err != nil {
			return false, err
		}
		if !d.inTx {
			return false, decodeErr("Commit at %s outside a transaction", commit)
		}
		if commit != d.tx.CommitLSN {
			return false, decodeErr("Commit LSN %s does not match Begin's %s", commit, d.tx.CommitLSN)
		}
		d.tx.EndLSN = end
		d.tx.CommitTime = ct
		d.inTx = false
		ack := d.acks.open(end)
		if err := h.Commit(ctx, d.tx, ack); err != nil {
			d.acks.abandon(ack.rec)
			return false, &handlerError{"Commit", walStart, err}
		}
		d.cnt.txs.Add(1)
		if end > d.lastDispatched {
			d.lastDispatched = end
		}
		return false, nil

	case 'R':
		return false, d.relation(&r)

	case 'Y': // Type: only needed for binary format
		_ = r.u32()
		_ = r.cstr()
		_ = r.cstr()
		return false, r.done("Type")

	case 'O': // Origin of a replicated transaction: no effect on keys
		_ = r.u64()
		_ = r.cstr()
		return false, r.done("Origin")

	case 'I', 'U', 'D':
		return false, d.rowChange(ctx, h, data[0], &r, walStart)

	case 'T':
		return false, d.truncate(ctx, h, &r, walStart)

	case 'M':
		return d.message(ctx, h, &r, serverTime)
	}
	return false, fmt.Errorf("%w %q at %s", errUnknownType, data[0], walStart)
}

func (d *decoder) relation(r *reader) error {
	id := r.u32()
	ns := r.cstr()
	name := r.cstr()
	identity := r.u8()
	n := int(r.u16())
	if r.bad {
		return decodeErr("Relation message truncated")
	}
	// Each column takes at least 10 bytes: do not trust n for the size.
	capn := min(n, len(r.b)/10)
	rel := &relation{cols: make([]string, 0, capn), key: make([]bool, 0, capn)}
	for i := 0; i < n && !r.bad; i++ {
		flags := r.u8()
		col := r.cstr()
		_ = r.u32() // type oid
		_ = r.u32() // type modifier
		rel.cols = append(rel.cols, string(col))
		rel.key = append(rel.key, flags&1 != 0)
	}
	if err := r.done("Relation"); err != nil {
		return err
	}
	if len(ns) == 0 {
		ns = []byte("pg_catalog")
	}
	rel.table = string(ns) + "." + string(name)
	rel.identity = identity
	rel.wanted = d.tables == nil || d.tables[rel.table]
	d.rels[id] = rel
	if rel.wanted && d.onRelation != nil {
		var keyCols []string
		for i, k := range rel.key {
			if k {
				keyCols = append(keyCols, rel.cols[i])
			}
		}
		d.onRelation(Relation{Table: rel.table, Identity: identity, IdentityColumns: keyCols})
	}
	return nil
}

// tuple decodes TupleData into dst. With keyOnly, only replica-identity
// columns are kept: a 'K' tuple sends the others as NULL placeholders.
func (d *decoder) tuple(r *reader, rel *relation, dst []row.Column, keyOnly bool) ([]row.Column, error) {
	n := int(r.u16())
	if r.bad {
		return dst, decodeErr("tuple truncated")
	}
	if n != len(rel.cols) {
		return dst, decodeErr("tuple of %s has %d columns; relation has %d", rel.table, n, len(rel.cols))
	}
	dst = dst[:0]
	for i := 0; i < n; i++ {
		// A filtered table's values are checked but not kept.
		keep := rel.wanted && (!keyOnly || rel.key[i])
		var v row.Value
		switch kind := r.u8(); kind {
		case 'n':
			v.Null = true
		case 'u':
			v.Unchanged = true
		case 't':
			b := r.bytes(r.u32())
			if r.bad {
				return dst, decodeErr("tuple of %s truncated in column %q", rel.table, rel.cols[i])
			}
			if keep {
				v.Text = string(b)
			}
		default:
			if r.bad {
				return dst, decodeErr("tuple of %s truncated", rel.table)
			}
			// 'b' (binary) is only sent when asked for; we never ask.
			return dst, decodeErr("tuple of %s: column %q has value kind %q", rel.table, rel.cols[i], kind)
		}
		if keep {
			dst = append(dst, row.Column{Name: rel.cols[i], Value: v})
		}
	}
	return dst, nil
}

func (d *decoder) rel(id uint32, walStart pglogrepl.LSN) (*relation, error) {
	rel, ok := d.rels[id]
	if !ok {
		return nil, fmt.Errorf("%w: relation id %d at %s", ErrUnknownRelation, id, walStart)
	}
	return rel, nil
}

func (d *decoder) rowChange(ctx context.Context, h Handler, kind byte, r *reader, walStart pglogrepl.LSN) error {
	if !d.inTx {
		return decodeErr("row change %q at %s outside a transaction", kind, walStart)
	}
	id := r.u32()
	if r.bad {
		return decodeErr("row change %q truncated", kind)
	}
	rel, err := d.rel(id, walStart)
	if err != nil {
		return err
	}
	c := &d.change
	*c = row.Change{Table: rel.table}
	tag := r.u8()
	switch kind {
	case 'I':
		c.Op = row.Insert
		if tag != 'N' {
			return decodeErr("Insert at %s: tuple tag %q, want 'N'", walStart, tag)
		}
	case 'U':
		c.Op = row.Update
		if tag == 'K' || tag == 'O' {
			if d.old, err = d.tuple(r, rel, d.old, tag == 'K'); err != nil {
				return err
			}
			c.Old = d.old
			tag = r.u8()
		}
		if tag != 'N' {
			return decodeErr("Update at %s: tuple tag %q, want 'N'", walStart, tag)
		}
	case 'D':
		c.Op = row.Delete
		if tag != 'K' && tag != 'O' {
			return decodeErr("Delete at %s: tuple tag %q, want 'K' or 'O'", walStart, tag)
		}
		if d.old, err = d.tuple(r, rel, d.old, tag == 'K'); err != nil {
			return err
		}
		c.Old = d.old
	}
	if kind != 'D' {
		if d.new, err = d.tuple(r, rel, d.new, false); err != nil {
			return err
		}
		c.New = d.new
	}
	if err := r.done(c.Op.String()); err != nil {
		return err
	}
	if !rel.wanted {
		d.skip(rel.table)
		return nil
	}
	if err := h.Change(ctx, d.tx, *c); err != nil {
		return &handlerError{"Change", walStart, err}
	}
	d.cnt.changes.Add(1)
	return nil
}

func (d *decoder) truncate(ctx context.Context, h Handler, r *reader, walStart pglogrepl.LSN) error {
	if !d.inTx {
		return decodeErr("Truncate at %s outside a transaction", walStart)
	}
	n := r.u32()
	_ = r.u8() // options: CASCADE, RESTART IDENTITY
	if r.bad || uint64(n)*4 != uint64(len(r.b)) {
		return decodeErr("Truncate at %s: %d relations in %d bytes", walStart, n, len(r.b))
	}
	// Check every relation before the first call, so a bad id does not
	// leave half the message delivered.
	for rb := r.b; len(rb) >= 4; rb = rb[4:] {
		if _, err := d.rel(binary.BigEndian.Uint32(rb), walStart); err != nil {
			return err
		}
	}
	for ; len(r.b) >= 4; r.b = r.b[4:] {
		rel := d.rels[binary.BigEndian.Uint32(r.b)]
		if !rel.wanted {
			d.skip(rel.table)
			continue
		}
		if err := h.Change(ctx, d.tx, row.Change{Table: rel.table, Op: row.Truncate}); err != nil {
			return &handlerError{"Change", walStart, err}
		}
		d.cnt.changes.Add(1)
	}
	return nil
}

func (d *decoder) message(ctx context.Context, h Handler, r *reader, serverTime time.Time) (skipped bool, err error) {
	flags := r.u8()
	lsn := pglogrepl.LSN(r.u64())
	prefix := r.cstr()
	content := r.bytes(r.u32())
	if err := r.done("Message"); err != nil {
		return false, err
	}
	m := Message{LSN: lsn, Transactional: flags&1 != 0, Content: content}
	for _, p := range d.prefixes {
		if string(prefix) == p {
			m.Prefix = p
			break
		}
	}
	if m.Transactional && !d.inTx {
		return false, decodeErr("transactional message at %s outside a transaction", lsn)
	}
	if m.Prefix == "" {
		d.cnt.ignoredMessages.Add(1)
		return !m.Transactional, nil
	}
	if m.Transactional {
		if err := h.Message(ctx, d.tx, m); err != nil {
			return false, &handlerError{"Message", lsn, err}
		}
		d.cnt.messages.Add(1)
		return false, nil
	}
	// A non-transactional message is delivered as a transaction of its
	// own at its LSN, so that it is acknowledged like any other.
	tx := TxInfo{CommitLSN: lsn, CommitTime: serverTime}
	if err := h.Begin(ctx, tx); err != nil {
		return false, &handlerError{"Begin", lsn, err}
	}
	if err := h.Message(ctx, tx, m); err != nil {
		return false, &handlerError{"Message", lsn, err}
	}
	tx.EndLSN = lsn
	ack := d.acks.open(lsn)
	if err := h.Commit(ctx, tx, ack); err != nil {
		d.acks.abandon(ack.rec)
		return false, &handlerError{"Commit", lsn, err}
	}
	d.cnt.messages.Add(1)
	if lsn > d.lastDispatched {
		d.lastDispatched = lsn
	}
	return false, nil
}

// isFatalDecode reports a decode error that must stop the stream.
func isFatalDecode(err error) bool {
	return errors.Is(err, ErrDecode) && !errors.Is(err, errUnknownType)
}
