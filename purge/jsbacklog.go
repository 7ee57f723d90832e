package purge

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Header names of a backlog record.
const (
	hdrTotalKeys  = "Pgcache-Backlog-Keys"  // keys recorded up to and with this record
	hdrTotalBytes = "Pgcache-Backlog-Bytes" // their bytes
	hdrFlush      = "Pgcache-Backlog-Flush" // "1": the server is to be flushed
	hdrCommitLSN  = "Pgcache-Commit-Lsn"    // second-purge record: the batch's commit LSN
	hdrEndLSN     = "Pgcache-End-Lsn"       // and its end LSN
)

// rePurgeToken is the subject token of the second-purge records (no
// server address maps to it: token keeps no leading '.').
const rePurgeToken = "_repurge"

// maxRecord bounds the bytes of keys in one backlog record, well under
// NATS's default 1 MB max payload.
const maxRecord = 256 << 10

// BacklogConfig names a datacenter's backlog stream.
type BacklogConfig struct {
	DC string
	// Stream is the stream name; default PURGE_BACKLOG_<DC> (upper case,
	// non-alphanumerics as '_'). Its subjects are
	// pgcache.backlog.<dc>.<server>.
	Stream string
	// Placement is the NATS cluster the stream is created in; empty: the
	// server's choice (the one the purger is connected to).
	Placement string
	Replicas  int // default 1
}

// JetStreamBacklog is a Backlog in a JetStream stream of the purger's
// datacenter, one subject per server, file storage. Each record holds
// keys separated by newlines (keys never hold one), with the running
// totals in its headers, so the state of a server's backlog is read from
// its first and last records alone.
type JetStreamBacklog struct {
	js  jetstream.JetStream
	cfg BacklogConfig

	mu     sync.Mutex // guards stream, totals
	stream jetstream.Stream
	totals map[string]BacklogState
}

// NewJetStreamBacklog returns a backlog in js. The stream is created
// (if missing) on first use, so NATS need not be up yet.
func NewJetStreamBacklog(js jetstream.JetStream, cfg BacklogConfig) (*JetStreamBacklog, error) {
	if cfg.DC == "" {
		return nil, fmt.Errorf("%w: backlog dc is empty", ErrConfig)
	}
	if cfg.Stream == "" {
		cfg.Stream = "PURGE_BACKLOG_" + strings.ToUpper(token(cfg.DC))
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	return &JetStreamBacklog{js: js, cfg: cfg, totals: map[string]BacklogState{}}, nil
}

// ensure returns the stream, creating it if missing.
func (b *JetStreamBacklog) ensure(ctx context.Context) (jetstream.Stream, error) {
	b.mu.Lock()
	s := b.stream
	b.mu.Unlock()
	if s != nil {
		return s, nil
	}
	sc := jetstream.StreamConfig{
		Name:        b.cfg.Stream,
		Description: "pgcache: keys recorded for memcached servers that were down (purge.JetStreamBacklog)",
		Subjects:    []string{"pgcache.backlog." + token(b.cfg.DC) + ".>"},
		Retention:   jetstream.LimitsPolicy,
		Storage:     jetstream.FileStorage,
		Replicas:    b.cfg.Replicas,
		Discard:     jetstream.DiscardNew, // never lose a record silently
	}
	if b.cfg.Placement != "" {
		sc.Placement = &jetstream.Placement{Cluster: b.cfg.Placement}
	}
	s, err := b.js.Stream(ctx, b.cfg.Stream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		s, err = b.js.CreateStream(ctx, sc)
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			s, err = b.js.Stream(ctx, b.cfg.Stream)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("backlog stream %s: %w", b.cfg.Stream, err)
	}
	b.mu.Lock()
	b.stream = s
	b.mu.Unlock()
	return s, nil
}

// token makes s a single NATS subject token.
func token(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' {
			return r
		}
		return '_'
	}, s)
}

func (b *JetStreamBacklog) subject(server string) string {
	return "pgcache.backlog." + token(b.cfg.DC) + "." + token(server)
}

// Load implements Backlog.
func (b *JetStreamBacklog) Load(ctx context.Context, server string) (BacklogState, error) {
	stream, err := b.ensure(ctx)
	if err != nil {
		return BacklogState{}, err
	}
	subj := b.subject(server)
	last, err := stream.GetLastMsgForSubject(ctx, subj)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		b.setTotals(server, BacklogState{})
		return BacklogState{}, nil
	}
	if err != nil {
		return BacklogState{}, fmt.Errorf("last backlog record of %s: %w", server, err)
	}
	st := BacklogState{Last: last.Sequence, Flush: last.Header.Get(hdrFlush) == "1"}
	st.Keys, _ = strconv.ParseInt(last.Header.Get(hdrTotalKeys), 10, 64)
	st.Bytes, _ = strconv.ParseInt(last.Header.Get(hdrTotalBytes), 10, 64)
	first, err := stream.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(subj))
	if err != nil {
		return BacklogState{}, fmt.Errorf("first backlog record of %s: %w", server, err)
	}
	st.Oldest = first.Time
	b.setTotals(server, st)
	return st, nil
}

func (b *JetStreamBacklog) setTotals(server string, st BacklogState) {
	b.mu.Lock()
	b.totals[server] = st
	b.mu.Unlock()
}

func (b *JetStreamBacklog) getTotals(server string) BacklogState {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.totals[server]
}

// Append implements Backlog: records of at most maxRecord bytes, each
// published and acked by JetStream in turn.
func (b *JetStreamBacklog) Append(ctx context.Context, server string, keys []string) error {
	st := b.getTotals(server)
	var buf bytes.Buffer
	n := 0
	flush := func() error {
		if n == 0 {
			return nil
		}
		m := nats.NewMsg(b.subject(server))
		m.Data = bytes.Clone(buf.Bytes())
		next := st
		next.Keys += int64(n)
		next.Bytes += int64(buf.Len() - (n - 1)) // without the separators
		m.Header.Set(hdrTotalKeys, strconv.FormatInt(next.Keys, 10))
		m.Header.Set(hdrTotalBytes, strconv.FormatInt(next.Bytes, 10))
		ack, err := b.js.PublishMsg(ctx, m)
		if err != nil {
			return fmt.Errorf("record keys of %s: %w", server, err)
		}
		next.Last = ack.Sequence
		st = next
		b.setTotals(server, st)
		buf.Reset()
		n = 0
		return nil
	}
	for _, k := range keys {
		if n > 0 && buf.Len()+1+len(k) > maxRecord {
			if err := flush(); err != nil {
				return err
			}
		}
		if n > 0 {
			buf.WriteByte('\n')
		}
		buf.WriteString(k)
		n++
	}
	return flush()
}

// MarkFlush implements Backlog.
func (b *JetStreamBacklog) MarkFlush(ctx context.Context, server string) error {
	st := b.getTotals(server)
	m := nats.NewMsg(b.subject(server))
	m.Header.Set(hdrFlush, "1")
	m.Header.Set(hdrTotalKeys, strconv.FormatInt(st.Keys, 10))
	m.Header.Set(hdrTotalBytes, strconv.FormatInt(st.Bytes, 10))
	ack, err := b.js.PublishMsg(ctx, m)
	if err != nil {
		return fmt.Errorf("record flush of %s: %w", server, err)
	}
	st.Flush, st.Last = true, ack.Sequence
	b.setTotals(server, st)
	return nil
}

// Replay implements Backlog.
func (b *JetStreamBacklog) Replay(ctx context.Context, server string, fn func(keys []string) error) (uint64, error) {
	stream, err := b.ensure(ctx)
	if err != nil {
		return 0, err
	}
	subj := b.subject(server)
	var upTo uint64
	seq := uint64(1)
	var keys []string
	for {
		m, err := stream.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(subj))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return upTo, nil
		}
		if err != nil {
			return upTo, fmt.Errorf("read backlog of %s at %d: %w", server, seq, err)
		}
		if m.Header.Get(hdrFlush) == "1" {
			return upTo, nil // the flush mark and what follows stay
		}
		keys = keys[:0]
		if len(m.Data) > 0 {
			for _, k := range bytes.Split(m.Data, []byte{'\n'}) {
				keys = append(keys, string(k))
			}
		}
		if len(keys) > 0 {
			if err := fn(keys); err != nil {
				return upTo, err
			}
		}
		upTo = m.Sequence
		seq = m.Sequence + 1
	}
}

// Trim implements Backlog.
func (b *JetStreamBacklog) Trim(ctx context.Context, server string, upTo uint64) error {
	if upTo == 0 {
		return nil
	}
	stream, err := b.ensure(ctx)
	if err != nil {
		return err
	}
	if err := stream.Purge(ctx, jetstream.WithPurgeSubject(b.subject(server)), jetstream.WithPurgeSequence(upTo+1)); err != nil {
		return fmt.Errorf("trim backlog of %s: %w", server, err)
	}
	b.setTotals(server, BacklogState{})
	return nil
}

func (b *JetStreamBacklog) rePurgeSubject() string {
	return "pgcache.backlog." + token(b.cfg.DC) + "." + rePurgeToken
}

// AppendRePurge implements RePurgeLog: one record per batch. Its keys
// came in one stream message, so they fit in one record.
func (b *JetStreamBacklog) AppendRePurge(ctx context.Context, commitLSN, endLSN uint64, keys []string) (uint64, error) {
	if _, err := b.ensure(ctx); err != nil {
		return 0, err
	}
	m := nats.NewMsg(b.rePurgeSubject())
	m.Data = []byte(strings.Join(keys, "\n"))
	m.Header.Set(hdrCommitLSN, strconv.FormatUint(commitLSN, 10))
	m.Header.Set(hdrEndLSN, strconv.FormatUint(endLSN, 10))
	ack, err := b.js.PublishMsg(ctx, m)
	if err != nil {
		return 0, fmt.Errorf("record keys for a second purge: %w", err)
	}
	return ack.Sequence, nil
}

// LoadRePurge implements RePurgeLog.
func (b *JetStreamBacklog) LoadRePurge(ctx context.Context, fn func(pos, commitLSN, endLSN uint64, keys []string)) error {
	stream, err := b.ensure(ctx)
	if err != nil {
		return err
	}
	subj := b.rePurgeSubject()
	for seq := uint64(1); ; {
		m, err := stream.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(subj))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read second-purge records at %d: %w", seq, err)
		}
		commit, _ := strconv.ParseUint(m.Header.Get(hdrCommitLSN), 10, 64)
		end, _ := strconv.ParseUint(m.Header.Get(hdrEndLSN), 10, 64)
		var keys []string
		if len(m.Data) > 0 {
			for _, k := range bytes.Split(m.Data, []byte{'\n'}) {
				keys = append(keys, string(k))
			}
		}
		if commit != 0 && len(keys) > 0 {
			fn(m.Sequence, commit, end, keys)
		}
		seq = m.Sequence + 1
	}
}

// TrimRePurge implements RePurgeLog.
func (b *JetStreamBacklog) TrimRePurge(ctx context.Context, pos uint64) error {
	stream, err := b.ensure(ctx)
	if err != nil {
		return err
	}
	if err := stream.Purge(ctx, jetstream.WithPurgeSubject(b.rePurgeSubject()), jetstream.WithPurgeSequence(pos+1)); err != nil {
		return fmt.Errorf("trim second-purge records: %w", err)
	}
	return nil
}
