package mcpool

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pgcache/pgcache/testenv"
	"golang.org/x/sync/errgroup"
)

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func addrsOf(mcs []*testenv.Memcached) []string {
	out := make([]string, len(mcs))
	for i, m := range mcs {
		out[i] = m.Addr
	}
	return out
}

// TestPipelineConcurrent runs many goroutines through one pool, each with
// its own keys and values, and checks every response is the one for its
// own request.
func TestPipelineConcurrent(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 3)
	pool := newTestPool(t, addrsOf(mcs), func(c *Config) { c.MaxInFlight = 16 })
	ctx := testCtx(t)
	const workers, ops = 48, 200
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < ops; i++ {
				key := fmt.Sprintf("pipe:%d:%d", w, i)
				val := []byte(fmt.Sprintf("value-%d-%d-%s", w, i, key))
				if resp, err := pool.MetaSet(ctx, key, val, SetOptions{ReturnCAS: true}); err != nil || resp.Status != StatusHD || resp.CAS == 0 {
					errs <- fmt.Errorf("ms %s: got %+v, %v; want HD with a CAS", key, resp, err)
					return
				}
				resp, err := pool.MetaGet(ctx, key, "v", "k", "O"+strconv.Itoa(i))
				if err != nil || resp.Status != StatusVA || string(resp.Value) != string(val) || resp.Key != key || resp.Opaque != strconv.Itoa(i) {
					errs <- fmt.Errorf("mg %s: got %+v, %v; want VA %q", key, resp, err, val)
					return
				}
				if err := pool.Delete(ctx, key); err != nil {
					errs <- err
					return
				}
				if resp, err := pool.MetaGet(ctx, key, "v"); err != nil || resp.Status != StatusEN {
					errs <- fmt.Errorf("mg %s after delete: got %+v, %v; want EN", key, resp, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	var total uint64
	for _, s := range pool.Stats() {
		total += s.Requests
		if s.Conns != 2 || s.Failures != 0 || s.State != BreakerClosed {
			t.Errorf("stats %+v: want 2 conns, no failures, closed", s)
		}
	}
	if want := uint64(workers * ops * 4); total != want {
		t.Errorf("requests got %d; want %d", total, want)
	}
}

// TestConnOrder pipelines requests from many goroutines on one Conn and
// checks each response carries its own request's key.
func TestConnOrder(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 1)
	ctx := testCtx(t)
	c, err := Dial(ctx, mcs[0].Addr, ConnConfig{MaxInFlight: 8, IOTimeout: 5 * time.Second, MaxValueSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var wg sync.WaitGroup
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 300; i++ {
				key := fmt.Sprintf("order:%d:%d", w, i)
				// Alternate hits and quiet misses to mix response shapes.
				if i%2 == 0 {
					if _, err := c.MetaSet(ctx, key, []byte(key), SetOptions{}); err != nil {
						t.Error(err)
						return
					}
				}
				resp, err := c.MetaGet(ctx, key, "k", "v", "q")
				switch {
				case err != nil:
					t.Error(err)
					return
				case i%2 == 0 && (resp.Status != StatusVA || resp.Key != key || string(resp.Value) != key):
					t.Errorf("mg %s: got %+v; want VA of its own key", key, resp)
					return
				case i%2 == 1 && (resp.Status != StatusEN || !resp.Quiet):
					t.Errorf("mg %s q: got %+v; want a quiet EN", key, resp)
					return
				}
			}
		}()
	}
	wg.Wait()
	if err := c.NoOp(ctx); err != nil {
		t.Fatal(err)
	}
	if n := c.InFlight(); n != 0 {
		t.Fatalf("InFlight got %d; want 0", n)
	}
}

// TestLeaseFlags checks the meta protocol's lease behaviour that lease/
// relies on, through the pool.
func TestLeaseFlags(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 2)
	pool := newTestPool(t, addrsOf(mcs), nil)
	ctx := testCtx(t)
	const key = "lease:post:1"

	// Flags apply in order: t after N30 reports the new item's TTL.
	first, err := pool.MetaGet(ctx, key, "v", "c", "N30", "t")
	if err != nil {
		t.Fatal(err)
	}
	if !first.Win || first.Claimed || first.Stale || first.CAS == 0 || first.TTL != 30 {
		t.Fatalf("first mg N30 got %+v; want W with a CAS and t30", first)
	}
	second, err := pool.MetaGet(ctx, key, "v", "c", "N30")
	if err != nil {
		t.Fatal(err)
	}
	if second.Win || !second.Claimed {
		t.Fatalf("second mg N30 got %+v; want Z and no W", second)
	}
	// A fill with a wrong CAS is refused; the winner's CAS is accepted.
	if resp, err := pool.MetaSet(ctx, key, []byte("stale"), SetOptions{CAS: first.CAS + 100}); err != nil || resp.Status != StatusEX {
		t.Fatalf("ms C<wrong> got %+v, %v; want EX", resp, err)
	}
	if resp, err := pool.MetaSet(ctx, key, []byte("v1"), SetOptions{CAS: first.CAS, TTL: time.Minute}); err != nil || resp.Status != StatusHD {
		t.Fatalf("ms C<winner's cas> got %+v, %v; want HD", resp, err)
	}
	hit, err := pool.MetaGet(ctx, key, "v", "c", "N30")
	if err != nil || hit.Status != StatusVA || string(hit.Value) != "v1" || hit.Win || hit.Claimed || hit.Stale {
		t.Fatalf("mg after fill got %+v, %v; want VA v1 without W, Z or X", hit, err)
	}
	// Mark stale: the next reader gets X and W, the one after X and Z,
	// both with the stale value.
	if err := pool.MarkStale(ctx, key, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	winner, err := pool.MetaGet(ctx, key, "v", "c", "N30", "t")
	if err != nil || !winner.Stale || !winner.Win || winner.Claimed || string(winner.Value) != "v1" || winner.TTL > 30 {
		t.Fatalf("mg after md I got %+v, %v; want X W with v1 and t<=30", winner, err)
	}
	loser, err := pool.MetaGet(ctx, key, "v", "c", "N30")
	if err != nil || !loser.Stale || loser.Win || !loser.Claimed {
		t.Fatalf("second mg after md I got %+v, %v; want X Z", loser, err)
	}
	// A fill holding the CAS from before the invalidation is refused.
	if resp, err := pool.MetaSet(ctx, key, []byte("old"), SetOptions{CAS: hit.CAS}); err != nil || resp.Status != StatusEX {
		t.Fatalf("ms with pre-invalidation CAS got %+v, %v; want EX", resp, err)
	}
	if resp, err := pool.MetaSet(ctx, key, []byte("v2"), SetOptions{CAS: winner.CAS, ReturnCAS: true}); err != nil || resp.Status != StatusHD {
		t.Fatalf("ms with the winner's CAS got %+v, %v; want HD", resp, err)
	}
	fresh, err := pool.MetaGet(ctx, key, "v")
	if err != nil || fresh.Stale || string(fresh.Value) != "v2" {
		t.Fatalf("mg after refill got %+v, %v; want fresh v2", fresh, err)
	}
	// ms I with an older CAS stores the value but marks it stale.
	cur, _ := pool.MetaGet(ctx, key, "c")
	if resp, err := pool.MetaSet(ctx, key, []byte("v3"), SetOptions{CAS: cur.CAS - 1, Invalidate: true}); err != nil || resp.Status != StatusHD {
		t.Fatalf("ms C<older> I got %+v, %v; want HD", resp, err)
	}
	if resp, err := pool.MetaGet(ctx, key, "v"); err != nil || !resp.Stale || string(resp.Value) != "v3" {
		t.Fatalf("mg after ms I got %+v, %v; want stale v3", resp, err)
	}
}

func TestSetModesAndArithmetic(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 1)
	pool := newTestPool(t, addrsOf(mcs), nil)
	ctx := testCtx(t)
	set := func(key, val string, opt SetOptions) Status {
		t.Helper()
		resp, err := pool.MetaSet(ctx, key, []byte(val), opt)
		if err != nil {
			t.Fatalf("ms %s: %v", key, err)
		}
		return resp.Status
	}
	get := func(key string) Response {
		t.Helper()
		resp, err := pool.MetaGet(ctx, key, "v", "f", "t")
		if err != nil {
			t.Fatalf("mg %s: %v", key, err)
		}
		return resp
	}
	steps := []struct {
		name string
		do   func() Status
		want Status
	}{
		{"replace missing", func() Status { return set("m", "x", SetOptions{Mode: 'R'}) }, StatusNS},
		{"add missing", func() Status { return set("m", "b", SetOptions{Mode: 'E', ClientFlags: 42, TTL: 90 * time.Second}) }, StatusHD},
		{"add existing", func() Status { return set("m", "x", SetOptions{Mode: 'E'}) }, StatusNS},
		{"append", func() Status { return set("m", "c", SetOptions{Mode: 'A'}) }, StatusHD},
		{"prepend", func() Status { return set("m", "a", SetOptions{Mode: 'P'}) }, StatusHD},
		{"replace existing", func() Status { return set("r", "1", SetOptions{Mode: 'R'}) }, StatusNS},
		{"set", func() Status { return set("r", "1", SetOptions{Mode: 'S'}) }, StatusHD},
		{"expired at once", func() Status { return set("gone", "1", SetOptions{TTL: -1}) }, StatusHD},
	}
	for _, s := range steps {
		if got := s.do(); got != s.want {
			t.Fatalf("%s: got %s; want %s", s.name, got, s.want)
		}
	}
	if r := get("m"); string(r.Value) != "abc" || r.ClientFlags != 42 || r.TTL < 80 || r.TTL > 90 {
		t.Fatalf("mg m got %+v; want abc, f42, t about 90", r)
	}
	if r := get("gone"); r.Status != StatusEN {
		t.Fatalf("mg gone got %+v; want EN", r)
	}
	if _, err := pool.MetaSet(ctx, "m", nil, SetOptions{Mode: 'X'}); !errors.Is(err, ErrBadRequest) {
		t.Fatalf("ms mode X got %v; want ErrBadRequest", err)
	}

	ari := func(opt ArithmeticOptions) Response {
		t.Helper()
		resp, err := pool.MetaArithmetic(ctx, "cnt", opt)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	if r := ari(ArithmeticOptions{}); r.Status != StatusNF {
		t.Fatalf("ma on a miss got %+v; want NF", r)
	}
	checks := []struct {
		opt  ArithmeticOptions
		want uint64
	}{
		{ArithmeticOptions{Create: true, Initial: 10}, 10},
		{ArithmeticOptions{}, 11},
		{ArithmeticOptions{Delta: 9}, 20},
		{ArithmeticOptions{Decrement: true, Delta: 5}, 15},
		{ArithmeticOptions{Decrement: true, Delta: 100}, 0},
	}
	for _, c := range checks {
		r := ari(c.opt)
		n, err := r.Uint64()
		if err != nil || n != c.want {
			t.Fatalf("ma %+v got %+v (%d, %v); want %d", c.opt, r, n, err, c.want)
		}
	}
}

// TestDo forwards raw meta commands, including quiet ones and ones
// memcached rejects, and checks the pipeline stays in step.
func TestDo(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 2)
	pool := newTestPool(t, addrsOf(mcs), nil)
	ctx := testCtx(t)
	tests := []struct {
		req, val string
		status   Status
		quiet    bool
		value    string
		srvErr   string // a *ServerError of this kind
		err      error
	}{
		{req: "ms do:a 5 T60", val: "hello", status: StatusHD},
		{req: "mg do:a v k\r\n", status: StatusVA, value: "hello"},
		{req: "mg do:a q v", status: StatusVA, value: "hello"},
		{req: "mg do:missing q v", status: StatusEN, quiet: true},
		{req: "ms do:b 2 q", val: "hi", status: StatusHD, quiet: true},
		{req: "mg do:b v", status: StatusVA, value: "hi"},
		{req: "md do:b q", status: StatusHD, quiet: true},
		{req: "md do:b q", status: StatusNF},
		{req: "ma do:n N0 J5 v", status: StatusVA, value: "5"},
		{req: "me do:a", status: StatusME},
		{req: "mg do:a Zz v", srvErr: "CLIENT_ERROR"},
		{req: "ms do:a 2 Mx", val: "zz", srvErr: "CLIENT_ERROR"},
		{req: "mg do:a v v", srvErr: "CLIENT_ERROR"},
		{req: "mg do:a v", status: StatusVA, value: "hello"},
		{req: "get do:a", err: ErrBadRequest},
		{req: "ms do:a 3", val: "hello", err: ErrBadRequest},
		{req: "ms do:a", val: "", err: ErrBadRequest},
		{req: "mg do:a v", val: "x", err: ErrBadRequest},
		{req: "mg  do:a", err: ErrBadKey},
		{req: "mn", err: ErrBadRequest},
		{req: "", err: ErrBadRequest},
		{req: "mg do:a v\r\nmg do:b", err: ErrBadRequest},
	}
	for _, tt := range tests {
		t.Run(tt.req, func(t *testing.T) {
			resp, err := pool.Do(ctx, []byte(tt.req), []byte(tt.val))
			switch {
			case tt.err != nil:
				if !errors.Is(err, tt.err) {
					t.Fatalf("got %+v, %v; want %v", resp, err, tt.err)
				}
			case tt.srvErr != "":
				var se *ServerError
				if !errors.As(err, &se) || se.Kind != tt.srvErr {
					t.Fatalf("got %+v, %v; want %s", resp, err, tt.srvErr)
				}
			default:
				if err != nil || resp.Status != tt.status || resp.Quiet != tt.quiet || string(resp.Value) != tt.value {
					t.Fatalf("got %+v, %v; want %s quiet=%v value %q", resp, err, tt.status, tt.quiet, tt.value)
				}
			}
		})
	}
	for i := range mcs {
		if err := pool.NoOp(ctx, i); err != nil {
			t.Fatalf("NoOp %d: %v", i, err)
		}
	}
}

func TestDeleteAndMarkStale(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 3)
	pool := newTestPool(t, addrsOf(mcs), nil)
	ctx := testCtx(t)
	keys := make([]string, 300)
	for i := range keys {
		keys[i] = "del:" + strconv.Itoa(i)
		if i%3 != 0 { // a third are absent: deleting them is not an error
			if _, err := pool.MetaSet(ctx, keys[i], []byte("v"), SetOptions{}); err != nil {
				t.Fatal(err)
			}
		}
	}
	half := len(keys) / 2
	for i, err := range pool.MarkStaleMulti(ctx, keys[:half], 30*time.Second) {
		if err != nil {
			t.Fatalf("MarkStaleMulti %s: %v", keys[i], err)
		}
	}
	for i, err := range pool.DeleteMulti(ctx, keys[half:]) {
		if err != nil {
			t.Fatalf("DeleteMulti %s: %v", keys[half+i], err)
		}
	}
	for i, k := range keys {
		resp, err := pool.MetaGet(ctx, k, "v")
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case i%3 == 0 || i >= half:
			if resp.Status != StatusEN {
				t.Fatalf("mg %s got %+v; want EN", k, resp)
			}
		default:
			if !resp.Stale || string(resp.Value) != "v" {
				t.Fatalf("mg %s got %+v; want stale v", k, resp)
			}
		}
	}
	if err := pool.Delete(ctx, keys[1]); err != nil {
		t.Fatal(err)
	}
	if err := pool.MarkStale(ctx, "never-set", time.Second); err != nil {
		t.Fatal(err)
	}
	if err := pool.Delete(ctx, "bad key"); !errors.Is(err, ErrBadKey) || Retryable(err) {
		t.Fatalf("Delete of a bad key got %v; want a non-retryable ErrBadKey", err)
	}
	errs := pool.DeleteMulti(ctx, []string{"ok", "", "ok2"})
	if errs[0] != nil || !errors.Is(errs[1], ErrBadKey) || errs[2] != nil {
		t.Fatalf("DeleteMulti with a bad key got %v; want only the bad one to fail", errs)
	}
}

type transition struct {
	server   int
	from, to BreakerState
}

type transitions struct {
	mu  sync.Mutex // guards all
	all []transition
}

func (tr *transitions) record(server int, _ string, from, to BreakerState) {
	tr.mu.Lock()
	tr.all = append(tr.all, transition{server, from, to})
	tr.mu.Unlock()
}

func (tr *transitions) list() []transition {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return append([]transition(nil), tr.all...)
}

// keysOn returns n keys that the pool places on server i.
func keysOn(p *Pool, i, n int, prefix string) []string {
	var out []string
	for j := 0; len(out) < n; j++ {
		k := prefix + strconv.Itoa(j)
		if p.Pick(k) == i {
			out = append(out, k)
		}
	}
	return out
}

// eventually polls cond until it holds or the test's minute runs out.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testenv.Eventually(t, 30*time.Second, what, cond)
}

// TestKillServer kills one server: its keys fail fast (server down, then
// breaker open) while the others keep working, and after a restart the
// breaker closes again.
func TestKillServer(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 3)
	var tr transitions
	pool := newTestPool(t, addrsOf(mcs), func(c *Config) { c.OnBreakerChange = tr.record })
	ctx := testCtx(t)
	const dead = 1
	deadKeys := keysOn(pool, dead, 50, "dead:")
	liveKeys := append(keysOn(pool, 0, 50, "live:"), keysOn(pool, 2, 50, "live:")...)
	for _, k := range append(deadKeys, liveKeys...) {
		if _, err := pool.MetaSet(ctx, k, []byte(k), SetOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if err := mcs[dead].Kill(); err != nil {
		t.Fatal(err)
	}
	// The dead server's keys fail with ErrServerDown until the breaker
	// opens, then with ErrBreakerOpen; never with a timeout.
	sawOpen := false
	for round := 0; !sawOpen; round++ {
		if round > 1000 {
			t.Fatal("breaker never opened")
		}
		for _, k := range deadKeys {
			_, err := pool.MetaGet(ctx, k, "v")
			switch {
			case errors.Is(err, ErrBreakerOpen):
				sawOpen = true
			case errors.Is(err, ErrServerDown):
			default:
				t.Fatalf("mg %s on the killed server got %v; want ErrServerDown or ErrBreakerOpen", k, err)
			}
			if !Retryable(err) {
				t.Fatalf("error %v is not retryable", err)
			}
		}
	}
	if st := pool.BreakerState(dead); st == BreakerClosed {
		t.Fatalf("breaker of the killed server is %s", st)
	}
	for _, k := range liveKeys {
		resp, err := pool.MetaGet(ctx, k, "v")
		if err != nil || string(resp.Value) != k {
			t.Fatalf("mg %s on a live server got %+v, %v", k, resp, err)
		}
	}
	errs := pool.DeleteMulti(ctx, append(deadKeys[:5:5], liveKeys[:5]...))
	for i, err := range errs {
		if i < 5 && (err == nil || !Retryable(err)) {
			t.Fatalf("DeleteMulti of a dead key got %v; want a retryable error", err)
		}
		if i >= 5 && err != nil {
			t.Fatalf("DeleteMulti of a live key got %v", err)
		}
	}
	for i := range 3 {
		if i != dead && pool.BreakerState(i) != BreakerClosed {
			t.Fatalf("breaker of live server %d is %s", i, pool.BreakerState(i))
		}
	}

	if err := mcs[dead].Start(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the restarted server to serve its keys", func() bool {
		resp, err := pool.MetaGet(ctx, deadKeys[0], "v")
		return err == nil && resp.Status == StatusEN // data is gone after a restart
	})
	if st := pool.BreakerState(dead); st != BreakerClosed {
		t.Fatalf("breaker after recovery is %s; want closed", st)
	}
	got := tr.list()
	if len(got) < 3 || got[0] != (transition{dead, BreakerClosed, BreakerOpen}) || got[len(got)-1] != (transition{dead, BreakerHalfOpen, BreakerClosed}) {
		t.Fatalf("transitions got %v; want closed->open first and half-open->closed last, on server %d only", got, dead)
	}
	for _, x := range got {
		if x.server != dead {
			t.Fatalf("transition on live server: %v", x)
		}
	}
	st := pool.Stats()[dead]
	if st.Opens == 0 || st.Rejected == 0 || st.Failures == 0 || st.Dials < 3 || st.Conns != 2 {
		t.Fatalf("stats of the recovered server %+v: want opens, rejections, failures, redials and 2 conns", st)
	}
}

// TestPausedServer stops a server with SIGSTOP: requests without a ctx
// deadline time out after Config.Timeout, the breaker opens, and after
// SIGCONT the server is used again.
func TestPausedServer(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 2)
	pool := newTestPool(t, addrsOf(mcs), func(c *Config) {
		c.Timeout = 200 * time.Millisecond
		c.IOTimeout = time.Second
		c.Breaker.Failures = 2
	})
	ctx := testCtx(t)
	key := keysOn(pool, 0, 1, "pause:")[0]
	if _, err := pool.MetaSet(ctx, key, []byte("v"), SetOptions{}); err != nil {
		t.Fatal(err)
	}
	pid := mcs[0].PID()
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	// SIGSTOP is asynchronous: wait until every thread is stopped.
	eventually(t, "memcached to stop", func() bool { return processStopped(t, pid) })
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			_ = syscall.Kill(pid, syscall.SIGCONT)
		}
	}
	defer resume()
	_, err := pool.MetaGet(context.Background(), key, "v")
	if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) || !Retryable(err) {
		t.Fatalf("mg on a paused server got %v; want a retryable ErrTimeout", err)
	}
	eventually(t, "the breaker of the paused server to open", func() bool {
		_, err := pool.MetaGet(context.Background(), key, "v")
		return errors.Is(err, ErrBreakerOpen)
	})
	other := keysOn(pool, 1, 1, "pause:")[0]
	if _, err := pool.MetaGet(ctx, other, "v"); err != nil {
		t.Fatalf("mg on the other server: %v", err)
	}
	resume()
	eventually(t, "the resumed server to answer", func() bool {
		resp, err := pool.MetaGet(ctx, key, "v")
		return err == nil && string(resp.Value) == "v"
	})
}

// processStopped reports whether every thread of pid is stopped ("T").
func processStopped(t *testing.T, pid int) bool {
	t.Helper()
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, task := range tasks {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, task.Name()))
		if err != nil {
			return false
		}
		// The state follows the parenthesised command name.
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 || i+2 >= len(stat) || stat[i+2] != 'T' {
			return false
		}
	}
	return true
}

// silentServer accepts connections and reads them without ever
// answering, until the test ends.
func silentServer(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
			go func() { _, _ = io.Copy(io.Discard, c) }()
		}
	}()
	return l.Addr().String()
}

// TestCtxDeadlineWins checks, against a server that never answers, that
// Config.Timeout ends a request whose ctx has no deadline (not before
// Timeout), that a ctx deadline is used even when it is longer, and that
// a cancelled ctx is not retryable.
func TestCtxDeadlineWins(t *testing.T) {
	const timeout = 80 * time.Millisecond
	pool := newTestPool(t, []string{silentServer(t)}, func(c *Config) {
		c.Timeout = timeout
		c.IOTimeout = 5 * time.Second // longer than the deadlines under test
		// One request in flight: the first is timed out in the pipeline,
		// those after it while they wait for the slot it keeps.
		c.ConnsPerServer, c.MaxInFlight = 1, 1
		c.Breaker.Failures = 100 // timeouts would open it
	})
	start := time.Now()
	if _, err := pool.MetaGet(context.Background(), "k", "v"); !errors.Is(err, ErrTimeout) {
		t.Fatalf("mg with no ctx deadline got %v; want ErrTimeout", err)
	}
	if d := time.Since(start); d < timeout {
		t.Fatalf("Config.Timeout (%s) ended the request after %s", timeout, d)
	}
	// A longer ctx deadline replaces it.
	const longer = 4 * timeout
	ctx, cancel := context.WithTimeout(context.Background(), longer)
	defer cancel()
	start = time.Now()
	if _, err := pool.MetaGet(ctx, "k", "v"); !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("mg with a ctx deadline got %v; want ErrTimeout and DeadlineExceeded", err)
	}
	if d := time.Since(start); d < longer {
		t.Fatalf("the ctx deadline (%s) ended the request after %s", longer, d)
	}
	// The same for a pipelined multi-get.
	start = time.Now()
	_, errs := pool.MetaGetMulti(context.Background(), []string{"a", "b", "c"}, "v")
	for i, err := range errs {
		if !errors.Is(err, ErrTimeout) {
			t.Fatalf("multi-get key %d got %v; want ErrTimeout", i, err)
		}
	}
	if d := time.Since(start); d < timeout {
		t.Fatalf("Config.Timeout (%s) ended the multi-get after %s", timeout, d)
	}
	cctx, ccancel := context.WithCancel(context.Background())
	ccancel()
	if _, err := pool.MetaGet(cctx, "k", "v"); !errors.Is(err, context.Canceled) || Retryable(err) {
		t.Fatalf("mg with a cancelled ctx got %v; want a non-retryable context.Canceled", err)
	}
}

func TestClose(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 1)
	pool := newTestPool(t, addrsOf(mcs), nil)
	ctx := testCtx(t)
	if _, err := pool.MetaGet(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	if err := pool.Close(); err != nil {
		t.Fatal(err)
	}
	if err := pool.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := pool.MetaGet(ctx, "k"); !errors.Is(err, ErrClosed) || Retryable(err) {
		t.Fatalf("mg after Close got %v; want ErrClosed", err)
	}
}

func TestConfigValidate(t *testing.T) {
	ok := DefaultConfig()
	ok.Servers = []string{"127.0.0.1:11211"}
	if err := ok.Validate(); err != nil {
		t.Fatalf("valid config: %v", err)
	}
	tests := []struct {
		name   string
		mutate func(*Config)
	}{
		{"no servers", func(c *Config) { c.Servers = nil }},
		{"duplicate", func(c *Config) { c.Servers = []string{"a:1", "a:1:2"} }},
		{"bad hash", func(c *Config) { c.Hash = "fnv" }},
		{"empty hash", func(c *Config) { c.Hash = "" }},
		{"conns", func(c *Config) { c.ConnsPerServer = 0 }},
		{"timeout", func(c *Config) { c.Timeout = 0 }},
		{"dial timeout", func(c *Config) { c.DialTimeout = -1 }},
		{"backoff order", func(c *Config) { c.ReconnectMax = c.ReconnectMin / 2 }},
		{"breaker failures", func(c *Config) { c.Breaker.Failures = 0 }},
		{"breaker open", func(c *Config) { c.Breaker.OpenFor = 0 }},
		{"in flight", func(c *Config) { c.MaxInFlight = 0 }},
		{"io timeout", func(c *Config) { c.IOTimeout = 0 }},
		{"value size", func(c *Config) { c.MaxValueSize = 0 }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := ok
			tt.mutate(&c)
			if err := c.Validate(); !errors.Is(err, ErrConfig) {
				t.Fatalf("Validate got %v; want ErrConfig", err)
			}
			if _, err := New(c, nil); !errors.Is(err, ErrConfig) {
				t.Fatalf("New got %v; want ErrConfig", err)
			}
		})
	}
}

func TestRetryable(t *testing.T) {
	tests := []struct {
		err  error
		want bool
	}{
		{nil, false},
		{ErrServerDown, true},
		{fmt.Errorf("md k: %w", ErrBreakerOpen), true},
		{fmt.Errorf("%w: %w", ErrTimeout, context.DeadlineExceeded), true},
		{ErrProtocol, true},
		{&ServerError{Kind: "SERVER_ERROR", Msg: "out of memory"}, true},
		{&ServerError{Kind: "CLIENT_ERROR", Msg: "bad"}, false},
		{context.Canceled, false},
		{ErrClosed, false},
		{ErrBadKey, false},
		{ErrBadRequest, false},
		{errors.New("other"), false},
	}
	for _, tt := range tests {
		if got := Retryable(tt.err); got != tt.want {
			t.Errorf("Retryable(%v) got %v; want %v", tt.err, got, tt.want)
		}
	}
}

// TestSlotWaiters: with MaxInFlight 2 and 64 callers on one connection,
// most wait for a slot at any moment; every request is answered, never
// more than 2 are in flight, and none is left counted at the end.
func TestSlotWaiters(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 1)
	c, err := Dial(testCtx(t), mcs[0].Addr, ConnConfig{MaxInFlight: 2, IOTimeout: 5 * time.Second, MaxValueSize: 1024})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := testCtx(t)
	stop := make(chan struct{})
	over := make(chan int, 1)
	go func() { // watch the count
		for {
			select {
			case <-stop:
				return
			default:
			}
			if n := c.InFlight(); n > 2 {
				select {
				case over <- n:
				default:
				}
			}
			runtime.Gosched()
		}
	}()
	var g errgroup.Group
	for i := range 64 {
		g.Go(func() error {
			for j := range 300 {
				if _, err := c.MetaGet(ctx, fmt.Sprintf("k%d-%d", i, j), "v"); err != nil {
					return err
				}
			}
			return nil
		})
	}
	err = g.Wait()
	close(stop)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case n := <-over:
		t.Fatalf("%d requests in flight; MaxInFlight is 2", n)
	default:
	}
	if n := c.InFlight(); n != 0 {
		t.Fatalf("InFlight is %d after every request was answered; want 0", n)
	}
}

// TestOn: the On requests go to the server named, wherever their key
// would go; a server out of range is ErrBadRequest.
func TestOn(t *testing.T) {
	mcs := testenv.NewMemcacheds(t, 2)
	pool := newTestPool(t, addrsOf(mcs), nil)
	ctx := testCtx(t)
	const key = "on:k"
	other := 1 - pool.Pick(key)
	if resp, err := pool.MetaSetOn(ctx, other, key, []byte("v"), SetOptions{}); err != nil || resp.Status != StatusHD {
		t.Fatalf("ms on server %d: %+v, %v", other, resp, err)
	}
	if resp, err := pool.MetaGet(ctx, key, "v"); err != nil || resp.Status != StatusEN {
		t.Fatalf("mg at the key's own server: %+v, %v; want EN (the item is on the other)", resp, err)
	}
	if resp, err := pool.MetaGetOn(ctx, other, key, "v"); err != nil || string(resp.Value) != "v" {
		t.Fatalf("mg on server %d: %+v, %v; want v", other, resp, err)
	}
	if resp, err := pool.MetaDeleteOn(ctx, other, key, DeleteOptions{}); err != nil || resp.Status != StatusHD {
		t.Fatalf("md on server %d: %+v, %v", other, resp, err)
	}
	if resp, err := pool.MetaGetOn(ctx, other, key, "v"); err != nil || resp.Status != StatusEN {
		t.Fatalf("mg on server %d after md: %+v, %v; want EN", other, resp, err)
	}
	for _, i := range []int{-1, 2} {
		if _, err := pool.MetaGetOn(ctx, i, key, "v"); !errors.Is(err, ErrBadRequest) {
			t.Errorf("mg on server %d: %v; want ErrBadRequest", i, err)
		}
	}
}
