package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"go.uber.org/zap"

	"github.com/pgcache/pgcache/bus"
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
	np, err := checkStreams(ctx, cfg, w)
	if err != nil {
		return err
	}
	problems = append(problems, np...)
	if len(problems) > 0 {
		return fmt.Errorf("%w:\n  %s", ErrCheck, strings.Join(problems, "\n  "))
	}
	fmt.Fprintln(w, "ok: every rule can be served")
	return nil
}

// checkStreams prints the invalidation streams as JetStream has them
// (cluster, replicas, sources) beside what the config asks, and returns
// the differences that break the layout's promise. Without nats.url (an
// embedded server) there is nothing to look at.
func checkStreams(ctx context.Context, cfg *config.Config, w io.Writer) ([]string, error) {
	n := cfg.NATS
	if n.URL == "" {
		return nil, nil
	}
	conn, err := bus.Connect(bus.ConnConfig{URL: n.URL, Name: "invalidator-check-" + cfg.DC,
		Creds: n.Creds, NKey: n.NKey, CA: n.TLS.CA, Cert: n.TLS.Cert, Key: n.TLS.Key}, zap.NewNop())
	if err != nil {
		return nil, fmt.Errorf("check streams: %w", err)
	}
	defer conn.Close()
	l := layoutOf(cfg)
	streams := []bus.StreamConfig{l.Stream(cfg.DC)}
	if l.Geo() {
		streams = nil
		for _, dc := range l.DCs {
			streams = append(streams, l.Stream(dc))
		}
		fmt.Fprintf(w, "nats: one stream per datacenter %v; a batch is confirmed once %d datacenters hold it\n", l.DCs, n.DurableDCs)
	}
	var problems []string
	for _, sc := range streams {
		report, p, err := bus.InspectStream(ctx, conn.JetStream(), sc)
		if err != nil {
			problems = append(problems, err.Error())
			continue
		}
		fmt.Fprint(w, report)
		problems = append(problems, p...)
	}
	return problems, nil
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
