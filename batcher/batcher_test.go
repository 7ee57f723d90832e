package batcher

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// memFlusher is an in-memory Flusher with the PG flusher's checkpoint
// semantics.
type memFlusher struct {
	mu      sync.Mutex // guards everything below
	counts  map[string]int64
	ckpt    map[string]Pos
	flushes int
	keys    []string
	// failNext fails that many flushes before applying them; lostReply
	// applies that many and then reports an error.
	failNext, lostReply int
	block               chan struct{} // when set, Flush waits on it
	entered             chan struct{} // when set, signalled as Flush starts
}

func newMem() *memFlusher {
	return &memFlusher{counts: map[string]int64{}, ckpt: map[string]Pos{}}
}

func (m *memFlusher) Load(_ context.Context, sources []string) (map[string]Pos, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[string]Pos{}
	for k, v := range m.ckpt {
		out[k] = v
	}
	return out, nil
}

func (m *memFlusher) Flush(ctx context.Context, b *Batch) error {
	if m.entered != nil {
		select {
		case m.entered <- struct{}{}:
		default:
		}
	}
	if m.block != nil {
		select {
		case <-m.block:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.failNext > 0 {
		m.failNext--
		return errors.New("injected failure")
	}
	atPrev, atNew := true, true
	for _, c := range b.Checkpoints {
		atPrev = atPrev && m.ckpt[c.Source] == c.Prev
		atNew = atNew && m.ckpt[c.Source] == c.Pos
	}
	if atNew && !atPrev {
		return nil
	}
	if !atPrev {
		return ErrCheckpointMoved
	}
	for _, c := range b.Resets {
		for k := range m.counts {
			if len(k) > len(c) && k[:len(c)+1] == c+"\x00" {
				delete(m.counts, k)
			}
		}
	}
	for _, g := range b.Groups {
		k := g.Counter + "\x00" + g.Group
		if g.Set {
			m.counts[k] = g.N
		} else {
			m.counts[k] += g.N
		}
		m.keys = append(m.keys, g.Key)
	}
	for _, c := range b.Checkpoints {
		m.ckpt[c.Source] = c.Pos
	}
	m.flushes++
	if m.lostReply > 0 {
		m.lostReply--
		return errors.New("injected lost commit reply")
	}
	return nil
}

func (m *memFlusher) count(counter, group string) int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.counts[counter+"\x00"+group]
}

// ackFunc is an Ack that calls itself.
type ackFunc func()

func (f ackFunc) Done() { f() }

// durablesOf finds the durables a test's batcher reports to (start).
var durablesOf sync.Map // *Batcher -> *durables

// durables records the positions whose Acks are done.
type durables struct {
	mu  sync.Mutex
	got map[string][]Pos
}

func (d *durables) on(src string, p Pos) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.got == nil {
		d.got = map[string][]Pos{}
	}
	d.got[src] = append(d.got[src], p)
}

func (d *durables) last(src string) Pos {
	d.mu.Lock()
	defer d.mu.Unlock()
	l := d.got[src]
	if len(l) == 0 {
		return Pos{}
	}
	return l[len(l)-1]
}

// start runs a batcher; wait returns Run's result.
func start(t *testing.T, cfg Config, fl Flusher, dur *durables) (b *Batcher, cancel context.CancelFunc, wait func() error) {
	t.Helper()
	b, err := New(cfg, fl, nil)
	if err != nil {
		t.Fatal(err)
	}
	if dur != nil {
		durablesOf.Store(b, dur)
		t.Cleanup(func() { durablesOf.Delete(b) })
	}
	if err := b.Load(context.Background(), "wal"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	var runErr error
	go func() { runErr = b.Run(ctx); close(done) }()
	wait = func() error { <-done; return runErr }
	t.Cleanup(func() { cancel(); <-done })
	return b, cancel, wait
}

func add(t *testing.T, b *Batcher, src string, major, minor uint64, ds ...Delta) bool {
	t.Helper()
	in := Input{Source: src, Pos: Pos{major, minor}, Deltas: ds}
	if d, ok := durablesOf.Load(b); ok {
		in.Ack = ackFunc(func() { d.(*durables).on(src, in.Pos) })
	}
	ok, err := b.Add(context.Background(), in)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

func like(post int, n int64) Delta {
	return Delta{Counter: "likes", Group: fmt.Sprintf(`["%d"]`, post), Key: fmt.Sprintf("post:%d:likes", post), N: n}
}

func TestAggregateAndDrain(t *testing.T) {
	fl := newMem()
	var dur durables
	b, _, done := start(t, Config{MaxPending: 1000, Interval: time.Hour}, fl, &dur)
	for i := 1; i <= 1000; i++ {
		add(t, b, "wal", uint64(i), 1, like(i%3, 1))
	}
	add(t, b, "wal", 2000, 0) // a position without data
	if err := b.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := done(); err != nil {
		t.Fatalf("Run after Drain: got %v; want nil", err)
	}
	for g, want := range map[int]int64{0: 333, 1: 334, 2: 333} {
		if got := fl.count("likes", fmt.Sprintf(`["%d"]`, g)); got != want {
			t.Errorf("group %d: got %d; want %d", g, got, want)
		}
	}
	if fl.flushes != 1 {
		t.Errorf("flushes: got %d; want 1 (an hour-long interval, drained once)", fl.flushes)
	}
	if got, want := fl.ckpt["wal"], (Pos{2000, 0}); got != want {
		t.Errorf("checkpoint: got %v; want %v", got, want)
	}
	if got, want := dur.last("wal"), (Pos{2000, 0}); got != want {
		t.Errorf("durable: got %v; want %v", got, want)
	}
	if _, err := b.Add(context.Background(), Input{Source: "wal", Pos: Pos{3000, 0}}); !errors.Is(err, ErrClosed) {
		t.Errorf("Add after Drain: got %v; want %v", err, ErrClosed)
	}
}

func TestFlushBySize(t *testing.T) {
	fl := newMem()
	b, _, _ := start(t, Config{MaxPending: 10, Interval: time.Hour}, fl, nil)
	for i := 1; i <= 10; i++ {
		add(t, b, "wal", uint64(i), 0, like(i, 1))
	}
	// The interval is an hour: only the size can trigger this flush.
	for fl.count("likes", `["10"]`) != 1 {
		time.Sleep(time.Millisecond)
	}
}

func TestFlushByInterval(t *testing.T) {
	fl := newMem()
	var dur durables
	b, _, _ := start(t, Config{MaxPending: 1000, Interval: 20 * time.Millisecond}, fl, &dur)
	add(t, b, "wal", 10, 1, like(1, 5))
	add(t, b, "wal", 11, 0)
	for dur.last("wal") != (Pos{11, 0}) {
		time.Sleep(time.Millisecond)
	}
	if got := fl.count("likes", `["1"]`); got != 5 {
		t.Errorf("got %d; want 5", got)
	}
}

func TestSkipAtOrBelowCheckpoint(t *testing.T) {
	fl := newMem()
	fl.ckpt["wal"] = Pos{100, 2}
	fl.counts["likes\x00[\"1\"]"] = 7
	b, _, _ := start(t, Config{Interval: time.Hour}, fl, nil)
	for _, tc := range []struct {
		pos  Pos
		want bool
	}{
		{Pos{99, 5}, false}, {Pos{100, 1}, false}, {Pos{100, 2}, false}, {Pos{100, 3}, true}, {Pos{100, 3}, false}, {Pos{101, 0}, true},
	} {
		if got := add(t, b, "wal", tc.pos.Major, tc.pos.Minor, like(1, 1)); got != tc.want {
			t.Errorf("Add at %v: got %v; want %v", tc.pos, got, tc.want)
		}
	}
	if err := b.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := fl.count("likes", `["1"]`); got != 9 {
		t.Errorf("got %d; want 9 (7 stored + 2 new)", got)
	}
	if got := b.Stats().Skipped; got != 4 {
		t.Errorf("skipped: got %d; want 4", got)
	}
}

func TestDurableWaitsForFlush(t *testing.T) {
	fl := newMem()
	fl.block = make(chan struct{})
	fl.entered = make(chan struct{}, 1)
	var dur durables
	b, _, _ := start(t, Config{MaxPending: 1, Interval: time.Hour}, fl, &dur)
	// Nothing pending: a position is durable at once.
	add(t, b, "wal", 5, 0)
	if got := dur.last("wal"); got != (Pos{5, 0}) {
		t.Fatalf("durable: got %v; want 5/0", got)
	}
	add(t, b, "wal", 6, 1, like(1, 1)) // fills the batch: a flush starts and blocks
	<-fl.entered
	add(t, b, "wal", 7, 0) // a commit position while its delta is in flight
	add(t, b, "nats:S", 3, 0)
	if got := dur.last("wal"); got != (Pos{5, 0}) {
		t.Errorf("durable while the flush is blocked: got %v; want 5/0", got)
	}
	if got := dur.last("nats:S"); got != (Pos{3, 0}) {
		t.Errorf("other source's durable: got %v; want 3/0", got)
	}
	close(fl.block)
	for dur.last("wal") != (Pos{7, 0}) {
		time.Sleep(time.Millisecond)
	}
}

func TestBackpressure(t *testing.T) {
	fl := newMem()
	fl.block = make(chan struct{})
	fl.entered = make(chan struct{}, 1)
	const max = 10
	b, _, _ := start(t, Config{MaxPending: max, Interval: time.Hour}, fl, nil)
	pos := uint64(0)
	for i := 0; i < max; i++ {
		pos++
		add(t, b, "wal", pos, 0, like(i, 1))
	}
	<-fl.entered // the first batch is in flight and blocked
	for i := 0; i < max; i++ {
		pos++
		add(t, b, "wal", pos, 0, like(100+i, 1))
	}
	var released atomic.Bool
	returned := make(chan bool)
	go func() {
		_, err := b.Add(context.Background(), Input{Source: "wal", Pos: Pos{pos + 1, 0}, Deltas: []Delta{like(1000, 1)}})
		if err != nil {
			t.Error(err)
		}
		returned <- released.Load()
	}()
	if s := b.Stats(); s.PendingGroups > 2*max {
		t.Errorf("pending groups: got %d; want at most %d", s.PendingGroups, 2*max)
	}
	released.Store(true)
	close(fl.block)
	if !<-returned {
		t.Error("Add returned while the flush was blocked and the batch full; want it to block")
	}
	if err := b.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := fl.count("likes", `["1000"]`); got != 1 {
		t.Errorf("got %d; want 1", got)
	}
}

func TestBackpressureHonoursContext(t *testing.T) {
	fl := newMem()
	fl.block = make(chan struct{})
	defer close(fl.block)
	fl.entered = make(chan struct{}, 1)
	b, _, _ := start(t, Config{MaxPending: 1, Interval: time.Hour}, fl, nil)
	add(t, b, "wal", 1, 0, like(1, 1))
	<-fl.entered
	add(t, b, "wal", 2, 0, like(2, 1))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := b.Add(ctx, Input{Source: "wal", Pos: Pos{3, 0}, Deltas: []Delta{like(3, 1)}}); !errors.Is(err, context.Canceled) {
		t.Errorf("got %v; want %v", err, context.Canceled)
	}
}

// TestAddWithin: with the flush stuck, AddWithin gives up after its
// limit with ErrBusy and applies nothing; the same input goes in once the
// flush moves.
func TestAddWithin(t *testing.T) {
	fl := newMem()
	fl.block = make(chan struct{})
	fl.entered = make(chan struct{}, 1)
	b, _, _ := start(t, Config{MaxPending: 1, Interval: time.Hour}, fl, nil)
	add(t, b, "wal", 1, 0, like(1, 1))
	<-fl.entered
	add(t, b, "wal", 2, 0, like(2, 1))
	in := Input{Source: "wal", Pos: Pos{3, 0}, Deltas: []Delta{like(3, 1)}}
	if ok, err := b.AddWithin(context.Background(), in, 20*time.Millisecond); ok || !errors.Is(err, ErrBusy) {
		t.Fatalf("got %v, %v; want false, ErrBusy", ok, err)
	}
	if got := b.Checkpoint("wal"); got != (Pos{2, 0}) {
		t.Fatalf("checkpoint after ErrBusy: got %v; want %v (the input not applied)", got, Pos{2, 0})
	}
	close(fl.block)
	if ok, err := b.AddWithin(context.Background(), in, time.Minute); !ok || err != nil {
		t.Fatalf("after the flush: got %v, %v; want true, nil", ok, err)
	}
	if err := b.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := fl.count("likes", `["3"]`); got != 1 {
		t.Errorf("got %d; want 1", got)
	}
}

func TestRetryAndLostReply(t *testing.T) {
	fl := newMem()
	fl.failNext, fl.lostReply = 2, 1
	b, _, _ := start(t, Config{Interval: time.Millisecond, RetryMin: time.Millisecond, RetryMax: 2 * time.Millisecond}, fl, nil)
	add(t, b, "wal", 1, 0, like(1, 4))
	if err := b.Drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := fl.count("likes", `["1"]`); got != 4 {
		t.Errorf("got %d; want 4 (a batch whose commit reply was lost is not applied twice)", got)
	}
	if s := b.Stats(); s.FlushErrors != 3 {
		t.Errorf("flush errors: got %d; want 3", s.FlushErrors)
	}
}

func TestCheckpointMoved(t *testing.T) {
	fl := newMem()
	b, _, done := start(t, Config{Interval: time.Millisecond}, fl, nil)
	fl.mu.Lock()
	fl.ckpt["wal"] = Pos{50, 0} // another writer
	fl.mu.Unlock()
	add(t, b, "wal", 10, 0, like(1, 1))
	if err := done(); !errors.Is(err, ErrCheckpointMoved) {
		t.Errorf("Run: got %v; want %v", err, ErrCheckpointMoved)
	}
}

func TestResetAndSet(t *testing.T) {
	fl := newMem()
	fl.counts["likes\x00[\"1\"]"] = 10
	fl.counts["likes\x00[\"2\"]"] = 20
	fl.counts["other\x00[\"1\"]"] = 5
	b, _, _ := start(t, Config{Interval: time.Hour}, fl, nil)
	ctx := context.Background()
	for _, in := range []Input{
		{Source: "wal", Pos: Pos{1, 1}, Deltas: []Delta{like(1, 3), like(3, 1)}},
		{Source: "wal", Pos: Pos{1, 2}, Resets: []string{"likes"}}, // TRUNCATE
		{Source: "wal", Pos: Pos{1, 3}, Deltas: []Delta{like(2, 1)}},
		{Source: "wal", Pos: Pos{2, 1}, Sets: []Delta{like(4, 40)}}, // a repair
		{Source: "wal", Pos: Pos{2, 2}, Deltas: []Delta{like(4, 1)}},
	} {
		if _, err := b.Add(ctx, in); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Drain(ctx); err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]int64{"likes\x00[\"1\"]": 0, "likes\x00[\"2\"]": 1, "likes\x00[\"3\"]": 0, "likes\x00[\"4\"]": 41, "other\x00[\"1\"]": 5} {
		if got := fl.counts[k]; got != want {
			t.Errorf("%q: got %d; want %d", k, got, want)
		}
	}
}

// TestHardStopRedelivery stops the batcher hard at random points while a
// source delivers, and restarts it from Load with the source redelivering
// from the durable position (as the WAL does): the counts stay exact.
func TestHardStopRedelivery(t *testing.T) {
	fl := newMem()
	const n = 20000
	next := uint64(1)
	want := map[int]int64{}
	for i := 1; i <= n; i++ {
		want[i%50] += int64(1 - 2*(i%3/2))
	}
	for round := 0; next <= n; round++ {
		b, err := New(Config{MaxPending: 64, Interval: time.Millisecond}, fl, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Load(context.Background(), "src"); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- b.Run(ctx) }()
		// The source resumes at its durable position: what was only
		// added, not flushed, is delivered again.
		from := b.Durable("src").Major + 1
		stopAt := from + 3000
		for i := from; i <= n && i < stopAt; i++ {
			if _, err := b.Add(ctx, Input{Source: "src", Pos: Pos{i, 0}, Deltas: []Delta{like(int(i%50), int64(1-2*(i%3/2)))}}); err != nil {
				t.Fatal(err)
			}
			next = i + 1
		}
		if next > n {
			if err := b.Drain(context.Background()); err != nil {
				t.Fatal(err)
			}
		}
		// Let at least one flush of this round commit before the hard
		// stop (without -race the adds can outrun every flush).
		for b.Durable("src").Major < from {
			time.Sleep(time.Millisecond)
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if round > 20 {
			t.Fatal("no progress")
		}
		next = b.Durable("src").Major + 1
	}
	for g, w := range want {
		if got := fl.count("likes", fmt.Sprintf(`["%d"]`, g)); got != w {
			t.Errorf("group %d: got %d; want %d", g, got, w)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		c  Config
		ok bool
	}{
		{Config{}, true},
		{Config{MaxPending: -1}, false},
		{Config{Interval: -time.Second}, false},
		{Config{RetryMin: time.Minute, RetryMax: time.Second}, false},
	} {
		if err := tc.c.Validate(); (err == nil) != tc.ok {
			t.Errorf("%+v: got %v; want ok=%v", tc.c, err, tc.ok)
		}
	}
}
