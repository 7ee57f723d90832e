package testenv_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgcache/pgcache/testenv"
)

// pgVersions are the PostgreSQL versions the failover tests run on: the
// system's 15 and scripts/setup.sh's 17.
var pgVersions = []int{15, 17}

// TestFailover kills the primary with kill -9 while the replicas' links are
// cut, promotes a replica and checks that the environment follows: the
// write made before the cut is on the new primary and the one made during
// it is not (the switch LSN lies between them), the new timeline and its
// history are reported, a multi-host DSN finds the new primary, the other
// replica streams from the new primary and replays a write made after the
// promotion, and its DC's link still cuts its replication.
func TestFailover(t *testing.T) {
	for _, v := range pgVersions {
		t.Run(fmt.Sprintf("pg%d", v), func(t *testing.T) {
			env := testenv.New(t, testenv.Options{PGVersion: v, NoNATS: true, MemcachedPerDC: -1})
			ctx := ctxT(t, 3*time.Minute)
			old := env.Primary
			if got := old.Major; got != v {
				t.Fatalf("got PostgreSQL %d; want %d", got, v)
			}
			var version string
			if err := old.QueryRow(ctx, "SHOW server_version_num", &version); err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(version, fmt.Sprint(v)) {
				t.Fatalf("got server_version_num %s; want %d*", version, v)
			}
			if err := old.Exec(ctx, "CREATE TABLE t (id int primary key, v text); INSERT INTO t VALUES (1, 'before')"); err != nil {
				t.Fatal(err)
			}
			before, err := old.CurrentLSN(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, dc := range env.DCs {
				if err := dc.Replica.WaitReplayed(ctx, before); err != nil {
					t.Fatal(err)
				}
			}
			// A commit no replica receives: the old timeline's last word.
			for _, dc := range env.DCs {
				dc.ReplLink.Cut()
			}
			if err := old.Exec(ctx, "INSERT INTO t VALUES (2, 'lost')"); err != nil {
				t.Fatal(err)
			}
			lost, err := old.CurrentLSN(ctx)
			if err != nil {
				t.Fatal(err)
			}
			// A client that lists every host finds whichever accepts writes.
			multi := testenv.MultiHostDSN("", old, env.DC("dc1").Replica, env.DC("dc2").Replica)

			f, err := env.Failover(ctx, testenv.FailoverOptions{})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("pg%d: promoted %s in %s; timeline %d, history %+v", v, f.NewPrimary.Name, f.Promoted.Round(time.Millisecond), f.Timeline, f.History)
			var other *testenv.DC
			for _, dc := range env.DCs {
				if dc.Replica != f.NewPrimary {
					other = dc
				}
			}
			if other == nil || env.Primary != f.NewPrimary || f.OldPrimary != old {
				t.Fatalf("got Env.Primary %s, new primary %s; want a DC's replica promoted", env.Primary.Name, f.NewPrimary.Name)
			}
			if old.Running() {
				t.Errorf("old primary still running after failover")
			}
			if f.NewPrimary.Replica {
				t.Errorf("promoted server still marked Replica")
			}
			if f.Timeline != 2 {
				t.Errorf("got timeline %d; want 2", f.Timeline)
			}
			if len(f.History) != 1 || f.History[0].Parent != 1 {
				t.Fatalf("got history %+v; want one switch from timeline 1", f.History)
			}
			var between bool
			if err := f.NewPrimary.QueryRowArgs(ctx, "SELECT $1::pg_lsn >= $2::pg_lsn AND $1::pg_lsn < $3::pg_lsn",
				[]any{f.SwitchLSN, before, lost}, &between); err != nil {
				t.Fatal(err)
			}
			if !between {
				t.Errorf("got switch LSN %s; want at or past %s (received) and before %s (lost)", f.SwitchLSN, before, lost)
			}
			if len(f.Repointed) != 1 || f.Repointed[0] != other.Replica {
				t.Fatalf("got repointed %v; want %s", f.Repointed, other.Replica.Name)
			}
			// The repointed replica's new link is cut as its old one was.
			if !other.ReplLink.IsCut() {
				t.Errorf("%s: new replication link is not cut", other.Name)
			}
			for _, dc := range env.DCs {
				dc.ReplLink.Heal()
			}
			if err := other.Replica.WaitTimeline(ctx, f.Timeline); err != nil {
				t.Fatal(err)
			}

			// The write from before the failover survived it; the lost one did not.
			var rows string
			if err := f.NewPrimary.QueryRow(ctx, "SELECT string_agg(v, ',' ORDER BY id) FROM t", &rows); err != nil {
				t.Fatal(err)
			}
			if rows != "before" {
				t.Errorf("new primary: got rows %q; want %q", rows, "before")
			}
			// The multi-host DSN lands on the new primary.
			conn, err := pgx.Connect(ctx, multi)
			if err != nil {
				t.Fatalf("multi-host connect: %v", err)
			}
			var port int
			if err := conn.QueryRow(ctx, "SELECT inet_server_port()").Scan(&port); err != nil {
				t.Fatal(err)
			}
			conn.Close(ctx)
			if port != f.NewPrimary.Port {
				t.Errorf("multi-host DSN reached port %d; want the new primary's %d", port, f.NewPrimary.Port)
			}

			// A write after the promotion reaches the other replica, which
			// streams timeline 2 from the new primary.
			if err := f.NewPrimary.Exec(ctx, "INSERT INTO t VALUES (3, 'after')"); err != nil {
				t.Fatal(err)
			}
			after, err := f.NewPrimary.CurrentLSN(ctx)
			if err != nil {
				t.Fatal(err)
			}
			r2 := other.Replica
			if err := r2.WaitReplayed(ctx, after); err != nil {
				t.Fatal(err)
			}
			if err := r2.QueryRow(ctx, "SELECT string_agg(v, ',' ORDER BY id) FROM t", &rows); err != nil {
				t.Fatal(err)
			}
			if rows != "before,after" {
				t.Errorf("%s: got rows %q; want %q", r2.Name, rows, "before,after")
			}
			tli, err := r2.Timeline(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if tli != 2 {
				t.Errorf("%s: got timeline %d; want 2", r2.Name, tli)
			}
			var sender string
			if err := f.NewPrimary.QueryRowArgs(ctx, "SELECT state FROM pg_stat_replication WHERE application_name = $1",
				[]any{r2.Name}, &sender); err != nil {
				t.Fatalf("new primary has no walsender for %s: %v", r2.Name, err)
			}
			if sender != "streaming" {
				t.Errorf("walsender to %s: got state %q; want streaming", r2.Name, sender)
			}

			// The DC's new link carries its replication: cutting it stops replay.
			if err := env.Cut(other.Name); err != nil {
				t.Fatal(err)
			}
			if err := f.NewPrimary.Exec(ctx, "INSERT INTO t VALUES (4, 'cut')"); err != nil {
				t.Fatal(err)
			}
			cut, err := f.NewPrimary.CurrentLSN(ctx)
			if err != nil {
				t.Fatal(err)
			}
			short, cancel := context.WithTimeout(ctx, 2*time.Second)
			err = r2.WaitReplayed(short, cut)
			cancel()
			if err == nil {
				t.Errorf("%s replayed %s through a cut link", r2.Name, cut)
			}
			if err := env.Heal(other.Name); err != nil {
				t.Fatal(err)
			}
			if err := r2.WaitReplayed(ctx, cut); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestParseTimelineHistory(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     []testenv.TimelineSwitch
		wantErr  bool
	}{
		{name: "empty", in: ""},
		{name: "one", in: "1\t0/3000148\tno recovery target specified\n",
			want: []testenv.TimelineSwitch{{Parent: 1, SwitchLSN: "0/3000148", Reason: "no recovery target specified"}}},
		{name: "two with comment", in: "# comment\n1\t0/3000148\tx\n\n2\t1/A0\ty\n",
			want: []testenv.TimelineSwitch{{Parent: 1, SwitchLSN: "0/3000148", Reason: "x"}, {Parent: 2, SwitchLSN: "1/A0", Reason: "y"}}},
		{name: "no reason", in: "3\t0/10", want: []testenv.TimelineSwitch{{Parent: 3, SwitchLSN: "0/10"}}},
		{name: "bad parent", in: "x\t0/10\tr", wantErr: true},
		{name: "bad lsn", in: "1\t0-10\tr", wantErr: true},
		{name: "one field", in: "1", wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := testenv.ParseTimelineHistory(tc.in)
			if (err != nil) != tc.wantErr {
				t.Fatalf("got error %v; want error %v", err, tc.wantErr)
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("got %+v; want %+v", got, tc.want)
			}
		})
	}
}

// TestFailoverUnderLoad kills the primary in the middle of a stream of
// commits: the promoted replica holds a gapless prefix of them (async
// replication may lose the last few, never one in the middle), the other
// replica follows it and replays the writes made after the promotion.
func TestFailoverUnderLoad(t *testing.T) {
	for _, v := range pgVersions {
		t.Run(fmt.Sprintf("pg%d", v), func(t *testing.T) {
			estart := time.Now()
			env := testenv.New(t, testenv.Options{PGVersion: v, NoNATS: true, MemcachedPerDC: -1})
			t.Logf("pg%d: environment started in %s", v, time.Since(estart).Round(time.Millisecond))
			ctx := ctxT(t, 3*time.Minute)
			if err := env.Primary.Exec(ctx, "CREATE TABLE t (id int primary key)"); err != nil {
				t.Fatal(err)
			}
			conn, err := pgx.Connect(ctx, env.Primary.DSN(""))
			if err != nil {
				t.Fatal(err)
			}
			acked := make(chan int, 1) // the last id whose commit returned, sent when the writer stops
			started := make(chan struct{})
			go func() {
				last := 0
				defer func() { acked <- last }()
				for id := 1; ; id++ {
					if _, err := conn.Exec(ctx, "INSERT INTO t VALUES ($1)", id); err != nil {
						return
					}
					last = id
					if id == 300 {
						close(started)
					}
				}
			}()
			select {
			case <-started:
			case <-ctx.Done():
				t.Fatal("writer did not reach 300 commits")
			}
			// Both replicas have the first 300 while the writer goes on.
			lsn, err := env.Primary.CurrentLSN(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, dc := range env.DCs {
				if err := dc.Replica.WaitReplayed(ctx, lsn); err != nil {
					t.Fatal(err)
				}
			}
			fstart := time.Now()
			f, err := env.Failover(ctx, testenv.FailoverOptions{})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("pg%d: Failover took %s (promotion %s)", v, time.Since(fstart).Round(time.Millisecond), f.Promoted.Round(time.Millisecond))
			last := <-acked
			var n, maxID int
			if err := f.NewPrimary.QueryRow(ctx, "SELECT count(*), coalesce(max(id), 0) FROM t", &n, &maxID); err != nil {
				t.Fatal(err)
			}
			t.Logf("pg%d: %d commits acknowledged before the kill; %s promoted with %d (lost %d), switch at %s",
				v, last, f.NewPrimary.Name, maxID, last-maxID, f.SwitchLSN)
			if n != maxID || maxID < 300 || maxID > last+1 {
				t.Fatalf("new primary: got %d rows up to id %d; want a gapless prefix of at least 300 of the %d (+1 in flight) committed", n, maxID, last)
			}
			if err := f.NewPrimary.Exec(ctx, "INSERT INTO t SELECT g FROM generate_series($1::int, $1::int + 99) g", maxID+1); err != nil {
				t.Fatal(err)
			}
			lsn, err = f.NewPrimary.CurrentLSN(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range f.Repointed {
				if err := r.WaitReplayed(ctx, lsn); err != nil {
					t.Fatal(err)
				}
				var rn int
				if err := r.QueryRow(ctx, "SELECT count(*) FROM t", &rn); err != nil {
					t.Fatal(err)
				}
				if rn != maxID+100 {
					t.Errorf("%s: got %d rows; want %d", r.Name, rn, maxID+100)
				}
			}
		})
	}
}

// TestFailoverRebuildsReplicaAhead promotes a replica that is behind
// another: the one ahead holds WAL of the old timeline past the switch, so
// Failover makes it again from the new primary, and it then follows it.
func TestFailoverRebuildsReplicaAhead(t *testing.T) {
	for _, v := range pgVersions {
		t.Run(fmt.Sprintf("pg%d", v), func(t *testing.T) {
			env := testenv.New(t, testenv.Options{PGVersion: v, NoNATS: true, MemcachedPerDC: -1})
			ctx := ctxT(t, 3*time.Minute)
			old := env.Primary
			r1, r2 := env.DC("dc1").Replica, env.DC("dc2").Replica
			if err := old.Exec(ctx, "CREATE TABLE t (id int primary key, v text); INSERT INTO t VALUES (1, 'before')"); err != nil {
				t.Fatal(err)
			}
			lsn, err := old.CurrentLSN(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := r1.WaitReplayed(ctx, lsn); err != nil {
				t.Fatal(err)
			}
			env.DC("dc1").ReplLink.Cut()
			if err := old.Exec(ctx, "INSERT INTO t VALUES (2, 'dc2 only')"); err != nil {
				t.Fatal(err)
			}
			if lsn, err = old.CurrentLSN(ctx); err != nil {
				t.Fatal(err)
			}
			if err := r2.WaitReplayed(ctx, lsn); err != nil {
				t.Fatal(err)
			}
			f, err := env.Failover(ctx, testenv.FailoverOptions{Target: r1})
			if err != nil {
				t.Fatal(err)
			}
			if len(f.Rebuilt) != 1 || f.Rebuilt[0] != r2 || len(f.Repointed) != 1 || f.Repointed[0] != r2 {
				t.Fatalf("got rebuilt %v, repointed %v; want dc2's replica in both", f.Rebuilt, f.Repointed)
			}
			if err := f.NewPrimary.Exec(ctx, "INSERT INTO t VALUES (3, 'after')"); err != nil {
				t.Fatal(err)
			}
			if lsn, err = f.NewPrimary.CurrentLSN(ctx); err != nil {
				t.Fatal(err)
			}
			if err := r2.WaitReplayed(ctx, lsn); err != nil {
				t.Fatal(err)
			}
			var rows string
			if err := r2.QueryRow(ctx, "SELECT string_agg(v, ',' ORDER BY id) FROM t", &rows); err != nil {
				t.Fatal(err)
			}
			if rows != "before,after" {
				t.Errorf("rebuilt %s: got rows %q; want %q", r2.Name, rows, "before,after")
			}
			if tli, err := r2.Timeline(ctx); err != nil || tli != f.Timeline {
				t.Errorf("rebuilt %s: got timeline %d (%v); want %d", r2.Name, tli, err, f.Timeline)
			}
		})
	}
}
