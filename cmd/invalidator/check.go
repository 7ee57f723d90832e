package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/pgcache/pgcache/config"
	"github.com/pgcache/pgcache/keys"
	"github.com/pgcache/pgcache/tail"
)

// ErrCheck reports that the live database does not satisfy the rules.
var ErrCheck = errors.New("invalidator: config does not match the database")

// Check validates the rules against the live database and prints, per
// table, what the rules need and the statement to run when the replica
// identity does not supply it. It returns ErrCheck (wrapped with every
// problem) when the daemon would refuse to start.
func Check(ctx context.Context, cfg *config.Config, rules *keys.Set, w io.Writer) error {
	problems, report, err := inspect(ctx, cfg, rules)
	if err != nil {
		return err
	}
	fmt.Fprint(w, report)
	if cfg.Tail {
		fo, err := tail.CheckFailover(ctx, cfg.Postgres.DSN, cfg.Postgres.Slot, cfg.OnSlotLoss)
		if err != nil {
			return err
		}
		fmt.Fprint(w, fo)
	}
	if len(problems) > 0 {
		return fmt.Errorf("%w:\n  %s", ErrCheck, strings.Join(problems, "\n  "))
	}
	fmt.Fprintln(w, "ok: every rule can be served")
	return nil
}

// Verify is Check without the report, for the daemon's start.
func Verify(ctx context.Context, cfg *config.Config, rules *keys.Set) error {
	problems, _, err := inspect(ctx, cfg, rules)
	if err != nil {
		return err
	}
	if len(problems) > 0 {
		return fmt.Errorf("%w: %w (run `invalidator check` for the fix)", ErrConfig, fmt.Errorf("%w:\n  %s", ErrCheck, strings.Join(problems, "\n  ")))
	}
	return nil
}

func inspect(ctx context.Context, cfg *config.Config, rules *keys.Set) (problems []string, report string, err error) {
	if cfg.Postgres.DSN == "" {
		return nil, "", fmt.Errorf("%w: postgres.dsn is empty", ErrConfig)
	}
	return tail.Check(ctx, cfg.Postgres.DSN, rules, cfg.CounterSet)
}
