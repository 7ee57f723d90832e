package wal

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pgcache/pgcache/row"
)

// changeSummary is a change as "OP table old-cat new-cat".
func changeSummary(evs []event) []string {
	var out []string
	col := func(cols []row.Column, name string) string {
		for _, c := range cols {
			if c.Name == name {
				return c.Value.Text
			}
		}
		return "-"
	}
	for _, e := range evs {
		if e.Op == "Change" {
			out = append(out, e.Change.Op.String()+" "+e.Change.Table+" "+col(e.Change.Old, "id")+"/"+col(e.Change.Old, "cat")+" "+col(e.Change.New, "id")+"/"+col(e.Change.New, "cat"))
		}
	}
	return out
}

// testPartitions: a rule on a partitioned table covers every partition,
// those attached later included, and a cross-partition UPDATE brings the
// old and the new row; Setup works again on the existing publication (a
// restart, a takeover); a published table that nothing covers is counted
// per table. On today's code before this change the changes came under
// the partitions' names and a second Setup failed.
func (pg *pgEnv) testPartitions(t *testing.T) {
	pg.exec(t, `CREATE TABLE part_posts (id int, cat int, title text, PRIMARY KEY (id, cat)) PARTITION BY LIST (cat)`)
	pg.exec(t, `CREATE TABLE part_posts_1 PARTITION OF part_posts FOR VALUES IN (1)`)
	pg.exec(t, `CREATE TABLE part_posts_2 PARTITION OF part_posts FOR VALUES IN (2)`)
	pg.exec(t, `ALTER TABLE part_posts_1 REPLICA IDENTITY FULL`)
	pg.exec(t, `ALTER TABLE part_posts_2 REPLICA IDENTITY FULL`)
	pg.exec(t, `CREATE TABLE part_other (id int PRIMARY KEY)`)
	cfg := pg.testConfig("part", "public.part_posts")

	infos, err := Inspect(context.Background(), cfg.DSN, cfg.Tables)
	if err != nil {
		t.Fatal(err)
	}
	if !infos[0].Partitioned || len(infos[0].Partitions) != 2 {
		t.Fatalf("got %+v; want a partitioned table with 2 partitions", infos[0])
	}
	if ok, fix := CheckIdentity(infos[0], []string{"title"}); !ok {
		t.Fatalf("CheckIdentity with FULL partitions: got not ok (%s); want ok", fix)
	}

	s := newStream(t, cfg, true)
	// A restart (or another process taking over) sets up again on the
	// existing publication.
	newStream(t, cfg, true)
	// A published table that no rule covers.
	pg.exec(t, `ALTER PUBLICATION part ADD TABLE part_other`)
	var c collector
	c.autoAck.Store(true)
	start(t, s, &c)

	pg.exec(t, `INSERT INTO part_posts VALUES (1, 1, 'a'), (2, 2, 'b')`)
	pg.exec(t, `UPDATE part_posts SET cat = 2 WHERE id = 1`) // moves the row to part_posts_2
	// A partition created after the stream started.
	pg.exec(t, `CREATE TABLE part_posts_3 PARTITION OF part_posts FOR VALUES IN (3)`)
	pg.exec(t, `INSERT INTO part_posts VALUES (3, 3, 'c')`)
	// A partition attached after the stream started.
	pg.exec(t, `CREATE TABLE part_posts_4 (id int NOT NULL, cat int NOT NULL, title text, PRIMARY KEY (id, cat))`)
	pg.exec(t, `ALTER TABLE part_posts ATTACH PARTITION part_posts_4 FOR VALUES IN (4)`)
	pg.exec(t, `INSERT INTO part_posts VALUES (4, 4, 'd')`)
	pg.exec(t, `INSERT INTO part_other VALUES (1), (2)`)
	pg.exec(t, `INSERT INTO part_posts VALUES (5, 1, 'e')`) // after part_other's, to know it was read

	want := []string{
		"INSERT public.part_posts -/- 1/1",
		"INSERT public.part_posts -/- 2/2",
		"DELETE public.part_posts 1/1 -/-", // the cross-partition UPDATE: the old row ...
		"INSERT public.part_posts -/- 1/2", // ... and the new
		"INSERT public.part_posts -/- 3/3",
		"INSERT public.part_posts -/- 4/4",
		"INSERT public.part_posts -/- 5/1",
	}
	waitFor(t, "the partitioned table's changes", func() bool { return len(changeSummary(c.events())) >= len(want) })
	if got := changeSummary(c.events()); !slices.Equal(got, want) {
		t.Fatalf("got changes\n  %s\nwant\n  %s", strings.Join(got, "\n  "), strings.Join(want, "\n  "))
	}
	waitFor(t, "the uncovered table's changes to be counted", func() bool { return s.Stats().Uncovered["public.part_other"] == 2 })

	// A partition without a usable replica identity is named by the check.
	pg.exec(t, `CREATE TABLE part_posts_5 PARTITION OF part_posts FOR VALUES IN (5)`)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	infos, err = Inspect(ctx, cfg.DSN, cfg.Tables)
	if err != nil {
		t.Fatal(err)
	}
	ok, fix := CheckIdentity(infos[0], []string{"title"})
	if ok || !strings.Contains(fix, "part_posts_5") || strings.Contains(fix, "part_posts_1") {
		t.Fatalf("CheckIdentity with a DEFAULT partition: got ok %t, fix %q; want not ok, a fix for part_posts_5 only", ok, fix)
	}
}
