package tail

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/keys"
	"github.com/pgcache/pgcache/testenv"
	"github.com/pgcache/pgcache/wal"
)

// TestRoleRepurge: after a promotion, every key published past the old
// timeline's end is published again (the stream is the journal), and
// none from before it.
func TestRoleRepurge(t *testing.T) {
	env, js := newEnv(t)
	h := &harness{t: t, env: env, js: js, name: "repurge"}
	h.exec(`CREATE TABLE repurge_posts (id int PRIMARY KEY)`)
	cfg, rules := h.config([]keys.Rule{{Table: "public.repurge_posts", Keys: []string{"post:{id}"}}}, nil)
	h.start(cfg, rules)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i, lsn := range []uint64{1000, 2000, 3000} {
		b := &bus.Batch{Origin: "dc1", CommitLSN: lsn, CommitTime: time.Now(), Final: true, Keys: []string{fmt.Sprintf("old:%d", i), "shared"}}
		data, err := b.Encode()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.Publish(ctx, cfg.Publisher.Stream.Subject, data); err != nil {
			t.Fatal(err)
		}
	}
	n, err := h.role.repurge(ctx, 1500, 2)
	if err != nil {
		t.Fatal(err)
	}
	if n != 3 { // old:1, old:2, shared
		t.Fatalf("repurged %d keys; want 3", n)
	}
	st, _ := js.Stream(ctx, cfg.Publisher.Stream.Name)
	info, _ := st.Info(ctx)
	m, err := st.GetMsg(ctx, info.State.LastSeq)
	if err != nil {
		t.Fatal(err)
	}
	b, err := bus.Decode(m.Data)
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(b.Keys, " ")
	if !strings.Contains(got, "old:1") || !strings.Contains(got, "old:2") || !strings.Contains(got, "shared") || strings.Contains(got, "old:0") ||
		b.CommitLSN <= 1500 || b.Timeline != 2 {
		t.Fatalf("repurge batch: keys %q, commit %d, timeline %d; want old:1, old:2, shared past 1500 on timeline 2", got, b.CommitLSN, b.Timeline)
	}
	if h.metric("invalidator_timeline_repurged_keys_total") != 3 {
		t.Errorf("got invalidator_timeline_repurged_keys_total %v; want 3", h.metric("invalidator_timeline_repurged_keys_total"))
	}
}

// TestRoleFailover kills the primary under a running tail, promotes a
// replica and repoints the other (testenv.Failover), on PostgreSQL 15 and
// 17. The tail's DSN lists every server with target_session_attrs=
// read-write. On 17 the failover slot survives: the tail resumes from it,
// sees the timeline switch, and every key before and after is published.
// On 15 the slot is gone: with on_slot_loss: flush the tail announces one
// flush and streams from a new slot.
func TestRoleFailover(t *testing.T) {
	for _, v := range []int{15, 17} {
		t.Run(fmt.Sprintf("PG%d", v), func(t *testing.T) { testFailover(t, v) })
	}
}

func testFailover(t *testing.T, version int) {
	env, js := newEnvWith(t, testenv.Options{PGVersion: version, MemcachedPerDC: -1})
	h := &harness{t: t, env: env, js: js, name: fmt.Sprintf("fo%d", version)}
	h.exec(`CREATE TABLE fo_posts (id int PRIMARY KEY)`)
	cfg, rules := h.config([]keys.Rule{{Table: "public.fo_posts", Keys: []string{"post:{id}"}}}, nil)
	cfg.WAL.DSN = testenv.MultiHostDSN("", env.Primary, env.DCs[0].Replica, env.DCs[1].Replica)
	cfg.WAL.ReconnectMin, cfg.WAL.ReconnectMax = 100*time.Millisecond, time.Second
	cfg.OnSlotLoss = SlotLossFlush
	h.start(cfg, rules)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	for i := 1; i <= 20; i++ {
		h.exec(`INSERT INTO fo_posts VALUES ($1)`, i)
	}
	h.waitKeys("post:1", "post:20")
	if version >= 17 {
		// The standbys' copy of the slot: wait until the one to be
		// promoted has it at the tail's position.
		sctx, scancel := context.WithTimeout(ctx, 2*time.Minute)
		err := env.WaitSlotSynced(sctx, h.name)
		scancel()
		if err != nil {
			t.Fatalf("the failover slot was not synchronized to the standbys: %v", err)
		}
	}
	fo, err := env.Failover(ctx, testenv.FailoverOptions{Target: env.DCs[0].Replica})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("promoted %s to timeline %d at %s in %s", fo.NewPrimary.Name, fo.Timeline, fo.SwitchLSN, fo.Promoted)
	if version < 17 {
		// Before 17 the slot is lost: what commits before the new slot
		// exists is never decoded (the announced flush covers it). Write
		// once the tail streams from the new slot.
		testenv.Eventually(t, time.Minute, "the slot recovered", func() bool {
			return h.metric("invalidator_slot_losses_total") == 1 && h.role.Stats().State == wal.StateStreaming
		})
	}
	for i := 21; i <= 40; i++ {
		if err := fo.NewPrimary.Exec(ctx, `INSERT INTO fo_posts VALUES ($1)`, i); err != nil {
			t.Fatal(err)
		}
	}
	h.waitKeys("post:21", "post:40")
	h.running()
	if version >= 17 {
		if n := h.metric("invalidator_slot_losses_total"); n != 0 {
			t.Errorf("PostgreSQL %d: got %v slot losses; want 0 (the failover slot survives)", version, n)
		}
		testenv.Eventually(t, time.Minute, "the stream on the new timeline", func() bool { return h.role.Stats().Timeline == fo.Timeline })
	} else {
		if n := h.metric("invalidator_slot_losses_total"); n != 1 {
			t.Errorf("PostgreSQL %d: got %v slot losses; want 1", version, n)
		}
		flushes := 0
		st, _ := js.Stream(ctx, strings.ToUpper(h.name))
		info, _ := st.Info(ctx)
		for seq := info.State.FirstSeq; seq <= info.State.LastSeq; seq++ {
			if m, err := st.GetMsg(ctx, seq); err == nil {
				if b, err := bus.Decode(m.Data); err == nil && b.Flush {
					flushes++
				}
			}
		}
		if flushes != 1 {
			t.Errorf("PostgreSQL %d: got %d flush announcements; want 1", version, flushes)
		}
	}
}
