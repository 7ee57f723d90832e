package testenv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// This file makes replicas without pg_basebackup, which the npm build of
// PostgreSQL 17 lacks: the primary's data directory is copied between
// pg_backup_start and pg_backup_stop (a non-exclusive backup, whose session
// must stay open throughout), the backup_label that pg_backup_stop returns
// is written into the copy, and the copy starts as a standby that streams
// from its own physical slot, created before the backup so that the
// primary keeps every WAL segment the standby will ask for. It also keeps
// the primary's synchronized_standby_slots listing every standby's slot
// (PostgreSQL 17), so that a logical slot created with failover = true
// never gets ahead of what the standbys have received.

// copySkip are the paths (relative to the data directory) whose contents a
// base backup leaves out, as pg_basebackup does; the directories are kept.
var copySkip = map[string]bool{
	"pg_wal": true, "pg_replslot": true, "pg_dynshmem": true, "pg_notify": true, "pg_serial": true,
	"pg_snapshots": true, "pg_stat_tmp": true, "pg_subtrans": true,
}

// copySkipFile are files a base backup leaves out.
var copySkipFile = map[string]bool{
	"postmaster.pid": true, "postmaster.opts": true, "backup_label": true, "tablespace_map": true,
	"standby.signal": true, "recovery.signal": true, "backup_label.old": true,
}

func startReplicaCopy(ctx context.Context, name, dir string, primary *Postgres, via string) (*Postgres, error) {
	pg, err := newPostgres(name, dir, true, primary.Major)
	if err != nil {
		return nil, err
	}
	if err := pg.copyFrom(ctx, primary); err != nil {
		return nil, fmt.Errorf("replica %s: %w", name, err)
	}
	if err := pg.writeStandby(via); err != nil {
		return nil, fmt.Errorf("replica %s: %w", name, err)
	}
	if err := pg.writeConf(); err != nil {
		return nil, err
	}
	if err := primary.syncStandbySlots(ctx); err != nil {
		return nil, err
	}
	if err := pg.Start(ctx); err != nil {
		return nil, err
	}
	return pg, nil
}

// copyFrom takes a base backup of primary into pg.DataDir by copying files.
func (pg *Postgres) copyFrom(ctx context.Context, primary *Postgres) error {
	conn, err := pgx.Connect(ctx, primary.DSN(""))
	if err != nil {
		return fmt.Errorf("connect %s: %w", primary.Name, err)
	}
	defer conn.Close(context.Background())
	// The slot first, reserving WAL now: the backup's checkpoint comes later.
	if _, err := conn.Exec(ctx, `SELECT pg_create_physical_replication_slot($1, true)
		WHERE NOT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = $1)`, pg.Slot); err != nil {
		return fmt.Errorf("create slot %s: %w", pg.Slot, err)
	}
	if _, err := conn.Exec(ctx, "SELECT pg_backup_start($1, true)", pg.Name); err != nil {
		return fmt.Errorf("pg_backup_start: %w", err)
	}
	copyErr := copyDataDir(primary.DataDir, pg.DataDir, pg.cred)
	var label, spcmap string
	// pg_backup_stop ends the backup even when the copy failed.
	if err := conn.QueryRow(ctx, "SELECT labelfile, coalesce(spcmapfile, '') FROM pg_backup_stop(false)").Scan(&label, &spcmap); err != nil {
		return fmt.Errorf("pg_backup_stop: %w", err)
	}
	if copyErr != nil {
		return fmt.Errorf("copy %s: %w", primary.DataDir, copyErr)
	}
	if err := pg.writeFile("backup_label", label); err != nil {
		return err
	}
	if spcmap != "" {
		return pg.writeFile("tablespace_map", spcmap)
	}
	return nil
}

// writeStandby makes the copy a standby that streams through via from its
// slot. dbname lets a PostgreSQL 17 standby synchronize failover slots.
func (pg *Postgres) writeStandby(via string) error {
	if err := pg.writeFile("standby.signal", ""); err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(pg.DataDir, "postgresql.auto.conf"), os.O_APPEND|os.O_WRONLY|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("standby conf: %w", err)
	}
	defer f.Close()
	_, err = fmt.Fprintf(f, "primary_conninfo = '%s'\nprimary_slot_name = '%s'\n", pg.conninfo(via), pg.Slot)
	if err != nil {
		return fmt.Errorf("standby conf: %w", err)
	}
	return os.Chown(f.Name(), int(pg.cred.Uid), int(pg.cred.Gid))
}

// conninfo is the primary_conninfo that reaches a primary through via.
func (pg *Postgres) conninfo(via string) string {
	host, port, _ := strings.Cut(via, ":")
	return fmt.Sprintf("host=%s port=%s user=postgres dbname=postgres application_name=%s", host, port, pg.Name)
}

// writeFile writes a file of the data directory, owned by postgres.
func (pg *Postgres) writeFile(name, content string) error {
	p := filepath.Join(pg.DataDir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if err := os.Chown(p, int(pg.cred.Uid), int(pg.cred.Gid)); err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	return nil
}

// syncStandbySlots sets synchronized_standby_slots on a PostgreSQL 17
// primary to every physical slot it has (one per standby); older versions
// have no such setting.
func (pg *Postgres) syncStandbySlots(ctx context.Context) error {
	if pg.Major < 17 {
		return nil
	}
	var slots string
	if err := pg.QueryRow(ctx, `SELECT coalesce(string_agg(slot_name, ',' ORDER BY slot_name), '')
		FROM pg_replication_slots WHERE slot_type = 'physical'`, &slots); err != nil {
		return fmt.Errorf("%s: list physical slots: %w", pg.Name, err)
	}
	var list []string
	if slots != "" {
		list = strings.Split(slots, ",")
	}
	return pg.SetSynchronizedStandbySlots(ctx, list...)
}

// SetSynchronizedStandbySlots sets synchronized_standby_slots on a
// PostgreSQL 17 primary (none resets it) and waits until new sessions see
// it. testenv lists every standby's slot; while a listed standby is down or
// its link cut, every consumer of a failover slot waits ("Logical
// replication is waiting on the standby associated with replication slot"),
// so a test that cuts a DC under a failover slot may list fewer.
func (pg *Postgres) SetSynchronizedStandbySlots(ctx context.Context, slots ...string) error {
	pg.confMu.Lock()
	defer pg.confMu.Unlock()
	want := strings.Join(slots, ",")
	for _, s := range slots {
		if s == "" || strings.Trim(s, "abcdefghijklmnopqrstuvwxyz0123456789_") != "" {
			return fmt.Errorf("testenv: slot name %q: want [a-z0-9_]+", s)
		}
	}
	// ALTER SYSTEM takes no parameters; the names are checked above.
	q := "ALTER SYSTEM SET synchronized_standby_slots = '" + want + "'"
	if want == "" {
		q = "ALTER SYSTEM RESET synchronized_standby_slots"
	}
	if err := pg.Exec(ctx, q); err != nil {
		return fmt.Errorf("%s: %s: %w", pg.Name, q, err)
	}
	if err := pg.Exec(ctx, "SELECT pg_reload_conf()"); err != nil {
		return fmt.Errorf("%s: reload: %w", pg.Name, err)
	}
	// The reload is asynchronous: wait until new sessions see the list.
	for {
		var got string
		err := pg.QueryRow(ctx, "SHOW synchronized_standby_slots", &got)
		if err == nil && got == want {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: synchronized_standby_slots is %q; want %q: %w (last error: %v)", pg.Name, got, want, ctx.Err(), err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// copyDataDir copies a running server's data directory as a base backup
// would: files that vanish during the copy are skipped (the backup's WAL
// replay recreates what matters), and so are sockets and everything under
// the directories of copySkip but timeline history files in pg_wal.
func copyDataDir(src, dst string, cred *syscall.Credential) error {
	uid, gid := int(cred.Uid), int(cred.Gid)
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		if rel == "." {
			return nil
		}
		target := filepath.Join(dst, rel)
		top, under, _ := strings.Cut(rel, string(filepath.Separator))
		if copySkip[top] && under != "" {
			// Keep the directory, copy nothing under it but timeline
			// history files (the server remakes pg_wal's subdirectories).
			if d.IsDir() || top != "pg_wal" || strings.Contains(under, string(filepath.Separator)) ||
				!strings.HasSuffix(under, ".history") || !d.Type().IsRegular() {
				if d.IsDir() {
					return filepath.SkipDir
				}
				return nil
			}
		}
		if d.IsDir() {
			info, err := d.Info()
			if err != nil {
				return nil // vanished
			}
			if err := os.MkdirAll(target, info.Mode().Perm()); err != nil {
				return err
			}
			return os.Chown(target, uid, gid)
		}
		if !d.Type().IsRegular() || copySkipFile[rel] || strings.HasPrefix(d.Name(), "pgsql_tmp") ||
			d.Name() == "pg_internal.init" {
			return nil
		}
		if err := copyFile(path, target); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		return os.Chown(target, uid, gid)
	})
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// WaitSlotSynced waits until every running replica whose link is not cut
// holds slot as a synchronized, persistent failover slot (PostgreSQL 17)
// confirmed at least as far as the primary's. A standby refuses to keep a
// slot whose catalog_xmin is older than it can guarantee, so the primary's
// slot must be consumed past a running-transactions record made after the
// standby started; WaitSlotSynced logs one (pg_log_standby_snapshot) every
// half second for the slot's consumer to pass, and wakes the standbys'
// slot sync workers.
func (e *Env) WaitSlotSynced(ctx context.Context, slot string) error {
	for _, dc := range e.DCs {
		r := dc.Replica
		if r == nil || !r.Replica || !r.Running() || (dc.ReplLink != nil && dc.ReplLink.IsCut()) {
			continue
		}
		for nudge := time.Now(); ; {
			var ok bool
			err := r.QueryRowArgs(ctx, `SELECT coalesce(bool_or(synced AND NOT temporary AND failover
					AND confirmed_flush_lsn >= $2::pg_lsn), false)
				FROM pg_replication_slots WHERE slot_name = $1`, []any{slot, e.primarySlotLSN(ctx, slot)}, &ok)
			if err == nil && ok {
				break
			}
			if time.Since(nudge) > 500*time.Millisecond {
				_ = e.Primary.Exec(ctx, "SELECT pg_log_standby_snapshot()")
				// A reload wakes the standby's slot sync worker, whose
				// naptime doubles up to 30 s while nothing changes.
				_ = r.Exec(ctx, "SELECT pg_reload_conf()")
				nudge = time.Now()
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("testenv: slot %s not synced on %s: %w (last error: %v)", slot, r.Name, ctx.Err(), err)
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	return nil
}

// primarySlotLSN is the primary's confirmed_flush_lsn of slot, or 0/0.
func (e *Env) primarySlotLSN(ctx context.Context, slot string) string {
	lsn := "0/0"
	_ = e.Primary.QueryRowArgs(ctx, `SELECT coalesce(confirmed_flush_lsn::text, '0/0') FROM pg_replication_slots WHERE slot_name = $1`,
		[]any{slot}, &lsn)
	return lsn
}
