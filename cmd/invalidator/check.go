package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/pgcache/pgcache/keys"
	"github.com/pgcache/pgcache/wal"
)

// ErrCheck reports that the live database does not satisfy the rules.
var ErrCheck = errors.New("invalidator: config does not match the database")

// Check validates the rules against the live database and prints, per
// table, what the rules need and the statement to run when the replica
// identity does not supply it. It returns ErrCheck (wrapped with every
// problem) when the daemon would refuse to start.
func Check(ctx context.Context, cfg *Config, rules *keys.Set, w io.Writer) error {
	problems, report, err := inspect(ctx, cfg, rules)
	if err != nil {
		return err
	}
	fmt.Fprint(w, report)
	if len(problems) > 0 {
		return fmt.Errorf("%w:\n  %s", ErrCheck, strings.Join(problems, "\n  "))
	}
	fmt.Fprintln(w, "ok: every rule can be served")
	return nil
}

// Verify is Check without the report, for the daemon's start.
func Verify(ctx context.Context, cfg *Config, rules *keys.Set) error {
	problems, _, err := inspect(ctx, cfg, rules)
	if err != nil {
		return err
	}
	if len(problems) > 0 {
		return fmt.Errorf("%w: %w (run `invalidator check` for the fix)", ErrConfig, fmt.Errorf("%w:\n  %s", ErrCheck, strings.Join(problems, "\n  ")))
	}
	return nil
}

func inspect(ctx context.Context, cfg *Config, rules *keys.Set) (problems []string, report string, err error) {
	if cfg.Postgres.DSN == "" {
		return nil, "", fmt.Errorf("%w: postgres.dsn is empty", ErrConfig)
	}
	tables := tailTables(cfg, rules)
	infos, err := wal.Inspect(ctx, cfg.Postgres.DSN, tables)
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
		if cols := cfg.counters.Columns(t.Name); len(cols) > 0 {
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

// tailTables are the tables the slot streams: the rules' and the
// counters' source tables.
func tailTables(cfg *Config, rules *keys.Set) []string {
	tables := rules.Tables()
	for _, t := range cfg.counters.Tables() {
		if !slices.Contains(tables, t) {
			tables = append(tables, t)
		}
	}
	slices.Sort(tables)
	return tables
}
