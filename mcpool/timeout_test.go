package mcpool

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pgcache/pgcache/testenv"
	"golang.org/x/sync/errgroup"
)

// deadlineCtx is a ctx with a deadline that passes when the test says
// so (expire), so that a test orders a timeout after the events it
// needs without sleeping.
type deadlineCtx struct {
	context.Context
	done chan struct{}
	once sync.Once
}

func newDeadlineCtx() *deadlineCtx {
	return &deadlineCtx{Context: context.Background(), done: make(chan struct{})}
}

func (c *deadlineCtx) Deadline() (time.Time, bool) { return time.Now().Add(time.Hour), true }
func (c *deadlineCtx) Done() <-chan struct{}       { return c.done }
func (c *deadlineCtx) Err() error {
	select {
	case <-c.done:
		return context.DeadlineExceeded
	default:
		return nil
	}
}
func (c *deadlineCtx) expire() { c.once.Do(func() { close(c.done) }) }

// connOf returns the connection of a pool's one server and one slot,
// once it is up.
func connOf(t *testing.T, p *Pool) *Conn {
	t.Helper()
	var c *Conn
	eventually(t, "the connection to come up", func() bool {
		c = p.servers[0].slots[0].conn.Load()
		return c != nil
	})
	return c
}

// holdWrites makes c's requests stay in its write buffer (as behind a
// write under way) until the returned func lets them go.
func holdWrites(c *Conn) (release func()) {
	c.mu.Lock()
	c.writing = true
	c.mu.Unlock()
	return func() {
		c.mu.Lock()
		c.writing = false
		c.mu.Unlock()
		c.flush()
	}
}

// lockedSeqs returns c's last seq, last written seq and pending count.
func lockedSeqs(c *Conn) (seq, wseq uint64, pending int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.seq, c.wseq, c.pending.n
}

func TestClassifyTimeouts(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want outcome
	}{
		{nil, outcomeSuccess},
		{timeoutErrs[TimeoutQueued], outcomeQueued},
		{timeoutErrs[TimeoutLate], outcomeLate},
		{timeoutErrs[TimeoutAnswering], outcomeAnswering},
		{timeoutErrs[TimeoutSilent], outcomeFailure},
		{fmt.Errorf("mg k: %w", &TimeoutError{Where: TimeoutQueued, Err: context.DeadlineExceeded}), outcomeQueued},
		{fmt.Errorf("%w: no where", ErrTimeout), outcomeFailure},
		{fmt.Errorf("%w: x", ErrServerDown), outcomeFailure},
		{fmt.Errorf("%w: x", ErrProtocol), outcomeFailure},
		{context.Canceled, outcomeNeutral},
		{&ServerError{Kind: "SERVER_ERROR", Msg: "busy"}, outcomeSuccess},
	} {
		if got := classify(tt.err); got != tt.want {
			t.Errorf("classify(%v) got %d; want %d", tt.err, got, tt.want)
		}
	}
	for w := TimeoutQueued; w <= TimeoutSilent; w++ {
		err := timeoutErrs[w]
		if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) || !Retryable(err) || TimeoutWhereOf(err) != w {
			t.Errorf("%v: want a retryable ErrTimeout and DeadlineExceeded, where %s", err, w)
		}
	}
}

// scriptedServer accepts one connection and hands it to the test, which
// reads the requests and writes the answers itself.
func scriptedServer(t *testing.T) (string, <-chan net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	ch := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		t.Cleanup(func() { c.Close() })
		ch <- c
	}()
	return l.Addr().String(), ch
}

// TestTimeoutWhere walks one connection through each place a request
// can be when its deadline passes, the server scripted by the test:
// written with an earlier answer received since (answering), written
// with nothing since (silent, or late when written in the last half of
// the timeout), and never written (queued). Only the silent one is a
// breaker failure.
func TestTimeoutWhere(t *testing.T) {
	addr, accepted := scriptedServer(t)
	pool := newTestPool(t, []string{addr}, func(c *Config) {
		c.ConnsPerServer = 1
		c.Timeout = time.Hour // minSilence half an hour: the test sets it
		c.IOTimeout = time.Minute
		c.Breaker.Failures = 2
	})
	var sc net.Conn
	select {
	case sc = <-accepted:
	case <-testCtx(t).Done():
		t.Fatal("the pool never connected")
	}
	srv := bufio.NewReader(sc)
	c := connOf(t, pool)
	readReq := func(want string) {
		t.Helper()
		// A request that never comes (a bug) fails the test, not hangs it.
		_ = sc.SetReadDeadline(time.Now().Add(30 * time.Second))
		line, err := srv.ReadString('\n')
		if err != nil || line != want+"\r\n" {
			t.Fatalf("server read %q, %v; want %q", line, err, want)
		}
	}
	answer := func() {
		t.Helper()
		if _, err := sc.Write([]byte("EN\r\n")); err != nil {
			t.Fatal(err)
		}
	}
	send := func(ctx context.Context, key string) <-chan error {
		ch := make(chan error, 1)
		go func() {
			_, err := pool.MetaGet(ctx, key, "v")
			ch <- err
		}()
		return ch
	}
	waitWritten := func(n uint64) {
		t.Helper()
		eventually(t, "request "+strconv.FormatUint(n, 10)+" written", func() bool {
			_, w, _ := lockedSeqs(c)
			return w >= n
		})
	}
	idle := func() {
		t.Helper()
		eventually(t, "every answer read", func() bool { _, _, n := lockedSeqs(c); return n == 0 })
	}
	setMinSilence := func(d time.Duration) {
		c.mu.Lock()
		c.cfg.minSilence = d
		c.mu.Unlock()
	}
	long := testCtx(t)
	recv := func(ch <-chan error) error {
		t.Helper()
		select {
		case err := <-ch:
			return err
		case <-long.Done():
			t.Fatal("a request never returned")
			return nil
		}
	}
	check := func(err error, want TimeoutWhere) {
		t.Helper()
		if got := TimeoutWhereOf(err); got != want || !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("got %v (where %s); want an ErrTimeout, where %s", err, got, want)
		}
	}

	// answering: a (no deadline) and b written; a's answer comes; b's
	// deadline passes.
	a := send(long, "a")
	readReq("mg a v")
	db := newDeadlineCtx()
	b := send(db, "b")
	readReq("mg b v")
	waitWritten(2)
	answer()
	if err := recv(a); err != nil {
		t.Fatalf("mg a: %v", err)
	}
	db.expire()
	check(recv(b), TimeoutAnswering)
	answer() // b's, read and dropped
	idle()

	// silent: written, nothing back, the whole timeout.
	setMinSilence(0)
	dc := newDeadlineCtx()
	cc := send(dc, "c")
	readReq("mg c v")
	waitWritten(3)
	dc.expire()
	check(recv(cc), TimeoutSilent)
	answer()
	idle()

	// late: written, nothing back, but within the timeout's last half.
	setMinSilence(time.Hour)
	dd := newDeadlineCtx()
	d := send(dd, "d")
	readReq("mg d v")
	waitWritten(4)
	dd.expire()
	check(recv(d), TimeoutLate)
	answer()
	idle()

	// queued: never written.
	release := holdWrites(c)
	de := newDeadlineCtx()
	e := send(de, "e")
	eventually(t, "request e in the pipeline", func() bool { s, _, _ := lockedSeqs(c); return s == 5 })
	de.expire()
	check(recv(e), TimeoutQueued)
	release()
	readReq("mg e v")
	answer()
	idle()

	st := pool.Stats()[0]
	if st.TimeoutsAnswering != 1 || st.TimeoutsSilent != 1 || st.TimeoutsLate != 1 || st.TimeoutsQueued != 1 || st.Failures != 1 {
		t.Fatalf("stats %+v; want one timeout of each kind, one failure (the silent one)", st)
	}
	for w := TimeoutQueued; w <= TimeoutSilent; w++ {
		if n := st.TimeoutsOf(w); n != 1 {
			t.Fatalf("TimeoutsOf(%s) got %d; want 1", w, n)
		}
	}
	if st.Requests != 4 { // a, b, c, d were sent; e was not
		t.Fatalf("stats %+v: requests %d; want 4", st, st.Requests)
	}
	if s := pool.BreakerState(0); s != BreakerClosed {
		t.Fatalf("breaker %s after one failure; want closed", s)
	}
}

// TestUnreadBytes: the kernel's count of bytes received and not yet
// read, which makes a written request's timeout "answering" when the
// reader has not run.
func TestUnreadBytes(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	client, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	if unreadBytes(client) {
		t.Fatal("unread bytes before any was sent")
	}
	if _, err := server.Write([]byte("EN\r\n")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the bytes to arrive", func() bool { return unreadBytes(client) })
	buf := make([]byte, 4)
	if _, err := client.Read(buf); err != nil {
		t.Fatal(err)
	}
	if unreadBytes(client) {
		t.Fatal("unread bytes after they were read")
	}
}

// TestHeldQueueKeepsBreakerClosed holds a healthy memcached's connection
// queue (its writes) past Config.Timeout: every request times out
// queued, never written, and the breaker stays closed. Before timeouts
// were told apart, these opened it.
func TestHeldQueueKeepsBreakerClosed(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 1)
	var tr transitions
	pool := newTestPool(t, addrsOf(mcs), func(c *Config) {
		c.ConnsPerServer = 1
		c.Timeout = 20 * time.Millisecond
		c.Breaker.Failures = 3
		c.OnBreakerChange = tr.record
	})
	ctx := testCtx(t)
	if _, err := pool.MetaSet(ctx, "held", []byte("v"), SetOptions{}); err != nil {
		t.Fatal(err)
	}
	c := connOf(t, pool)
	release := holdWrites(c)
	const n = 50
	var g errgroup.Group
	for i := range n {
		g.Go(func() error {
			_, err := pool.MetaGet(context.Background(), "held", "v")
			if TimeoutWhereOf(err) != TimeoutQueued {
				return fmt.Errorf("mg %d behind a held queue got %v; want a queued timeout", i, err)
			}
			return nil
		})
	}
	err := g.Wait()
	release()
	if err != nil {
		t.Fatal(err)
	}
	if got := tr.list(); len(got) != 0 {
		t.Fatalf("breaker transitions %v; want none", got)
	}
	resp, err := pool.MetaGet(ctx, "held", "v")
	if err != nil || string(resp.Value) != "v" {
		t.Fatalf("mg after the release got %+v, %v", resp, err)
	}
	st := pool.Stats()[0]
	if st.TimeoutsQueued != n || st.Failures != 0 || st.Opens != 0 {
		t.Fatalf("stats %+v; want %d queued timeouts, no failure, no open", st, n)
	}
	eventually(t, "the abandoned requests' answers read", func() bool { return c.InFlight() == 0 })
}

// saturate runs clients goroutines of perClient gets each (ctx without
// deadline: Config.Timeout) against pool, and returns the errors that
// were not timeouts or breaker rejections.
func saturate(pool *Pool, key string, clients, perClient int) error {
	var g errgroup.Group
	for range clients {
		g.Go(func() error {
			for range perClient {
				_, err := pool.MetaGet(context.Background(), key, "v")
				if err != nil && !errors.Is(err, ErrTimeout) && !errors.Is(err, ErrBreakerOpen) {
					return err
				}
			}
			return nil
		})
	}
	return g.Wait()
}

// saturatedConfig: far more concurrent requests (saturatedClients)
// than two connections of 16 slots carry in one timeout.
func saturatedConfig(tr *transitions) func(*Config) {
	return func(c *Config) {
		c.ConnsPerServer = 2
		c.MaxInFlight = 16
		c.Timeout = 50 * time.Millisecond
		c.IOTimeout = time.Minute // the breaker, not the liveness check, must see a paused server
		c.Breaker = BreakerConfig{Failures: 5, OpenFor: time.Minute}
		c.OnBreakerChange = tr.record
	}
}

const saturatedClients = 10000 // the herd of issue 14

// TestSaturatedClientKeepsBreakerClosed: 10,000 goroutines at once on a
// healthy memcached, 10 gets each, through 32 slots, with a 50ms
// timeout. Most of
// their requests time out waiting for a slot in this process; the
// breaker must stay closed, as the server answers all it is sent.
func TestSaturatedClientKeepsBreakerClosed(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 1)
	var tr transitions
	pool := newTestPool(t, addrsOf(mcs), saturatedConfig(&tr))
	if _, err := pool.MetaSet(testCtx(t), "sat", make([]byte, 1000), SetOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := saturate(pool, "sat", saturatedClients, 10); err != nil {
		t.Fatal(err)
	}
	st := pool.Stats()[0]
	t.Logf("stats %+v", st)
	if got := tr.list(); len(got) != 0 {
		t.Fatalf("breaker transitions %v on a healthy server; want none", got)
	}
	if st.TimeoutsQueued < 100 {
		t.Fatalf("only %d queued timeouts: the load did not saturate the client", st.TimeoutsQueued)
	}
	if st.Requests <= st.TimeoutsAnswering+st.TimeoutsLate+st.TimeoutsSilent {
		t.Fatalf("stats %+v: no get was answered", st)
	}
	if st.Opens != 0 || st.Rejected != 0 {
		t.Fatalf("stats %+v; want no open, no rejection", st)
	}
}

// TestSaturatedPausedServerOpensBreaker: the same load on a memcached
// stopped with SIGSTOP (it accepts, reads and answers nothing): the
// requests written time out silent and open the breaker, though most
// time out queued.
func TestSaturatedPausedServerOpensBreaker(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 1)
	var tr transitions
	pool := newTestPool(t, addrsOf(mcs), saturatedConfig(&tr))
	ctx := testCtx(t)
	if _, err := pool.MetaSet(ctx, "sat", make([]byte, 1000), SetOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "both connections up", func() bool { return pool.Stats()[0].Conns == 2 })
	pid := mcs[0].PID()
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = syscall.Kill(pid, syscall.SIGCONT) }()
	eventually(t, "memcached to stop", func() bool { return processStopped(t, pid) })
	if err := saturate(pool, "sat", saturatedClients, 4); err != nil {
		t.Fatal(err)
	}
	st := pool.Stats()[0]
	t.Logf("stats %+v", st)
	got := tr.list()
	if len(got) == 0 || got[0] != (transition{0, BreakerClosed, BreakerOpen}) {
		t.Fatalf("breaker transitions %v on a paused server; want closed->open", got)
	}
	if st.TimeoutsSilent < 5 || st.Failures != st.TimeoutsSilent || st.Conns != 2 {
		t.Fatalf("stats %+v; want the breaker opened by silent timeouts (>= 5, all the failures) on live connections", st)
	}
}
