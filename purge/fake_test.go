package purge_test

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pgcache/pgcache/purge"
)

// fakeDeleter is a pool of n servers. A key "s<i>:..." lives on server
// i, any other on server 0. A server listed in down fails every request.
type fakeDeleter struct {
	n int

	mu      sync.Mutex
	down    map[int]bool
	applied map[string]int
	stale   map[string]time.Duration
	flushes map[int]int
	calls   int
}

func newFake(n int) *fakeDeleter {
	return &fakeDeleter{n: n, down: map[int]bool{}, applied: map[string]int{}, stale: map[string]time.Duration{}, flushes: map[int]int{}}
}

var errDown = errors.New("server down")

func (f *fakeDeleter) Servers() int        { return f.n }
func (f *fakeDeleter) Addr(i int) string   { return "srv" + strconv.Itoa(i) }
func (f *fakeDeleter) Pick(key string) int { return pick(key, f.n) }
func pick(key string, n int) int {
	if strings.HasPrefix(key, "s") {
		if i := strings.IndexByte(key, ':'); i > 1 {
			if s, err := strconv.Atoi(key[1:i]); err == nil && s < n {
				return s
			}
		}
	}
	return 0
}

func (f *fakeDeleter) DeleteMultiOn(_ context.Context, server int, keys []string) []error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	errs := make([]error, len(keys))
	for i, k := range keys {
		if f.Pick(k) != server {
			panic("key " + k + " sent to the wrong server")
		}
		if f.down[server] {
			errs[i] = errDown
			continue
		}
		f.applied[k]++
	}
	return errs
}

func (f *fakeDeleter) MarkStaleMultiOn(_ context.Context, server int, keys []string, ttl time.Duration) []error {
	f.mu.Lock()
	defer f.mu.Unlock()
	errs := make([]error, len(keys))
	for i, k := range keys {
		if f.down[server] {
			errs[i] = errDown
			continue
		}
		f.stale[k] = ttl
	}
	return errs
}

func (f *fakeDeleter) NoOp(_ context.Context, i int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.down[i] {
		return errDown
	}
	return nil
}

func (f *fakeDeleter) FlushAll(_ context.Context, i int) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.down[i] {
		return errDown
	}
	f.flushes[i]++
	return nil
}

func (f *fakeDeleter) setDown(i int, down bool) {
	f.mu.Lock()
	f.down[i] = down
	f.mu.Unlock()
}

func (f *fakeDeleter) count(key string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.applied[key]
}

func (f *fakeDeleter) flushed(i int) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.flushes[i]
}

type fakeAck struct {
	acked    chan struct{}
	once     sync.Once
	progress atomic.Int32
}

func newAck() *fakeAck { return &fakeAck{acked: make(chan struct{})} }

func (a *fakeAck) Ack(context.Context) error {
	a.once.Do(func() { close(a.acked) })
	return nil
}
func (a *fakeAck) InProgress() error { a.progress.Add(1); return nil }

func (a *fakeAck) isAcked() bool {
	select {
	case <-a.acked:
		return true
	default:
		return false
	}
}

// memBacklog is an in-memory Backlog.
type memBacklog struct {
	mu      sync.Mutex
	records map[string][]memRecord
	seq     uint64
}

type memRecord struct {
	seq   uint64
	keys  []string
	flush bool
	at    time.Time
}

func newMemBacklog() *memBacklog { return &memBacklog{records: map[string][]memRecord{}} }

func (b *memBacklog) Load(_ context.Context, server string) (purge.BacklogState, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var st purge.BacklogState
	for _, r := range b.records[server] {
		if st.Oldest.IsZero() {
			st.Oldest = r.at
		}
		st.Keys += int64(len(r.keys))
		for _, k := range r.keys {
			st.Bytes += int64(len(k))
		}
		st.Flush = st.Flush || r.flush
		st.Last = r.seq
	}
	return st, nil
}

func (b *memBacklog) Append(_ context.Context, server string, keys []string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.seq++
	b.records[server] = append(b.records[server], memRecord{seq: b.seq, keys: append([]string(nil), keys...), at: time.Now()})
	return nil
}

func (b *memBacklog) MarkFlush(_ context.Context, server string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.seq++
	b.records[server] = append(b.records[server], memRecord{seq: b.seq, flush: true, at: time.Now()})
	return nil
}

func (b *memBacklog) Replay(_ context.Context, server string, fn func([]string) error) (uint64, error) {
	b.mu.Lock()
	recs := append([]memRecord(nil), b.records[server]...)
	b.mu.Unlock()
	var upTo uint64
	for _, r := range recs {
		if r.flush {
			break
		}
		if len(r.keys) > 0 {
			if err := fn(r.keys); err != nil {
				return upTo, err
			}
		}
		upTo = r.seq
	}
	return upTo, nil
}

func (b *memBacklog) Trim(_ context.Context, server string, upTo uint64) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	recs := b.records[server]
	i := 0
	for i < len(recs) && recs[i].seq <= upTo {
		i++
	}
	b.records[server] = recs[i:]
	return nil
}

func (b *memBacklog) keys(server string) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for _, r := range b.records[server] {
		out = append(out, r.keys...)
	}
	return out
}
