package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/pgcache/pgcache/config"
	"github.com/pgcache/pgcache/counterstore"
)

// The repair subcommand: `invalidator repair -config F -counter NAME`.
// Counters themselves run in the tail role (package tail), stored by
// package counterstore, which documents the tables and how a repair is
// exact while writes go on.

// runRepair is `invalidator repair -config F -counter NAME [-group V]...`.
func runRepair(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("invalidator repair", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "invalidator.yaml", "config file")
	name := fs.String("counter", "", "the counter to recompute")
	wait := fs.Duration("wait", 2*time.Minute, "how long to wait for the running invalidator to apply the repair (0: do not wait)")
	var groups groupFlags
	fs.Var(&groups, "group", "a group to recompute: its group_by values, comma-separated, or a JSON array of strings; repeatable. None: every group")
	if err := fs.Parse(args); err != nil {
		return exitConfig
	}
	cfg, _, err := config.Load(*path)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitConfig
	}
	c := cfg.CounterSet.Counter(*name)
	if c == nil {
		fmt.Fprintf(stderr, "%v: no counter %q in %s\n", ErrConfig, *name, *path)
		return exitConfig
	}
	if c.Table == "" {
		fmt.Fprintf(stderr, "%v: counter %q has no source table: there is nothing to recount from\n", ErrConfig, *name)
		return exitConfig
	}
	for _, g := range groups {
		if len(g) != len(c.GroupBy) {
			fmt.Fprintf(stderr, "%v: group %q has %d values; counter %q groups by %v\n", ErrConfig, g, len(g), c.Name, c.GroupBy)
			return exitConfig
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	store, err := counterstore.New(counterstore.Config{DSN: cfg.Postgres.DSN, Table: cfg.Batcher.Table,
		CheckpointTable: cfg.Batcher.CheckpointTable, MessagePrefix: cfg.Messages.Prefix})
	if err != nil {
		fmt.Fprintln(stderr, err)
		return exitConfig
	}
	defer store.Close()
	if err := store.Repair(ctx, c, groups, *wait, stdout); err != nil {
		fmt.Fprintln(stderr, err)
		return exitError
	}
	return exitOK
}

type groupFlags [][]string

func (g *groupFlags) String() string { return fmt.Sprint(*g) }

func (g *groupFlags) Set(v string) error {
	if strings.HasPrefix(strings.TrimSpace(v), "[") {
		var vals []string
		if err := json.Unmarshal([]byte(v), &vals); err != nil {
			return fmt.Errorf("group %q: %w", v, err)
		}
		*g = append(*g, vals)
		return nil
	}
	*g = append(*g, strings.Split(v, ","))
	return nil
}
