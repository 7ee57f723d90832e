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
	infos, err := wal.Inspect(ctx, dsn, Tables(rules, ctrs))
	if err != nil {
		return nil, "", fmt.Errorf("inspect tables: %w", err)
	}
	var b strings.Builder
	for _, t := range infos {
		need := rules.Columns(t.Name)
		if len(need) > 0 {
			fmt.Fprintf(&b, "%s: keys use columns %s\n", t.Name, strings.Join(need, ", "))
		}
		// Counters need the old group values of a DELETE, and of an
		// UPDATE that moves a row to another group.
		if cols := ctrs.Columns(t.Name); len(cols) > 0 {
			fmt.Fprintf(&b, "%s: counters group by columns %s\n", t.Name, strings.Join(cols, ", "))
			for _, c := range cols {
				if !slices.Contains(need, c) {
					need = append(need, c)
				}
			}
		}
		if !t.Exists {
			problems = append(problems, fmt.Sprintf("%s: table does not exist", t.Name))
			fmt.Fprintf(&b, "  MISSING: table does not exist\n")
			continue
		}
		var missing []string
		for _, c := range need {
			if !slices.Contains(t.Columns, c) {
				missing = append(missing, c)
			}
		}
		if len(missing) > 0 {
			problems = append(problems, fmt.Sprintf("%s: no column %s", t.Name, strings.Join(missing, ", ")))
			fmt.Fprintf(&b, "  MISSING: column %s\n", strings.Join(missing, ", "))
			continue
		}
		// UPDATE and DELETE render old values: the replica identity must
		// send every column a key or a counter's group uses.
		ok, fix := wal.CheckIdentity(t, need)
		if !ok {
			problems = append(problems, fmt.Sprintf("%s: replica identity does not send old values of %s; run: %s", t.Name, strings.Join(need, ", "), fix))
			fmt.Fprintf(&b, "  REPLICA IDENTITY does not supply old values of every key and group column; run:\n    %s\n", fix)
			continue
		}
		fmt.Fprintf(&b, "  ok: replica identity supplies old values\n")
	}
	return problems, b.String(), nil
}
