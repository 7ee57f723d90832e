package counterstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"

	"github.com/pgcache/pgcache/counters"
)

// RepairSource is the checkpoint row of the WAL-derived deltas, which a
// repair waits on: the tail role's batcher source.
const RepairSource = "wal"

// Repair recomputes a counter (the given groups, or every group) from its
// source table and reconciles the stored counts, while writes go on.
//
// Why it is exact: the stored count of a group is the count at the
// batcher's checkpoint, plus deltas the batcher has not written yet. A
// count taken at some moment and written directly would be wrong by the
// deltas of transactions on either side of that moment. Instead, Repair
// takes the count at a known point of the WAL and lets the batcher apply
// it at that point:
//
//  1. In one transaction, LOCK TABLE <source> IN SHARE MODE. It waits
//     for every transaction that wrote the table to finish, and keeps new
//     writers out until this transaction ends. So every write to the table
//     that commits before this transaction's commit record is visible to
//     the count below, and every write after it commits later in the WAL.
//  2. Count the groups (a statement taken after the lock, READ COMMITTED,
//     sees every committed write).
//  3. Write the counts as a repair request (a row of RepairTable, which
//     only the invalidator's role may write), and commit. The INSERT's
//     place in the WAL is exactly the point where the counts hold.
//  4. The running invalidator meets the request in WAL order, after every
//     delta before it and before every delta after it, and sets the groups
//     to the counts there (with -group none: every other group to zero).
//     Later deltas add to the repaired values. A crash before that flush
//     replays the request from the WAL, like any delta.
//
// The lock blocks writers of the source table for the duration of the
// count only (an index lookup per group; a full scan without -group).
// Repair then waits until the invalidator's checkpoint passes the request
// and prints the stored values.
func (s *Store) Repair(ctx context.Context, c *counters.Counter, groups [][]string, wait time.Duration, w io.Writer) error {
	conn, err := pgx.Connect(ctx, s.cfg.DSN)
	if err != nil {
		return fmt.Errorf("repair: connect: %w", err)
	}
	defer conn.Close(context.Background())
	table, ckptTable := s.cfg.Table, s.cfg.CheckpointTable
	r, msgLSN, err := recount(ctx, conn, c, groups, "", "", s.cfg.RepairTable)
	if err != nil {
		return fmt.Errorf("repair: %w", err)
	}
	fmt.Fprintf(w, "counter %s: recounted %d group(s) at WAL position %s\n", c.Name, len(r.Groups), msgLSN)
	lsn, err := pglogrepl.ParseLSN(msgLSN)
	if err != nil {
		return fmt.Errorf("repair: %w", err)
	}
	if wait <= 0 {
		fmt.Fprintln(w, "not waiting: the running invalidator applies it when it reads that position")
		return nil
	}
	deadline := time.Now().Add(wait)
	for {
		var pos int64
		err := conn.QueryRow(ctx, `SELECT pos FROM `+ckptTable+` WHERE source = $1`, RepairSource).Scan(&pos)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("repair: read checkpoint: %w", err)
		}
		if uint64(pos) > uint64(lsn) {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("repair: the invalidator has not applied the repair within %s (is the tail role running?); it will when it reads WAL position %s", wait, msgLSN)
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, g := range r.Groups {
		var n int64
		err := conn.QueryRow(ctx, `SELECT n FROM `+table+` WHERE counter = $1 AND grp = $2`, c.Name, counters.Group(g.Group)).Scan(&n)
		if errors.Is(err, pgx.ErrNoRows) {
			n, err = 0, nil
		}
		if err != nil {
			return fmt.Errorf("repair: read %v: %w", g.Group, err)
		}
		fmt.Fprintf(w, "  %v: recounted %d; stored now %d (later writes included)\n", g.Group, g.N, n)
	}
	fmt.Fprintln(w, "applied")
	return nil
}

// recount counts groups of c's source table (every group when groups is
// empty) under a SHARE lock and writes the repair request in the same
// transaction; see Repair. It returns the repair and the WAL position after it. With initRow
// set, it first inserts that row into ckptTable, and does nothing (an
// empty msgLSN) if the row exists: the counter was initialized already.
func recount(ctx context.Context, conn *pgx.Conn, c *counters.Counter, groups [][]string, initRow, ckptTable, repairTable string) (r counters.Repair, msgLSN string, err error) {
	schema, rel, _ := strings.Cut(c.Table, ".")
	var qtable string
	if err := conn.QueryRow(ctx, `SELECT quote_ident($1) || '.' || quote_ident($2)`, schema, rel).Scan(&qtable); err != nil {
		return r, "", err
	}
	types := make([]string, len(c.GroupBy))
	qcols := make([]string, len(c.GroupBy))
	for i, col := range c.GroupBy {
		qcols[i] = pgx.Identifier{col}.Sanitize()
		if err := conn.QueryRow(ctx, `SELECT format_type(atttypid, atttypmod) FROM pg_attribute
			WHERE attrelid = $1::regclass AND attname = $2 AND attnum > 0 AND NOT attisdropped`, qtable, col).Scan(&types[i]); err != nil {
			return r, "", fmt.Errorf("column %s of %s: %w", col, c.Table, err)
		}
	}
	r = counters.Repair{Counter: c.Name, All: len(groups) == 0}
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		if initRow != "" {
			tag, err := tx.Exec(ctx, `INSERT INTO `+ckptTable+` (source, pos, sub) VALUES ($1, 0, 0) ON CONFLICT (source) DO NOTHING`, initRow)
			if err != nil {
				return fmt.Errorf("mark %s initialized: %w", c.Name, err)
			}
			if tag.RowsAffected() == 0 {
				return nil // initialized before
			}
		}
		if _, err := tx.Exec(ctx, `LOCK TABLE `+qtable+` IN SHARE MODE`); err != nil {
			return fmt.Errorf("lock %s: %w", c.Table, err)
		}
		if r.All {
			sel := make([]string, len(qcols))
			notNull := make([]string, len(qcols))
			for i, q := range qcols {
				sel[i] = "format('%s', " + q + ")"
				notNull[i] = q + " IS NOT NULL"
			}
			rows, err := tx.Query(ctx, `SELECT ARRAY[`+strings.Join(sel, ", ")+`], count(*) FROM `+qtable+
				` WHERE `+strings.Join(notNull, " AND ")+` GROUP BY 1`)
			if err != nil {
				return fmt.Errorf("count %s: %w", c.Table, err)
			}
			for rows.Next() {
				var g counters.RepairGroup
				if err := rows.Scan(&g.Group, &g.N); err != nil {
					rows.Close()
					return err
				}
				r.Groups = append(r.Groups, g)
			}
			if err := rows.Err(); err != nil {
				return fmt.Errorf("count %s: %w", c.Table, err)
			}
		} else {
			canon := make([]string, len(qcols))
			where := make([]string, len(qcols))
			for i := range qcols {
				canon[i] = fmt.Sprintf("format('%%s', $%d::text::%s)", i+1, types[i])
				where[i] = fmt.Sprintf("%s = $%d::text::%s", qcols[i], i+1, types[i])
			}
			q := `SELECT ARRAY[` + strings.Join(canon, ", ") + `], (SELECT count(*) FROM ` + qtable + ` WHERE ` + strings.Join(where, " AND ") + `)`
			for _, vals := range groups {
				args := make([]any, len(vals))
				for i, v := range vals {
					args[i] = v
				}
				var g counters.RepairGroup
				if err := tx.QueryRow(ctx, q, args...).Scan(&g.Group, &g.N); err != nil {
					return fmt.Errorf("count group %v: %w", vals, err)
				}
				r.Groups = append(r.Groups, g)
			}
		}
		// The request is a row only this role may write; the tail applies
		// it where its INSERT is in the WAL.
		if _, err := tx.Exec(ctx, `INSERT INTO `+repairTable+` (payload) VALUES ($1)`, string(r.Encode())); err != nil {
			return fmt.Errorf("write the repair request: %w", err)
		}
		return tx.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&msgLSN)
	})
	return r, msgLSN, err
}

// initCounters counts, once per counter, the rows its source table held
// before the counter was configured: the same recount as Repair, at a
// WAL position the slot (created before) will deliver. A row
// "init:<counter>" in the checkpoint table, written in the same
// transaction, marks it done.
func (s *Store) InitCounters(ctx context.Context, set *counters.Set, log *zap.Logger) error {
	ckptTable := s.cfg.CheckpointTable
	var conn *pgx.Conn
	for _, name := range set.Names() {
		c := set.Counter(name)
		if c.Table == "" {
			continue
		}
		if conn == nil {
			var err error
			if conn, err = pgx.Connect(ctx, s.cfg.DSN); err != nil {
				return fmt.Errorf("counters: initial count: connect: %w", err)
			}
			defer conn.Close(context.Background())
		}
		r, lsn, err := recount(ctx, conn, c, nil, "init:"+c.Name, ckptTable, s.cfg.RepairTable)
		if err != nil {
			return fmt.Errorf("counters: initial count of %s: %w", c.Name, err)
		}
		if lsn != "" {
			log.Info("counted the rows present before the counter existed", zap.String("counter", c.Name),
				zap.Int("groups", len(r.Groups)), zap.String("lsn", lsn))
		}
	}
	return nil
}
