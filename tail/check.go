package tail

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/pgcache/pgcache/counters"
	"github.com/pgcache/pgcache/keys"
	"github.com/pgcache/pgcache/wal"
)

// Tables are the tables the slot streams: the rules' and the counters'
// source tables, sorted.
func Tables(rules *keys.Set, ctrs *counters.Set) []string {
	tables := rules.Tables()
	for _, t := range ctrs.Tables() {
		if !slices.Contains(tables, t) {
			tables = append(tables, t)
		}
	}
	slices.Sort(tables)
	return tables
}

// Check inspects the live database for what the rules and counters need:
// every table and column exists, and the replica identity sends the old
// value of every key and group column. It returns the problems that would
// make the daemon refuse to start (empty when none) and a report for
// operators, per table, with the statement to run for each problem.
func Check(ctx context.Context, dsn string, rules *keys.Set, ctrs *counters.Set) (problems []string, report string, err error) {
	results, report, err := check(ctx, dsn, rules, ctrs)
	for _, r := range results {
		if r.problem != "" {
			problems = append(problems, r.problem)
		}
	}
	return problems, report, err
}

// tableCheck is one table's result: problem is empty when it is served.
type tableCheck struct {
	table, problem string
}

func check(ctx context.Context, dsn string, rules *keys.Set, ctrs *counters.Set) (results []tableCheck, report string, err error) {
	infos, err := wal.Inspect(ctx, dsn, Tables(rules, ctrs))
	if err != nil {
		return nil, "", fmt.Errorf("inspect tables: %w", err)
	}
	var b strings.Builder
	for _, t := range infos {
		results = append(results, tableCheck{table: t.Name, problem: checkTable(&b, t, rules, ctrs)})
	}
	return results, b.String(), nil
}

// checkTable writes t's report to b and returns its problem, or "".
func checkTable(b *strings.Builder, t wal.TableInfo, rules *keys.Set, ctrs *counters.Set) string {
	need := NeedOld(t.Name, rules, ctrs)
	if cols := rules.Columns(t.Name); len(cols) > 0 {
		fmt.Fprintf(b, "%s: keys use columns %s\n", t.Name, strings.Join(cols, ", "))
	}
	if cols := ctrs.Columns(t.Name); len(cols) > 0 {
		fmt.Fprintf(b, "%s: counters group by columns %s\n", t.Name, strings.Join(cols, ", "))
	}
	if !t.Exists {
		fmt.Fprintf(b, "  MISSING: table does not exist\n")
		return fmt.Sprintf("%s: table does not exist", t.Name)
	}
	if t.Partitioned {
		names := make([]string, len(t.Partitions))
		for i, p := range t.Partitions {
			names[i] = p.Name
		}
		fmt.Fprintf(b, "  partitioned: changes of its %d partition(s) (%s) are published under %s (publish_via_partition_root), "+
			"and so are those of partitions created or attached later; each partition's replica identity is checked\n",
			len(names), strings.Join(names, ", "), t.Name)
	}
	var missing []string
	for _, c := range need {
		if !slices.Contains(t.Columns, c) {
			missing = append(missing, c)
		}
	}
	if len(missing) > 0 {
		fmt.Fprintf(b, "  MISSING: column %s\n", strings.Join(missing, ", "))
		return fmt.Sprintf("%s: no column %s", t.Name, strings.Join(missing, ", "))
	}
	// UPDATE and DELETE render old values: the replica identity must
	// send every column a key or a counter's group uses.
	if ok, fix := wal.CheckIdentity(t, need); !ok {
		fmt.Fprintf(b, "  REPLICA IDENTITY does not supply old values of every key and group column; run:\n    %s\n", fix)
		return fmt.Sprintf("%s: replica identity does not send old values of %s; run: %s", t.Name, strings.Join(need, ", "), fix)
	}
	fmt.Fprintf(b, "  ok: replica identity supplies old values\n")
	return ""
}

// NeedOld are the columns whose old values a table's UPDATEs and DELETEs
// must carry: every column its keys use, and every column its counters
// group by (a DELETE, and an UPDATE that moves a row to another group).
func NeedOld(table string, rules *keys.Set, ctrs *counters.Set) []string {
	need := slices.Clone(rules.Columns(table))
	for _, c := range ctrs.Columns(table) {
		if !slices.Contains(need, c) {
			need = append(need, c)
		}
	}
	return need
}

// CheckFailover reports what a primary failover would do to the slot, and
// what is missing for it to survive one: on PostgreSQL 17 and later a
// failover slot synchronized to the standbys; before 17 nothing can keep
// it, and on_slot_loss decides. The report holds warnings, not problems:
// the daemon runs either way.
func CheckFailover(ctx context.Context, dsn, slot, onSlotLoss string) (string, error) {
	f, err := wal.CheckFailover(ctx, dsn, slot)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	if f.Version < 170000 {
		fmt.Fprintf(&b, "failover: PostgreSQL %d.%d has no failover slots: after a promotion the slot is lost", f.Version/10000, f.Version%10000/100)
		if onSlotLoss == SlotLossFlush {
			fmt.Fprintf(&b, "; on_slot_loss: flush flushes every datacenter's pool once and streams from a new slot\n")
		} else {
			fmt.Fprintf(&b, "; on_slot_loss: exit stops the tail with status 3 (set on_slot_loss: flush to recover by itself)\n")
		}
		return b.String(), nil
	}
	if f.SlotFailover {
		fmt.Fprintf(&b, "failover: slot %s is a failover slot\n", slot)
	} else {
		fmt.Fprintf(&b, "failover: MISSING: slot %s is not a failover slot (the tail makes it one when it next sets up; or on a replication connection: ALTER_REPLICATION_SLOT %s (FAILOVER true))\n", slot, slot)
	}
	if f.SynchronizedStandbySlots == "" {
		fix := "'<the physical slots of the standbys you may promote>'"
		if len(f.Standbys) > 0 {
			fix = "'" + strings.Join(f.Standbys, ",") + "'"
		}
		fmt.Fprintf(&b, "failover: MISSING: synchronized_standby_slots is empty on the primary, so a promoted standby's slot may be behind what was published; run: ALTER SYSTEM SET synchronized_standby_slots = %s; SELECT pg_reload_conf();\n", fix)
	} else {
		fmt.Fprintf(&b, "failover: synchronized_standby_slots = %s\n", f.SynchronizedStandbySlots)
	}
	fmt.Fprintf(&b, "failover: on each standby you may promote: sync_replication_slots = on, hot_standby_feedback = on, primary_slot_name set, dbname in primary_conninfo; "+
		"list every server in postgres.dsn with target_session_attrs=read-write\n")
	return b.String(), nil
}
