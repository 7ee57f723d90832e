package testenv_test

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgcache/pgcache/testenv"
)

// slotState is a logical slot's row in pg_replication_slots.
type slotState struct {
	exists, synced, temporary, failover bool
	confirmed                           string
}

func readSlot(ctx context.Context, pg *testenv.Postgres, slot string) (slotState, error) {
	var s slotState
	err := pg.QueryRowArgs(ctx, `SELECT count(*) > 0, coalesce(bool_or(synced), false), coalesce(bool_or(temporary), false),
			coalesce(bool_or(failover), false), coalesce(max(confirmed_flush_lsn)::text, '')
		FROM pg_replication_slots WHERE slot_name = $1`, []any{slot}, &s.exists, &s.synced, &s.temporary, &s.failover, &s.confirmed)
	return s, err
}

// TestPG17FailoverSlot proves that testenv's PostgreSQL 17 keeps a logical
// slot made with failover = true across a kill -9 of the primary: the slot
// is consumed on the primary, synchronized to the standbys, and after the
// promotion the new primary streams from it with START_REPLICATION, from
// the consumed position on: the change made after it and the change made on
// the new primary arrive, the consumed ones do not. The other replica, repointed,
// synchronizes the slot from the new primary.
func TestPG17FailoverSlot(t *testing.T) {
	env := testenv.New(t, testenv.Options{PGVersion: 17, NoNATS: true, MemcachedPerDC: -1})
	ctx := ctxT(t, 3*time.Minute)
	p := env.Primary
	var sss string
	if err := p.QueryRow(ctx, "SHOW synchronized_standby_slots", &sss); err != nil {
		t.Fatal(err)
	}
	if want := env.DC("dc1").Replica.Slot + "," + env.DC("dc2").Replica.Slot; sss != want {
		t.Errorf("primary: got synchronized_standby_slots %q; want %q", sss, want)
	}
	if err := p.Exec(ctx, "CREATE TABLE t (id int primary key, v text); CREATE PUBLICATION pub FOR TABLE t"); err != nil {
		t.Fatal(err)
	}
	// slot name, plugin, temporary, two-phase, failover
	if err := p.Exec(ctx, "SELECT pg_create_logical_replication_slot('inv', 'pgoutput', false, false, true)"); err != nil {
		t.Fatal(err)
	}
	if err := p.Exec(ctx, "INSERT INTO t SELECT i, 'consumed' FROM generate_series(1, 3) i"); err != nil {
		t.Fatal(err)
	}
	// Consume the three inserts on the primary, then advance the slot
	// twice past a running-transactions record, so that its catalog_xmin
	// moves past what a standby could reserve when it first saw the slot
	// (consuming without changes does not move it).
	consume := `SELECT count(*) FROM pg_logical_slot_get_binary_changes('inv', NULL, NULL,
		'proto_version', '1', 'publication_names', 'pub')`
	var changes int
	if err := p.QueryRow(ctx, consume, &changes); err != nil {
		t.Fatal(err)
	}
	if changes < 5 { // begin, relation, 3 inserts, commit
		t.Fatalf("got %d changes from the slot; want the 3 inserts and more", changes)
	}
	for i := 0; i < 2; i++ {
		var snap string
		if err := p.QueryRow(ctx, "SELECT pg_log_standby_snapshot()::text", &snap); err != nil {
			t.Fatal(err)
		}
		// Decoding reads flushed WAL only, and nothing flushes that record
		// but the WAL writer.
		for flushed := false; !flushed; {
			if err := p.QueryRowArgs(ctx, "SELECT pg_current_wal_flush_lsn() >= $1::pg_lsn", []any{snap}, &flushed); err != nil {
				t.Fatal(err)
			}
		}
		if err := p.Exec(ctx, "SELECT pg_replication_slot_advance('inv', pg_current_wal_flush_lsn())"); err != nil {
			t.Fatal(err)
		}
	}
	consumed, err := readSlot(ctx, p, "inv")
	if err != nil {
		t.Fatal(err)
	}
	if !consumed.failover || consumed.synced {
		t.Fatalf("primary slot: got %+v; want failover, not synced", consumed)
	}
	start := time.Now()
	wctx, cancel := context.WithTimeout(ctx, 40*time.Second)
	err = env.WaitSlotSynced(wctx, "inv")
	cancel()
	if err != nil {
		b, _ := os.ReadFile(env.DC("dc1").Replica.LogPath())
		var slots string
		_ = p.QueryRow(ctx, `SELECT string_agg(format('%s %s %s %s', slot_name, restart_lsn, confirmed_flush_lsn, catalog_xmin), '; ')
			FROM pg_replication_slots`, &slots)
		t.Fatalf("%v\nprimary's slots: %s\ndc1 replica log:\n%s", err, slots, b)
	}
	t.Logf("slot synced on both standbys after %s", time.Since(start).Round(time.Millisecond))
	for _, dc := range env.DCs {
		s, err := readSlot(ctx, dc.Replica, "inv")
		if err != nil {
			t.Fatal(err)
		}
		if !s.synced || s.temporary || !s.failover || s.confirmed != consumed.confirmed {
			t.Fatalf("%s: got slot %+v; want synced, persistent, failover, at %s", dc.Replica.Name, s, consumed.confirmed)
		}
	}
	// A change past the consumed position, replayed on both standbys, then
	// the primary dies.
	if err := p.Exec(ctx, "INSERT INTO t VALUES (4, 'unconsumed')"); err != nil {
		t.Fatal(err)
	}
	lsn, err := p.CurrentLSN(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, dc := range env.DCs {
		if err := dc.Replica.WaitReplayed(ctx, lsn); err != nil {
			t.Fatal(err)
		}
	}
	f, err := env.Failover(ctx, testenv.FailoverOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(f.Repointed) != 1 {
		t.Fatalf("got %d replicas repointed; want 1", len(f.Repointed))
	}
	other := f.Repointed[0]
	t.Logf("promoted %s in %s", f.NewPrimary.Name, f.Promoted.Round(time.Millisecond))
	np := f.NewPrimary
	s, err := readSlot(ctx, np, "inv")
	if err != nil {
		t.Fatal(err)
	}
	var atLeast bool
	if err := np.QueryRowArgs(ctx, "SELECT $1::pg_lsn >= $2::pg_lsn", []any{s.confirmed, consumed.confirmed}, &atLeast); err != nil {
		t.Fatalf("new primary: slot inv: %+v: %v", s, err)
	}
	if !s.exists || !atLeast {
		t.Fatalf("new primary: got slot %+v; want it confirmed at or past %s", s, consumed.confirmed)
	}
	// synchronized_standby_slots on the new primary names the other's slot.
	if err := np.QueryRow(ctx, "SHOW synchronized_standby_slots", &sss); err != nil {
		t.Fatal(err)
	}
	if want := other.Slot; sss != want {
		t.Errorf("new primary: got synchronized_standby_slots %q; want %q", sss, want)
	}
	if err := np.Exec(ctx, "INSERT INTO t VALUES (5, 'after')"); err != nil {
		t.Fatal(err)
	}

	// TIMELINE_HISTORY on a replication connection says what
	// Failover read from pg_wal.
	rc, err := pgconn.Connect(ctx, np.DSN("")+"&replication=database")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close(context.Background())
	th, err := pglogrepl.TimelineHistory(ctx, rc, int32(f.Timeline))
	if err != nil {
		t.Fatal(err)
	}
	hist, err := testenv.ParseTimelineHistory(string(th.Content))
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(hist) != fmt.Sprint(f.History) {
		t.Errorf("TIMELINE_HISTORY: got %+v; want Failover's %+v", hist, f.History)
	}

	ids, end, err := streamInserts(ctx, rc, "inv", 5)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(ids) != "[4 5]" {
		t.Errorf("streamed inserts from the failover slot: got ids %v; want [4 5]", ids)
	}

	// Confirm what was streamed: the other replica, which follows the new
	// primary, synchronizes the slot to that position.
	if err := pglogrepl.SendStandbyStatusUpdate(ctx, rc, pglogrepl.StandbyStatusUpdate{WALWritePosition: end}); err != nil {
		t.Fatal(err)
	}
	for {
		var ok bool
		if err := np.QueryRowArgs(ctx, "SELECT confirmed_flush_lsn >= $1::pg_lsn FROM pg_replication_slots WHERE slot_name = 'inv'",
			[]any{end.String()}, &ok); err != nil {
			t.Fatal(err)
		}
		if ok {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("new primary: slot never confirmed %s", end)
		case <-time.After(20 * time.Millisecond):
		}
	}
	start = time.Now()
	if err := env.WaitSlotSynced(ctx, "inv"); err != nil {
		t.Fatal(err)
	}
	s, err = readSlot(ctx, other, "inv")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: slot synced from the new primary at %s after %s", other.Name, s.confirmed, time.Since(start).Round(time.Millisecond))
	if s.confirmed != end.String() {
		t.Errorf("%s: got synced slot at %s; want %s", other.Name, s.confirmed, end)
	}
}

// streamInserts runs START_REPLICATION on slot with pgoutput and returns the
// ids (first column) of the inserts it receives until it has seen lastID,
// and the end of that insert's transaction.
func streamInserts(ctx context.Context, conn *pgconn.PgConn, slot string, lastID int) ([]int, pglogrepl.LSN, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	err := pglogrepl.StartReplication(ctx, conn, slot, 0, pglogrepl.StartReplicationOptions{
		PluginArgs: []string{"proto_version '1'", "publication_names 'pub'"}})
	if err != nil {
		return nil, 0, fmt.Errorf("START_REPLICATION: %w", err)
	}
	var ids []int
	for {
		msg, err := conn.ReceiveMessage(ctx)
		if err != nil {
			return ids, 0, fmt.Errorf("receive (ids so far %v): %w", ids, err)
		}
		cd, ok := msg.(*pgproto3.CopyData)
		if !ok || len(cd.Data) == 0 {
			if e, ok := msg.(*pgproto3.ErrorResponse); ok {
				return ids, 0, fmt.Errorf("stream: %s", e.Message)
			}
			continue
		}
		switch cd.Data[0] {
		case pglogrepl.PrimaryKeepaliveMessageByteID:
			ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(cd.Data[1:])
			if err != nil {
				return ids, 0, err
			}
			if ka.ReplyRequested {
				// Report nothing as flushed: the slot stays where it is.
				_ = pglogrepl.SendStandbyStatusUpdate(ctx, conn, pglogrepl.StandbyStatusUpdate{WALWritePosition: 1})
			}
		case pglogrepl.XLogDataByteID:
			xld, err := pglogrepl.ParseXLogData(cd.Data[1:])
			if err != nil {
				return ids, 0, err
			}
			m, err := pglogrepl.Parse(xld.WALData)
			if err != nil {
				return ids, 0, err
			}
			switch m := m.(type) {
			case *pglogrepl.InsertMessage:
				if len(m.Tuple.Columns) == 0 {
					continue
				}
				var id int
				if _, err := fmt.Sscan(string(m.Tuple.Columns[0].Data), &id); err != nil {
					return ids, 0, fmt.Errorf("insert id %q: %w", m.Tuple.Columns[0].Data, err)
				}
				ids = append(ids, id)
			case *pglogrepl.CommitMessage:
				if len(ids) > 0 && ids[len(ids)-1] == lastID {
					return ids, m.TransactionEndLSN, nil
				}
			}
		}
	}
}

// TestPG17StandbySlotsWait shows what synchronized_standby_slots costs: with
// one listed standby cut off, a failover slot's consumer receives nothing
// past what that standby confirmed; once the list leaves it out, the
// consumer goes on.
func TestPG17StandbySlotsWait(t *testing.T) {
	env := testenv.New(t, testenv.Options{PGVersion: 17, NoNATS: true, MemcachedPerDC: -1})
	ctx := ctxT(t, 2*time.Minute)
	p := env.Primary
	if err := p.Exec(ctx, "CREATE TABLE t (id int primary key); CREATE PUBLICATION pub FOR TABLE t"); err != nil {
		t.Fatal(err)
	}
	if err := p.Exec(ctx, "SELECT pg_create_logical_replication_slot('inv', 'pgoutput', false, false, true)"); err != nil {
		t.Fatal(err)
	}
	env.DC("dc2").ReplLink.Cut()
	if err := p.Exec(ctx, "INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	consume := `SELECT count(*) FROM pg_logical_slot_get_binary_changes('inv', NULL, NULL,
		'proto_version', '1', 'publication_names', 'pub')`
	var n int
	short, cancel := context.WithTimeout(ctx, 2*time.Second)
	err := p.QueryRow(short, consume, &n)
	cancel()
	if err == nil {
		t.Fatalf("got %d changes with dc2's standby cut off; want the consumer to wait", n)
	}
	if err := p.SetSynchronizedStandbySlots(ctx, env.DC("dc1").Replica.Slot); err != nil {
		t.Fatal(err)
	}
	if err := p.QueryRow(ctx, consume, &n); err != nil {
		t.Fatal(err)
	}
	if n < 3 { // begin, relation, insert, commit
		t.Errorf("got %d changes once dc2 left synchronized_standby_slots; want the insert's", n)
	}
	if err := p.SetSynchronizedStandbySlots(ctx, "bad name"); err == nil {
		t.Errorf("got no error for slot name %q; want one", "bad name")
	}
}
