package counterstore

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgcache/pgcache/batcher"
	"github.com/pgcache/pgcache/testenv"
)

func pgEnv(t testing.TB) (*testenv.Env, context.Context) {
	t.Helper()
	env := testenv.New(t, testenv.Options{DCs: 1, NoNATS: true, NoReplicas: true, MemcachedPerDC: -1})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	t.Cleanup(cancel)
	return env, ctx
}

func newPG(t testing.TB, ctx context.Context, dsn, prefix string) *Store {
	t.Helper()
	pg, err := New(Config{DSN: dsn, MessagePrefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pg.Close)
	if err := pg.EnsureSchema(ctx); err != nil {
		t.Fatal(err)
	}
	return pg
}

func stored(t testing.TB, ctx context.Context, env *testenv.Env, counter, group string) int64 {
	t.Helper()
	var n int64
	if err := env.Primary.QueryRowArgs(ctx, `SELECT coalesce((SELECT n FROM pgcache_counters WHERE counter = $1 AND grp = $2), 0)`,
		[]any{counter, group}, &n); err != nil {
		t.Fatal(err)
	}
	return n
}

func TestPG(t *testing.T) {
	env, ctx := pgEnv(t)
	dsn := env.Primary.DSN("")
	pg := newPG(t, ctx, dsn, "invalidate")
	// Twice is fine.
	if err := pg.EnsureSchema(ctx); err != nil {
		t.Fatal(err)
	}

	t.Run("flush, replayed flush, moved checkpoint", func(t *testing.T) {
		cps, err := pg.Load(ctx, []string{"t1"})
		if err != nil {
			t.Fatal(err)
		}
		if cps["t1"] != (batcher.Pos{}) {
			t.Fatalf("fresh checkpoint: got %v; want zero", cps["t1"])
		}
		b := &batcher.Batch{
			Groups:      []batcher.Group{{Counter: "c1", Group: `["1"]`, Key: "c1:1", N: 5}, {Counter: "c1", Group: `["2"]`, Key: "c1:2", N: -1}},
			Checkpoints: []batcher.Checkpoint{{Source: "t1", Prev: batcher.Pos{}, Pos: batcher.Pos{Major: 10, Minor: 2}}},
		}
		if err := pg.Flush(ctx, b); err != nil {
			t.Fatal(err)
		}
		// The same batch again (its COMMIT reply lost): not applied twice.
		if err := pg.Flush(ctx, b); err != nil {
			t.Fatalf("replayed batch: got %v; want nil", err)
		}
		if got := stored(t, ctx, env, "c1", `["1"]`); got != 5 {
			t.Errorf("c1 [1]: got %d; want 5", got)
		}
		if got := stored(t, ctx, env, "c1", `["2"]`); got != -1 {
			t.Errorf("c1 [2]: got %d; want -1", got)
		}
		// A batch from a writer that missed the last flush.
		stale := &batcher.Batch{Groups: b.Groups, Checkpoints: []batcher.Checkpoint{{Source: "t1", Prev: batcher.Pos{}, Pos: batcher.Pos{Major: 12, Minor: 0}}}}
		if err := pg.Flush(ctx, stale); !errors.Is(err, batcher.ErrCheckpointMoved) {
			t.Errorf("stale batch: got %v; want %v", err, batcher.ErrCheckpointMoved)
		}
		cps, err = pg.Load(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		if got, want := cps["t1"], (batcher.Pos{Major: 10, Minor: 2}); got != want {
			t.Errorf("checkpoint: got %v; want %v", got, want)
		}
	})

	t.Run("reset, set and the emitted keys", func(t *testing.T) {
		conn, err := pgx.Connect(ctx, dsn)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, `SELECT pg_create_logical_replication_slot('batcher_test', 'test_decoding')`); err != nil {
			t.Fatal(err)
		}
		b := &batcher.Batch{
			Resets:      []string{"c1"},
			Groups:      []batcher.Group{{Counter: "c1", Group: `["3"]`, Key: "c1:3", N: 7, Set: true}, {Counter: "c2", Group: `["1"]`, Key: "c2:1", N: 2}},
			Checkpoints: []batcher.Checkpoint{{Source: "t1", Prev: batcher.Pos{Major: 10, Minor: 2}, Pos: batcher.Pos{Major: 20, Minor: 0}}},
		}
		if err := pg.Flush(ctx, b); err != nil {
			t.Fatal(err)
		}
		for g, want := range map[string]int64{`["1"]`: 0, `["2"]`: 0, `["3"]`: 7} {
			if got := stored(t, ctx, env, "c1", g); got != want {
				t.Errorf("c1 %s: got %d; want %d", g, got, want)
			}
		}
		var msgs []string
		rows, err := conn.Query(ctx, `SELECT data FROM pg_logical_slot_get_changes('batcher_test', NULL, NULL) WHERE data LIKE 'message:%'`)
		if err != nil {
			t.Fatal(err)
		}
		for rows.Next() {
			var s string
			if err := rows.Scan(&s); err != nil {
				t.Fatal(err)
			}
			msgs = append(msgs, s)
		}
		if len(msgs) != 1 {
			t.Fatalf("emitted messages: got %q; want 1", msgs)
		}
		content := msgs[0][strings.Index(msgs[0], "content:")+len("content:"):]
		got := strings.Fields(content)
		sort.Strings(got)
		if want := []string{"c1:1", "c1:2", "c1:3", "c2:1"}; fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("emitted keys: got %v; want %v (the reset groups' keys, and the changed ones)", got, want)
		}
		if !strings.Contains(msgs[0], "prefix: invalidate") || !strings.Contains(msgs[0], "transactional: 1") {
			t.Errorf("message: got %q; want a transactional message with prefix invalidate", msgs[0])
		}
		if _, err := conn.Exec(ctx, `SELECT pg_drop_replication_slot('batcher_test')`); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("concurrent input with a primary restart stays exact", func(t *testing.T) {
		pg := newPG(t, ctx, dsn, "")
		b, err := batcher.New(batcher.Config{MaxPending: 200, Interval: 5 * time.Millisecond, RetryMin: 10 * time.Millisecond, RetryMax: 200 * time.Millisecond}, pg, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Load(ctx, "s0", "s1", "s2", "s3"); err != nil {
			t.Fatal(err)
		}
		rctx, cancel := context.WithCancel(ctx)
		defer cancel()
		done := make(chan error, 1)
		go func() { done <- b.Run(rctx) }()
		const sources, each = 4, 20000
		want := make([]map[int]int64, sources)
		var restarted atomic.Bool
		var wg sync.WaitGroup
		for s := 0; s < sources; s++ {
			want[s] = map[int]int64{}
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(uint64(s), 3))
				// Input goes on until the restart is over.
				for i := 1; i <= each || !restarted.Load(); i++ {
					g := rng.IntN(300)
					n := int64(rng.IntN(5) - 2)
					want[s][g] += n
					d := batcher.Delta{Counter: "conc", Group: fmt.Sprintf(`["%d"]`, g), Key: fmt.Sprintf("conc:%d", g), N: n}
					if _, err := b.Add(ctx, batcher.Input{Source: fmt.Sprintf("s%d", s), Pos: batcher.Pos{Major: uint64(i), Minor: 0}, Deltas: []batcher.Delta{d}}); err != nil {
						t.Error(err)
						return
					}
				}
			}()
		}
		time.Sleep(200 * time.Millisecond)
		if err := env.Primary.Stop(); err != nil {
			t.Fatal(err)
		}
		if err := env.Primary.Start(ctx); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
		restarted.Store(true)
		wg.Wait()
		if err := b.Drain(ctx); err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		total := map[int]int64{}
		for s := range want {
			for g, n := range want[s] {
				total[g] += n
			}
		}
		for g, n := range total {
			if got := stored(t, ctx, env, "conc", fmt.Sprintf(`["%d"]`, g)); got != n {
				t.Errorf("group %d: got %d; want %d", g, got, n)
			}
		}
		st := b.Stats()
		t.Logf("%d deltas in %d flushes, %d flush errors (the restart)", st.Deltas, st.Flushes, st.FlushErrors)
		if st.FlushErrors == 0 {
			t.Error("no flush failed: the restart did not happen while flushing")
		}
	})
}
