package wal

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/pgcache/pgcache/row"
	"go.uber.org/zap/zaptest"
)

// Encoders for pgoutput protocol version 1 messages, written from the
// protocol description, so the decoder can be tested without a server.

type col struct {
	name string
	key  bool
}

// val is one tuple value: kind 'n', 'u', 't' (or anything, to test errors).
type val struct {
	kind byte
	text string
}

func tv(s string) val { return val{'t', s} }

var (
	null      = val{kind: 'n'}
	unchanged = val{kind: 'u'}
)

func be16(b []byte, v uint16) []byte { return binary.BigEndian.AppendUint16(b, v) }
func be32(b []byte, v uint32) []byte { return binary.BigEndian.AppendUint32(b, v) }
func be64(b []byte, v uint64) []byte { return binary.BigEndian.AppendUint64(b, v) }
func cstr(b []byte, s string) []byte { return append(append(b, s...), 0) }

func pgTS(tm time.Time) uint64 { return uint64(tm.Sub(pgEpoch).Microseconds()) }

func encBegin(final pglogrepl.LSN, tm time.Time, xid uint32) []byte {
	return be32(be64(be64([]byte{'B'}, uint64(final)), pgTS(tm)), xid)
}

func encCommit(commit, end pglogrepl.LSN, tm time.Time) []byte {
	return be64(be64(be64([]byte{'C', 0}, uint64(commit)), uint64(end)), pgTS(tm))
}

func encRelation(id uint32, ns, name string, ident byte, cols ...col) []byte {
	b := cstr(cstr(be32([]byte{'R'}, id), ns), name)
	b = be16(append(b, ident), uint16(len(cols)))
	for _, c := range cols {
		var f byte
		if c.key {
			f = 1
		}
		b = be32(be32(cstr(append(b, f), c.name), 25), 0xffffffff)
	}
	return b
}

func encTuple(b []byte, vals ...val) []byte {
	b = be16(b, uint16(len(vals)))
	for _, v := range vals {
		b = append(b, v.kind)
		if v.kind == 't' || v.kind == 'b' {
			b = append(be32(b, uint32(len(v.text))), v.text...)
		}
	}
	return b
}

func encInsert(id uint32, vals ...val) []byte {
	return encTuple(append(be32([]byte{'I'}, id), 'N'), vals...)
}

// encUpdate encodes an update; oldKind 0 means no old tuple.
func encUpdate(id uint32, oldKind byte, old, new []val) []byte {
	b := be32([]byte{'U'}, id)
	if oldKind != 0 {
		b = encTuple(append(b, oldKind), old...)
	}
	return encTuple(append(b, 'N'), new...)
}

func encDelete(id uint32, kind byte, old ...val) []byte {
	return encTuple(append(be32([]byte{'D'}, id), kind), old...)
}

func encTruncate(ids ...uint32) []byte {
	b := append(be32([]byte{'T'}, uint32(len(ids))), 0)
	for _, id := range ids {
		b = be32(b, id)
	}
	return b
}

func encMessage(transactional bool, lsn pglogrepl.LSN, prefix, content string) []byte {
	var f byte
	if transactional {
		f = 1
	}
	b := cstr(be64([]byte{'M', f}, uint64(lsn)), prefix)
	return append(be32(b, uint32(len(content))), content...)
}

// event is one recorded Handler call, with everything copied.
type event struct {
	Op     string
	Tx     TxInfo
	Change row.Change
	Msg    Message
}

// recorder is a Handler that records calls.
type recorder struct {
	acks   []*Ack // one per Commit, not done
	events []event
	fail   string // method that returns an error
}

var errFail = errors.New("handler failed")

func (r *recorder) add(e event) error {
	r.events = append(r.events, e)
	if e.Op == r.fail {
		return errFail
	}
	return nil
}

func copyCols(cs []row.Column) []row.Column {
	if cs == nil {
		return nil
	}
	return append([]row.Column{}, cs...)
}

func (r *recorder) Begin(_ context.Context, tx TxInfo) error {
	return r.add(event{Op: "Begin", Tx: tx})
}

func (r *recorder) Change(_ context.Context, tx TxInfo, c row.Change) error {
	c.Old, c.New = copyCols(c.Old), copyCols(c.New)
	return r.add(event{Op: "Change", Tx: tx, Change: c})
}

func (r *recorder) Message(_ context.Context, tx TxInfo, m Message) error {
	m.Content = append([]byte{}, m.Content...)
	return r.add(event{Op: "Message", Tx: tx, Msg: m})
}

func (r *recorder) Commit(_ context.Context, tx TxInfo, ack *Ack) error {
	r.acks = append(r.acks, ack)
	return r.add(event{Op: "Commit", Tx: tx})
}

var (
	t0 = time.Date(2025, 5, 1, 12, 0, 0, 0, time.UTC)
	t1 = t0.Add(time.Second)
)

func cols(kv ...string) []row.Column {
	out := make([]row.Column, 0, len(kv)/2)
	for i := 0; i+1 < len(kv); i += 2 {
		out = append(out, row.Column{Name: kv[i], Value: row.Value{Text: kv[i+1]}})
	}
	return out
}

func TestDecode(t *testing.T) {
	posts := encRelation(16400, "public", "posts", 'd', col{"id", true}, col{"author_id", false}, col{"body", false})
	postsFull := encRelation(16400, "public", "posts", 'f', col{"id", true}, col{"author_id", true}, col{"body", true})
	other := encRelation(16500, "public", "audit", 'd', col{"id", true})
	catalog := encRelation(16600, "", "t", 'd', col{"id", true})
	tx := TxInfo{Xid: 7, CommitLSN: 0x100, CommitTime: t0}
	txEnd := TxInfo{Xid: 7, CommitLSN: 0x100, EndLSN: 0x128, CommitTime: t1}
	begin, commit := encBegin(0x100, t0, 7), encCommit(0x100, 0x128, t1)

	tests := []struct {
		name    string
		tables  []string
		msgs    [][]byte
		want    []event
		skipped []bool // per message; nil means all false
	}{{
		name: "insert",
		msgs: [][]byte{begin, posts, encInsert(16400, tv("1"), tv("7"), tv("hello")), commit},
		want: []event{
			{Op: "Begin", Tx: tx},
			{Op: "Change", Tx: tx, Change: row.Change{Table: "public.posts", Op: row.Insert, New: cols("id", "1", "author_id", "7", "body", "hello")}},
			{Op: "Commit", Tx: txEnd},
		},
	}, {
		name: "update with key tuple keeps only identity columns, unchanged TOAST marked",
		msgs: [][]byte{begin, posts,
			encUpdate(16400, 'K', []val{tv("1"), null, null}, []val{tv("2"), tv("7"), unchanged}), commit},
		want: []event{
			{Op: "Begin", Tx: tx},
			{Op: "Change", Tx: tx, Change: row.Change{Table: "public.posts", Op: row.Update,
				Old: cols("id", "1"),
				New: []row.Column{{Name: "id", Value: row.Value{Text: "2"}}, {Name: "author_id", Value: row.Value{Text: "7"}}, {Name: "body", Value: row.Value{Unchanged: true}}}}},
			{Op: "Commit", Tx: txEnd},
		},
	}, {
		name: "update with full old tuple keeps every column, NULL included",
		msgs: [][]byte{begin, postsFull,
			encUpdate(16400, 'O', []val{tv("1"), tv("7"), null}, []val{tv("1"), tv("8"), tv("x")}), commit},
		want: []event{
			{Op: "Begin", Tx: tx},
			{Op: "Change", Tx: tx, Change: row.Change{Table: "public.posts", Op: row.Update,
				Old: []row.Column{{Name: "id", Value: row.Value{Text: "1"}}, {Name: "author_id", Value: row.Value{Text: "7"}}, {Name: "body", Value: row.Value{Null: true}}},
				New: cols("id", "1", "author_id", "8", "body", "x")}},
			{Op: "Commit", Tx: txEnd},
		},
	}, {
		name: "update without old tuple",
		msgs: [][]byte{begin, posts, encUpdate(16400, 0, nil, []val{tv("1"), tv("8"), tv("x")}), commit},
		want: []event{
			{Op: "Begin", Tx: tx},
			{Op: "Change", Tx: tx, Change: row.Change{Table: "public.posts", Op: row.Update, New: cols("id", "1", "author_id", "8", "body", "x")}},
			{Op: "Commit", Tx: txEnd},
		},
	}, {
		name: "delete with key tuple",
		msgs: [][]byte{begin, posts, encDelete(16400, 'K', tv("3"), null, null), commit},
		want: []event{
			{Op: "Begin", Tx: tx},
			{Op: "Change", Tx: tx, Change: row.Change{Table: "public.posts", Op: row.Delete, Old: cols("id", "3")}},
			{Op: "Commit", Tx: txEnd},
		},
	}, {
		name: "delete with full old tuple",
		msgs: [][]byte{begin, postsFull, encDelete(16400, 'O', tv("3"), tv("9"), tv("b")), commit},
		want: []event{
			{Op: "Begin", Tx: tx},
			{Op: "Change", Tx: tx, Change: row.Change{Table: "public.posts", Op: row.Delete, Old: cols("id", "3", "author_id", "9", "body", "b")}},
			{Op: "Commit", Tx: txEnd},
		},
	}, {
		name:   "truncate of two tables, one filtered out",
		tables: []string{"public.posts"},
		msgs:   [][]byte{begin, posts, other, encTruncate(16500, 16400), commit},
		want: []event{
			{Op: "Begin", Tx: tx},
			{Op: "Change", Tx: tx, Change: row.Change{Table: "public.posts", Op: row.Truncate}},
			{Op: "Commit", Tx: txEnd},
		},
	}, {
		name:   "changes of tables not configured are dropped",
		tables: []string{"public.posts"},
		msgs:   [][]byte{begin, other, encInsert(16500, tv("1")), encDelete(16500, 'K', tv("1")), commit},
		want:   []event{{Op: "Begin", Tx: tx}, {Op: "Commit", Tx: txEnd}},
	}, {
		name: "empty namespace is pg_catalog",
		msgs: [][]byte{begin, catalog, encInsert(16600, tv("1")), commit},
		want: []event{
			{Op: "Begin", Tx: tx},
			{Op: "Change", Tx: tx, Change: row.Change{Table: "pg_catalog.t", Op: row.Insert, New: cols("id", "1")}},
			{Op: "Commit", Tx: txEnd},
		},
	}, {
		name: "messages filtered by prefix",
		msgs: [][]byte{
			encMessage(false, 0x50, "invalidate", "k1 k2"),
			encMessage(false, 0x60, "other", "x"),
			begin,
			encMessage(true, 0x110, "invalidate", "k3"),
			encMessage(true, 0x118, "invalidatex", "k4"),
			commit,
		},
		skipped: []bool{false, true, false, false, false, false},
		want: []event{
			{Op: "Begin", Tx: TxInfo{CommitLSN: 0x50, CommitTime: t0}},
			{Op: "Message", Tx: TxInfo{CommitLSN: 0x50, CommitTime: t0}, Msg: Message{LSN: 0x50, Prefix: "invalidate", Content: []byte("k1 k2")}},
			{Op: "Commit", Tx: TxInfo{CommitLSN: 0x50, EndLSN: 0x50, CommitTime: t0}},
			{Op: "Begin", Tx: tx},
			{Op: "Message", Tx: tx, Msg: Message{LSN: 0x110, Transactional: true, Prefix: "invalidate", Content: []byte("k3")}},
			{Op: "Commit", Tx: txEnd},
		},
	}, {
		name: "type and origin messages are ignored",
		msgs: [][]byte{begin,
			cstr(cstr(be32([]byte{'Y'}, 600), "public"), "mytype"),
			cstr(be64([]byte{'O'}, 0x90), "node1"),
			commit},
		want: []event{{Op: "Begin", Tx: tx}, {Op: "Commit", Tx: txEnd}},
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var cnt counters
			d := newDecoder(tc.tables, []string{"invalidate"}, &cnt, newAckTracker(func(pglogrepl.LSN) {}))
			var r recorder
			for i, m := range tc.msgs {
				skipped, err := d.decode(context.Background(), &r, pglogrepl.LSN(0x100+i), t0, m)
				if err != nil {
					t.Fatalf("message %d (%q): got error %v; want none", i, m[0], err)
				}
				want := tc.skipped != nil && tc.skipped[i]
				if skipped != want {
					t.Errorf("message %d: got skipped %v; want %v", i, skipped, want)
				}
			}
			if !reflect.DeepEqual(r.events, tc.want) {
				t.Errorf("got events\n%+v\nwant\n%+v", r.events, tc.want)
			}
			if d.inTx {
				t.Errorf("got a transaction still open; want none")
			}
		})
	}
}

func TestDecodeErrors(t *testing.T) {
	posts := encRelation(1, "public", "posts", 'd', col{"id", true}, col{"body", false})
	begin, commit := encBegin(0x100, t0, 7), encCommit(0x100, 0x128, t1)
	tests := []struct {
		name string
		msgs [][]byte // the last one fails
		want error
	}{
		{"empty message", [][]byte{{}}, ErrDecode},
		{"unknown type", [][]byte{{'Z', 1, 2}}, errUnknownType},
		{"short begin", [][]byte{encBegin(0x100, t0, 7)[:12]}, ErrDecode},
		{"long begin", [][]byte{append(encBegin(0x100, t0, 7), 0)}, ErrDecode},
		{"begin inside a transaction", [][]byte{begin, begin}, ErrDecode},
		{"commit outside a transaction", [][]byte{commit}, ErrDecode},
		{"commit LSN differs from begin", [][]byte{begin, encCommit(0x101, 0x128, t1)}, ErrDecode},
		{"change outside a transaction", [][]byte{posts, encInsert(1, tv("1"), tv("x"))}, ErrDecode},
		{"change of an undescribed relation", [][]byte{begin, encInsert(2, tv("1"))}, ErrUnknownRelation},
		{"truncate of an undescribed relation", [][]byte{begin, posts, encTruncate(1, 2)}, ErrUnknownRelation},
		{"truncate count and length disagree", [][]byte{begin, posts, encTruncate(1)[:7]}, ErrDecode},
		{"tuple column count differs", [][]byte{begin, posts, encInsert(1, tv("1"))}, ErrDecode},
		{"binary value", [][]byte{begin, posts, encInsert(1, tv("1"), val{'b', "x"})}, ErrDecode},
		{"bad value kind", [][]byte{begin, posts, encInsert(1, tv("1"), val{'?', ""})}, ErrDecode},
		{"value longer than the message", [][]byte{begin, posts, encInsert(1, tv("1"), tv("xyz"))[:20]}, ErrDecode},
		{"insert with old tuple tag", [][]byte{begin, posts, append(be32([]byte{'I'}, 1), 'K', 0, 0)}, ErrDecode},
		{"delete with new tuple tag", [][]byte{begin, posts, encDelete(1, 'N', tv("1"), null)}, ErrDecode},
		{"update with bad tag", [][]byte{begin, posts, encUpdate(1, 'X', []val{tv("1"), null}, []val{tv("1"), null})}, ErrDecode},
		{"trailing bytes after a tuple", [][]byte{begin, posts, append(encInsert(1, tv("1"), null), 0)}, ErrDecode},
		{"relation without terminator", [][]byte{[]byte("R\x00\x00\x00\x01public")}, ErrDecode},
		{"relation with more columns than bytes", [][]byte{be16(append(cstr(cstr(be32([]byte{'R'}, 1), "s"), "t"), 'd'), 0xffff)}, ErrDecode},
		{"transactional message outside a transaction", [][]byte{encMessage(true, 0x10, "invalidate", "k")}, ErrDecode},
		{"message content longer than the message", [][]byte{encMessage(false, 0x10, "invalidate", "key")[:20]}, ErrDecode},
		{"handler error", [][]byte{begin, posts, encInsert(1, tv("1"), tv("x"))}, errFail},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var cnt counters
			d := newDecoder(nil, []string{"invalidate"}, &cnt, newAckTracker(func(pglogrepl.LSN) {}))
			r := recorder{fail: "Change"}
			for i, m := range tc.msgs {
				_, err := d.decode(context.Background(), &r, pglogrepl.LSN(0x100+i), t0, m)
				if i < len(tc.msgs)-1 {
					if err != nil {
						t.Fatalf("message %d: got error %v; want none", i, err)
					}
					continue
				}
				if !errors.Is(err, tc.want) {
					t.Fatalf("got error %v; want %v", err, tc.want)
				}
			}
		})
	}
}

// TestHandleCopyDataIdleAdvance checks invariant I5 on the stream's message
// handling: keepalives and filtered messages move the confirmed position
// only when nothing is in flight.
func TestHandleCopyDataIdleAdvance(t *testing.T) {
	s, err := New(Config{DSN: "postgres://x@127.0.0.1/db", Tables: []string{"public.posts"}}, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var r recorder
	reply := make(chan struct{}, 1)
	xlog := func(start pglogrepl.LSN, payload []byte) []byte {
		return append(be64(be64(be64([]byte{'w'}, uint64(start)), uint64(start)), pgTS(t0)), payload...)
	}
	keepalive := func(end pglogrepl.LSN, reply bool) []byte {
		b := be64(be64([]byte{'k'}, uint64(end)), pgTS(t0))
		if reply {
			return append(b, 1)
		}
		return append(b, 0)
	}
	step := func(data []byte) {
		t.Helper()
		if _, err := s.handleCopyData(ctx, &r, data, reply); err != nil {
			t.Fatalf("got error %v; want none", err)
		}
	}
	confirmed := func(want pglogrepl.LSN) {
		t.Helper()
		if got := s.Stats().ConfirmedLSN; got != want {
			t.Fatalf("got confirmed %s; want %s", got, want)
		}
	}

	step(keepalive(0x1000, true))
	confirmed(0x1000)
	select {
	case <-reply:
	default:
		t.Fatal("got no reply signal for a keepalive that asked for one; want one")
	}
	step(xlog(0x1100, encMessage(false, 0x1100, "other", "x")))
	confirmed(0x1100)

	posts := encRelation(1, "public", "posts", 'd', col{"id", true})
	step(xlog(0x2000, encBegin(0x2100, t0, 9)))
	step(xlog(0x2000, posts))
	step(xlog(0x2050, encInsert(1, tv("1"))))
	step(keepalive(0x3000, false)) // transaction open: no advance
	confirmed(0x1100)
	step(xlog(0x2100, encCommit(0x2100, 0x2128, t1)))
	step(keepalive(0x3000, false)) // delivered, not confirmed: no advance
	step(xlog(0x3100, encMessage(false, 0x3100, "other", "x")))
	confirmed(0x1100)
	if len(r.acks) != 1 {
		t.Fatalf("got %d acks; want 1, the transaction's", len(r.acks))
	}
	r.acks[0].Done()  // the transaction is handed off
	r.acks[0].Done()  // twice: ignored
	s.confirm(0x2000) // backwards: ignored
	confirmed(0x2128)
	step(keepalive(0x3000, false))
	confirmed(0x3000)

	st := s.Stats()
	if st.Txs != 1 || st.Changes != 1 || st.IgnoredMessages != 2 || st.ServerWALEnd != 0x3100 || st.ReceivedLSN != 0x3100 {
		t.Errorf("got stats %+v; want 1 tx, 1 change, 2 ignored messages, WAL end and received 0/3100", st)
	}
	if !st.LastCommitTime.Equal(t1) {
		t.Errorf("got last commit time %s; want %s", st.LastCommitTime, t1)
	}
}

// FuzzDecode feeds random bytes through the stream's message handling: the
// input is split into chunks (a 2-byte length, then the chunk), and each
// chunk is handled as an XLogData payload, or as a raw replication message
// if it starts with 'k' or 'w'. It must never panic, every error must be a
// named one, and the handler must see a well-formed call sequence.
func FuzzDecode(f *testing.F) {
	posts := encRelation(16400, "public", "posts", 'd', col{"id", true}, col{"author_id", false}, col{"body", false})
	full := encRelation(16401, "public", "full", 'f', col{"id", true}, col{"v", true})
	seeds := [][][]byte{
		{encBegin(0x100, t0, 7), posts, encInsert(16400, tv("1"), tv("7"), tv("hello")), encCommit(0x100, 0x128, t1)},
		{encBegin(0x100, t0, 7), posts, encUpdate(16400, 'K', []val{tv("1"), null, null}, []val{tv("2"), tv("7"), unchanged}), encCommit(0x100, 0x128, t1)},
		{encBegin(0x100, t0, 7), full, encUpdate(16401, 'O', []val{tv("1"), null}, []val{tv("1"), tv("x")}), encDelete(16401, 'O', tv("1"), tv("x")), encCommit(0x100, 0x128, t1)},
		{encBegin(0x100, t0, 7), posts, full, encTruncate(16400, 16401), encDelete(16400, 'K', tv("5"), null, null), encCommit(0x100, 0x128, t1)},
		{encMessage(false, 0x50, "invalidate", "k1 k2"), encBegin(0x100, t0, 7), encMessage(true, 0x60, "invalidate", "k3"), encCommit(0x100, 0x128, t1)},
		{[]byte("k\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01"), encMessage(false, 0x50, "other", "x")},
		{cstr(cstr(be32([]byte{'Y'}, 600), "public"), "mytype"), cstr(be64([]byte{'O'}, 0x90), "node1")},
	}
	for _, s := range seeds {
		var in []byte
		for _, m := range s {
			in = append(be16(in, uint16(len(m))), m...)
		}
		f.Add(in)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		s, err := New(Config{DSN: "postgres://x@127.0.0.1/db", Tables: []string{"public.posts", "public.full"}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		var h seqChecker
		reply := make(chan struct{}, 1)
		lsn := uint64(0x1000)
		for len(in) > 0 {
			var chunk []byte
			if len(in) < 2 {
				chunk, in = in, nil
			} else {
				n := int(binary.BigEndian.Uint16(in))
				in = in[2:]
				n = min(n, len(in))
				chunk, in = in[:n], in[n:]
			}
			data := chunk
			if len(chunk) == 0 || (chunk[0] != 'k' && chunk[0] != 'w') {
				lsn += 0x10
				data = append(be64(be64(be64([]byte{'w'}, lsn), lsn), pgTS(t0)), chunk...)
			}
			_, err := s.handleCopyData(context.Background(), &h, data, reply)
			select {
			case <-reply:
			default:
			}
			if err != nil {
				if !errors.Is(err, ErrDecode) && !errors.Is(err, ErrUnknownRelation) {
					t.Fatalf("got error %v; want ErrDecode or ErrUnknownRelation", err)
				}
				if h.err != nil {
					t.Fatal(h.err)
				}
				return
			}
			if h.err != nil {
				t.Fatal(h.err)
			}
		}
	})
}

// seqChecker is a Handler that checks the order of calls.
type seqChecker struct {
	open bool
	tx   TxInfo
	err  error
}

func (c *seqChecker) fail(format string, args ...any) error {
	if c.err == nil {
		c.err = fmt.Errorf(format, args...)
	}
	return nil
}

func (c *seqChecker) Begin(_ context.Context, tx TxInfo) error {
	if c.open {
		return c.fail("got Begin inside a transaction; want Commit first")
	}
	c.open, c.tx = true, tx
	return nil
}

func (c *seqChecker) Change(_ context.Context, tx TxInfo, ch row.Change) error {
	if !c.open || tx != c.tx {
		return c.fail("got Change outside its transaction (open %v, tx %+v, current %+v)", c.open, tx, c.tx)
	}
	if ch.Op < row.Insert || ch.Op > row.Truncate || ch.Table == "" {
		return c.fail("got change %+v; want a valid op and table", ch)
	}
	return nil
}

func (c *seqChecker) Message(_ context.Context, tx TxInfo, m Message) error {
	if !c.open || tx != c.tx {
		return c.fail("got message outside its transaction")
	}
	if !m.Transactional && (tx.Xid != 0 || tx.CommitLSN != m.LSN) {
		return c.fail("got non-transactional message with tx %+v; want Xid 0 and commit LSN %s", tx, m.LSN)
	}
	return nil
}

func (c *seqChecker) Commit(_ context.Context, tx TxInfo, ack *Ack) error {
	defer ack.Done()
	if !c.open || tx.CommitLSN != c.tx.CommitLSN || tx.Xid != c.tx.Xid {
		return c.fail("got Commit %+v outside its transaction %+v", tx, c.tx)
	}
	c.open = false
	return nil
}

// nopHandler discards everything.
type nopHandler struct{}

func (nopHandler) Begin(context.Context, TxInfo) error                { return nil }
func (nopHandler) Change(context.Context, TxInfo, row.Change) error   { return nil }
func (nopHandler) Message(context.Context, TxInfo, Message) error     { return nil }
func (nopHandler) Commit(_ context.Context, _ TxInfo, ack *Ack) error { ack.Done(); return nil }

// BenchmarkDecode measures decoding one row change of a 6-column row, the
// per-change cost on the tail's hot path.
func BenchmarkDecode(b *testing.B) {
	var cnt counters
	d := newDecoder([]string{"public.posts"}, nil, &cnt, newAckTracker(func(pglogrepl.LSN) {}))
	rel := encRelation(1, "public", "posts", 'd', col{"id", true}, col{"author_id", false}, col{"title", false},
		col{"body", false}, col{"created_at", false}, col{"likes", false})
	ctx := context.Background()
	var h nopHandler
	for _, m := range [][]byte{encBegin(0x100, t0, 1), rel} {
		if _, err := d.decode(ctx, h, 0x100, t0, m); err != nil {
			b.Fatal(err)
		}
	}
	for _, bc := range []struct {
		name string
		msg  []byte
	}{
		{"insert", encInsert(1, tv("123456"), tv("42"), tv("a title of some length"), tv("a body that is a little longer than the title, as bodies are"), tv("2025-05-01 12:00:00+00"), tv("17"))},
		{"update-key", encUpdate(1, 'K', []val{tv("123456"), null, null, null, null, null}, []val{tv("123457"), tv("42"), tv("a title"), unchanged, tv("2025-05-01 12:00:00+00"), tv("18")})},
		{"delete-key", encDelete(1, 'K', tv("123456"), null, null, null, null, null)},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(int64(len(bc.msg)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := d.decode(ctx, h, 0x100, t0, bc.msg); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
