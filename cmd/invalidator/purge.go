package main

import (
	"context"
	"errors"
	"fmt"

	"golang.org/x/sync/errgroup"

	"github.com/pgcache/pgcache/bus"
	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/purge"
)

// runPurge runs this DC's purge role. On soft stop it stops reading the
// stream and finishes what it has; on hard stop unfinished batches stay
// unacked and come again.
func (d *daemon) runPurge(soft, hard context.Context, g *errgroup.Group, conn *bus.Conn) error {
	pc := d.cfg.Purge
	rc := purge.RoleConfig{Purger: purge.DefaultConfig(), Pool: mcpool.DefaultConfig(), Stream: d.layout().Stream(d.cfg.DC).Name,
		Gate: purge.GateConfig{DSN: pc.ReplicaDSN, MaxWait: pc.GateMaxWait}}
	rc.Pool.Servers, rc.Pool.Hash, rc.Pool.Timeout = pc.Servers, pc.Hash, pc.Timeout
	rc.Purger.DC, rc.Purger.Mode, rc.Purger.StaleTTL, rc.Purger.Timeout = d.cfg.DC, pc.Mode, pc.StaleTTL, pc.Timeout
	if pc.RecordAfter > 0 {
		rc.Purger.RecordAfter = pc.RecordAfter
	}
	if pc.MaxBacklogBytes > 0 {
		rc.Purger.MaxBacklogBytes = pc.MaxBacklogBytes
	}
	if pc.MaxBytes > 0 {
		rc.Purger.MaxBytes = pc.MaxBytes
	}
	rc.AckWait, rc.BacklogReplicas = pc.AckWait, d.cfg.NATS.Replicas
	role, err := purge.NewRole(rc, conn.JetStream(), d.reg, d.log.Named("purge"))
	if errors.Is(err, purge.ErrConfig) {
		return fmt.Errorf("%w: %w", ErrConfig, err)
	}
	if err != nil {
		return err
	}
	g.Go(func() error { return role.Run(hard) })
	g.Go(func() error {
		<-soft.Done()
		return role.Drain(hard)
	})
	return nil
}
