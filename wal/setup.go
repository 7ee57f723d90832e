package wal

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.uber.org/zap"
)

// queryTimeout applies to Setup, Inspect and SlotStatus when ctx has no
// deadline.
const queryTimeout = 30 * time.Second

// connect opens a regular (non-replication) connection.
func connect(ctx context.Context, dsn string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("wal: parse DSN: %w", err)
	}
	delete(cfg.RuntimeParams, "replication")
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = connectTimeout
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("wal: connect: %w", err)
	}
	return conn, nil
}

// withConn runs fn on a regular connection to dsn, with queryTimeout when
// ctx has no deadline, and closes it.
func withConn(ctx context.Context, dsn string, fn func(context.Context, *pgx.Conn) error) error {
	ctx, cancel := withTimeout(ctx, queryTimeout)
	defer cancel()
	conn, err := connect(ctx, dsn)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	return fn(ctx, conn)
}

// Setup creates what Run needs when it is missing:
//
//   - the publication, for exactly Config.Tables (CREATE PUBLICATION ...
//     FOR TABLE ...). If it exists, missing tables are added and the
//     publish option is set to every operation if it lacks one; tables in
//     it that are not configured are left there and logged (Run drops
//     their changes).
//   - the logical replication slot with the pgoutput plugin.
//
// It first checks every configured table: a missing one is ErrNoTable, and
// one without a replica identity is ErrNoIdentity (publishing it would
// make UPDATE and DELETE on it fail), each with the fix. An invalidated
// slot is ErrSlotGone. Setup is safe to run from several processes at once.
func (s *Stream) Setup(ctx context.Context) error {
	ctx, cancel := withTimeout(ctx, queryTimeout)
	defer cancel()
	conn, err := connect(ctx, s.cfg.DSN)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())

	infos, err := inspect(ctx, conn, s.cfg.Tables)
	if err != nil {
		return err
	}
	for _, t := range infos {
		if !t.Exists {
			return fmt.Errorf("%w: %s", ErrNoTable, t.Name)
		}
		if ok, fix := CheckIdentity(t, nil); !ok {
			return fmt.Errorf("%w: %s (replica identity %q); run: %s", ErrNoIdentity, t.Name, t.ReplicaIdentity, fix)
		}
	}
	if err := s.setupPublication(ctx, conn, infos); err != nil {
		return err
	}
	return s.setupSlot(ctx, conn)
}

func (s *Stream) setupPublication(ctx context.Context, conn *pgx.Conn, infos []TableInfo) error {
	pub := s.cfg.Publication
	for attempt := 0; ; attempt++ {
		var all, ins, upd, del, trunc, viaRoot bool
		err := conn.QueryRow(ctx, "SELECT puballtables, pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot FROM pg_publication WHERE pubname = $1", pub).
			Scan(&all, &ins, &upd, &del, &trunc, &viaRoot)
		if errors.Is(err, pgx.ErrNoRows) {
			sql := "CREATE PUBLICATION " + pub
			if len(infos) > 0 {
				sql += " FOR TABLE " + quotedList(infos)
			}
			// A partition's changes then come under its root's name, the
			// table the rules name, whichever partition holds the row and
			// however many are attached later.
			sql += " WITH (publish_via_partition_root = true)"
			_, err = conn.Exec(ctx, sql)
			var pgErr *pgconn.PgError
			if errors.As(err, &pgErr) && pgErr.Code == "42710" && attempt == 0 {
				continue // created meanwhile by another process
			}
			if err != nil {
				return fmt.Errorf("wal: create publication %s: %w", pub, err)
			}
			s.log.Info("created publication", zap.String("publication", pub), zap.Strings("tables", s.cfg.Tables))
			return nil
		}
		if err != nil {
			return fmt.Errorf("wal: look up publication %s: %w", pub, err)
		}
		if !(ins && upd && del && trunc) {
			if _, err := conn.Exec(ctx, "ALTER PUBLICATION "+pub+" SET (publish = 'insert, update, delete, truncate')"); err != nil {
				return fmt.Errorf("wal: alter publication %s: %w", pub, err)
			}
			s.log.Info("publication now publishes every operation", zap.String("publication", pub))
		}
		if !viaRoot && partitioned(infos) {
			if _, err := conn.Exec(ctx, "ALTER PUBLICATION "+pub+" SET (publish_via_partition_root = true)"); err != nil {
				return fmt.Errorf("wal: alter publication %s: %w", pub, err)
			}
			s.log.Info("publication now publishes partitions' changes under their root table", zap.String("publication", pub))
		}
		if all {
			s.log.Warn("publication is FOR ALL TABLES; changes of tables not configured are dropped", zap.String("publication", pub))
			return nil
		}
		// The publication's own members (a partitioned table is listed
		// itself, not its partitions as pg_publication_tables may).
		rows, err := conn.Query(ctx, `SELECT n.nspname, c.relname, pr.prqual IS NOT NULL
			FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
			JOIN pg_class c ON c.oid = pr.prrelid JOIN pg_namespace n ON n.oid = c.relnamespace
			WHERE p.pubname = $1`, pub)
		if err != nil {
			return fmt.Errorf("wal: list publication %s: %w", pub, err)
		}
		have := make(map[string]bool)
		var filtered []string
		for rows.Next() {
			var schema, table string
			var rowFilter bool
			if err := rows.Scan(&schema, &table, &rowFilter); err != nil {
				rows.Close()
				return fmt.Errorf("wal: list publication %s: %w", pub, err)
			}
			have[schema+"."+table] = true
			if rowFilter {
				filtered = append(filtered, schema+"."+table)
			}
		}
		if err := rows.Err(); err != nil {
			return fmt.Errorf("wal: list publication %s: %w", pub, err)
		}
		var missing []TableInfo
		for _, t := range infos {
			if !have[t.Name] {
				missing = append(missing, t)
			}
			delete(have, t.Name)
		}
		if len(filtered) > 0 {
			s.log.Warn("publication has row filters: filtered-out changes are never invalidated",
				zap.String("publication", pub), zap.Strings("tables", filtered))
		}
		if len(have) > 0 && len(infos) > 0 {
			extra := make([]string, 0, len(have))
			for t := range have {
				extra = append(extra, t)
			}
			slices.Sort(extra)
			s.log.Warn("publication has tables that are not configured; their changes are dropped",
				zap.String("publication", pub), zap.Strings("tables", extra))
		}
		if len(missing) > 0 {
			if _, err := conn.Exec(ctx, "ALTER PUBLICATION "+pub+" ADD TABLE "+quotedList(missing)); err != nil {
				var pgErr *pgconn.PgError
				if errors.As(err, &pgErr) && pgErr.Code == "42710" && attempt == 0 {
					continue // added meanwhile by another process
				}
				return fmt.Errorf("wal: add tables to publication %s: %w", pub, err)
			}
			names := make([]string, len(missing))
			for i, t := range missing {
				names[i] = t.Name
			}
			s.log.Info("added tables to publication", zap.String("publication", pub), zap.Strings("tables", names))
		}
		return nil
	}
}

func (s *Stream) setupSlot(ctx context.Context, conn *pgx.Conn) error {
	var slotType, plugin, walStatus string
	var sameDB bool
	err := conn.QueryRow(ctx, "SELECT slot_type, coalesce(plugin, ''), coalesce(database = current_database(), false), "+
		"coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1", s.cfg.Slot).
		Scan(&slotType, &plugin, &sameDB, &walStatus)
	switch {
	case err == nil:
		if slotType != "logical" || plugin != "pgoutput" {
			return fmt.Errorf("wal: slot %q is a %s slot with plugin %q; want logical with pgoutput", s.cfg.Slot, slotType, plugin)
		}
		if !sameDB {
			return fmt.Errorf("wal: slot %q belongs to another database", s.cfg.Slot)
		}
		if walStatus == "lost" {
			return slotGone(s.cfg.Slot, "was invalidated (wal_status lost: the WAL it needs was removed)")
		}
		return s.ensureFailover(ctx, conn)
	case !errors.Is(err, pgx.ErrNoRows):
		return fmt.Errorf("wal: look up slot %q: %w", s.cfg.Slot, err)
	}
	if s.failoverSlots(ctx, conn) {
		// pg_create_logical_replication_slot(name, plugin, temporary,
		// two_phase, failover)
		_, err := conn.Exec(ctx, `SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)`, s.cfg.Slot)
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "42710" {
			return nil // created meanwhile by another process
		}
		if err != nil {
			return fmt.Errorf("wal: create failover slot %q: %w", s.cfg.Slot, err)
		}
		s.log.Info("created replication slot (failover: standbys with sync_replication_slots keep a copy)", zap.String("slot", s.cfg.Slot))
		return nil
	}
	repl, err := s.connectRepl(ctx)
	if err != nil {
		return err
	}
	defer repl.Close(context.Background())
	res, err := pglogrepl.CreateReplicationSlot(ctx, repl, s.cfg.Slot, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{Mode: pglogrepl.LogicalReplication, SnapshotAction: "NOEXPORT_SNAPSHOT"})
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42710" {
		return nil // created meanwhile by another process
	}
	if err != nil {
		return fmt.Errorf("wal: create slot %q: %w", s.cfg.Slot, err)
	}
	s.log.Info("created replication slot", zap.String("slot", s.cfg.Slot), zap.String("consistent_point", res.ConsistentPoint))
	return nil
}

// partitioned reports whether a table is partitioned.
func partitioned(ts []TableInfo) bool {
	for _, t := range ts {
		if t.Partitioned {
			return true
		}
	}
	return false
}

func quotedList(ts []TableInfo) string {
	parts := make([]string, len(ts))
	for i, t := range ts {
		parts[i] = t.quoted()
	}
	return strings.Join(parts, ", ")
}

// TableInfo describes a table as `invalidator check` needs it.
type TableInfo struct {
	Name   string // "schema.table" as configured
	Exists bool
	// QuotedName is the name quoted for SQL by the server (quote_ident).
	QuotedName string
	Columns    []string // in column order
	// ReplicaIdentity is pg_class.relreplident: 'd' default (primary key),
	// 'n' nothing, 'f' full, 'i' index.
	ReplicaIdentity byte
	// IdentityColumns are the columns an UPDATE's or DELETE's old row
	// carries: the primary key ('d'), the identity index ('i'), every
	// column ('f'), none ('n', or 'd' without a primary key).
	IdentityColumns []string
	// IdentityIndexes are the indexes REPLICA IDENTITY USING INDEX
	// accepts: unique, valid, immediate, not partial, without
	// expressions, on NOT NULL columns.
	IdentityIndexes []Index
	// Partitioned: a partitioned table. Its changes are published under
	// its name (publish_via_partition_root), but an old row comes with
	// the replica identity of the partition that held it: Partitions are
	// its leaf partitions, each checked for its identity.
	Partitioned bool
	Partitions  []TableInfo
}

// Index is a unique index usable as replica identity.
type Index struct {
	Name       string
	QuotedName string // quoted for SQL by the server
	Columns    []string
}

func (t TableInfo) quoted() string {
	if t.QuotedName != "" {
		return t.QuotedName
	}
	schema, table, err := splitTable(t.Name)
	if err != nil {
		return quoteIdent(t.Name)
	}
	return quoteIdent(schema) + "." + quoteIdent(table)
}

var plainIdentRE = regexp.MustCompile(`^[a-z_][a-z0-9_]*$`)

// quoteIdent quotes an identifier unless it is plainly lower-case. Unlike
// the server's quote_ident it does not know the keywords: names from
// Inspect come quoted by the server.
func quoteIdent(s string) string {
	if plainIdentRE.MatchString(s) {
		return s
	}
	return pgx.Identifier{s}.Sanitize()
}

// Inspect reads the columns and replica identity of tables ("schema.table")
// with a regular, read-only connection. A table that does not exist is
// returned with Exists false.
func Inspect(ctx context.Context, dsn string, tables []string) (out []TableInfo, err error) {
	err = withConn(ctx, dsn, func(ctx context.Context, conn *pgx.Conn) error {
		out, err = inspect(ctx, conn, tables)
		return err
	})
	return out, err
}

func inspect(ctx context.Context, conn *pgx.Conn, tables []string) ([]TableInfo, error) {
	out := make([]TableInfo, 0, len(tables))
	for _, name := range tables {
		schema, table, err := splitTable(name)
		if err != nil {
			return nil, fmt.Errorf("wal: inspect: %w", err)
		}
		t := TableInfo{Name: name}
		var oid uint32
		var ident string
		var kind string
		err = conn.QueryRow(ctx, `SELECT c.oid, c.relreplident::text, quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relkind::text
			FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
			WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')`, schema, table).Scan(&oid, &ident, &t.QuotedName, &kind)
		if errors.Is(err, pgx.ErrNoRows) {
			out = append(out, t)
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("wal: inspect %s: %w", name, err)
		}
		t.Exists = true
		if kind == "p" {
			t.Partitioned = true
			leaves, err := partitionsOf(ctx, conn, oid)
			if err != nil {
				return nil, fmt.Errorf("wal: inspect %s partitions: %w", name, err)
			}
			if t.Partitions, err = inspect(ctx, conn, leaves); err != nil {
				return nil, err
			}
		}
		if len(ident) == 1 {
			t.ReplicaIdentity = ident[0]
		}
		notNull := make(map[string]bool)
		rows, err := conn.Query(ctx, `SELECT attname, attnotnull FROM pg_attribute
			WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum`, oid)
		if err != nil {
			return nil, fmt.Errorf("wal: inspect %s: %w", name, err)
		}
		for rows.Next() {
			var col string
			var nn bool
			if err := rows.Scan(&col, &nn); err != nil {
				rows.Close()
				return nil, fmt.Errorf("wal: inspect %s: %w", name, err)
			}
			t.Columns = append(t.Columns, col)
			notNull[col] = nn
		}
		if err := rows.Err(); err != nil {
			return nil, fmt.Errorf("wal: inspect %s: %w", name, err)
		}

		rows, err = conn.Query(ctx, `SELECT ic.relname, quote_ident(ic.relname), i.indisprimary, i.indisreplident,
				i.indisunique AND i.indimmediate AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL,
				ARRAY(SELECT a.attname FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
					JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
					WHERE k.ord <= i.indnkeyatts ORDER BY k.ord)
			FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
			WHERE i.indrelid = $1 ORDER BY ic.relname`, oid)
		if err != nil {
			return nil, fmt.Errorf("wal: inspect %s indexes: %w", name, err)
		}
		var pk, identIdx []string
		for rows.Next() {
			var idx Index
			var primary, replident, usable bool
			if err := rows.Scan(&idx.Name, &idx.QuotedName, &primary, &replident, &usable, &idx.Columns); err != nil {
				rows.Close()
				return nil, fmt.Errorf("wal: inspect %s indexes: %w", name, err)
			}
			if primary {
				pk = idx.Columns
			}
			if replident {
				identIdx = idx.Columns
			}
			for _, c := range idx.Columns {
				usable = usable && notNull[c]
			}
			if usable && len(idx.Columns) > 0 {
				t.IdentityIndexes = append(t.IdentityIndexes, idx)
			}
		}
		if err := rows.Err(); err != nil {
			return nil, fmt.Errorf("wal: inspect %s indexes: %w", name, err)
		}
		switch t.ReplicaIdentity {
		case 'd':
			t.IdentityColumns = pk
		case 'i':
			t.IdentityColumns = identIdx
		case 'f':
			t.IdentityColumns = slices.Clone(t.Columns)
		}
		out = append(out, t)
	}
	return out, nil
}

// partitionsOf lists the leaf partitions of a partitioned table, at any
// depth, as "schema.table".
func partitionsOf(ctx context.Context, conn *pgx.Conn, oid uint32) ([]string, error) {
	rows, err := conn.Query(ctx, `SELECT n.nspname || '.' || c.relname FROM pg_partition_tree($1::oid::regclass) pt
		JOIN pg_class c ON c.oid = pt.relid JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE pt.isleaf AND pt.relid <> $1::oid::regclass ORDER BY 1`, oid)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// CheckIdentity reports whether t's replica identity supplies the old
// values of the columns in needOld (the columns an UPDATE's or DELETE's
// keys are rendered from), and whether it has a replica identity at all:
// without one, publishing the table makes UPDATE and DELETE on it fail.
// When not, fix is the statement to run: "ALTER TABLE s.t REPLICA IDENTITY
// USING INDEX i;" with the smallest usable unique index that holds the
// columns, else "ALTER TABLE s.t REPLICA IDENTITY FULL;". If the table
// or one of the columns does not exist, ok is false and fix is empty:
// no replica identity can help.
//
// A partitioned table is checked through its leaf partitions, since a
// partition's old row comes with its own replica identity: ok when every
// partition's identity supplies the columns (and none is missing), fix
// the statements for those that do not. A partition attached later must
// be checked again; the tail role re-runs the check periodically.
func CheckIdentity(t TableInfo, needOld []string) (ok bool, fix string) {
	if !t.Exists {
		return false, ""
	}
	for _, c := range needOld {
		if !slices.Contains(t.Columns, c) {
			return false, ""
		}
	}
	if t.Partitioned {
		var fixes []string
		for _, p := range t.Partitions {
			if ok, f := CheckIdentity(p, needOld); !ok {
				fixes = append(fixes, f)
			}
		}
		return len(fixes) == 0, strings.Join(fixes, " ")
	}
	covers := func(cols []string) bool {
		for _, c := range needOld {
			if !slices.Contains(cols, c) {
				return false
			}
		}
		return true
	}
	if len(t.IdentityColumns) > 0 && covers(t.IdentityColumns) {
		return true, ""
	}
	var best *Index
	for i := range t.IdentityIndexes {
		idx := &t.IdentityIndexes[i]
		if covers(idx.Columns) && (best == nil || len(idx.Columns) < len(best.Columns)) {
			best = idx
		}
	}
	if best != nil {
		q := best.QuotedName
		if q == "" {
			q = quoteIdent(best.Name)
		}
		return false, "ALTER TABLE " + t.quoted() + " REPLICA IDENTITY USING INDEX " + q + ";"
	}
	return false, "ALTER TABLE " + t.quoted() + " REPLICA IDENTITY FULL;"
}

// SlotInfo is a replication slot's state, from pg_replication_slots.
type SlotInfo struct {
	Exists    bool
	Active    bool  // a process streams from it
	ActivePID int32 // that process's server pid, 0 if none
	Plugin    string
	// ConfirmedFlush is the position up to which the consumer confirmed.
	ConfirmedFlush pglogrepl.LSN
	RestartLSN     pglogrepl.LSN
	// WALStatus is "reserved", "extended", "unreserved" or "lost" (the
	// slot was invalidated).
	WALStatus string
	// RetainedBytes is how much WAL the slot keeps: the server's current
	// WAL position minus RestartLSN.
	RetainedBytes int64
}

// SlotStatus reads a slot's state with a regular, read-only connection to
// the primary. A missing slot is returned with Exists false and no error.
func SlotStatus(ctx context.Context, dsn, slot string) (SlotInfo, error) {
	ctx, cancel := withTimeout(ctx, queryTimeout)
	defer cancel()
	conn, err := connect(ctx, dsn)
	if err != nil {
		return SlotInfo{}, err
	}
	defer conn.Close(context.Background())
	var info SlotInfo
	var confirmed, restart string
	err = conn.QueryRow(ctx, `SELECT coalesce(plugin, ''), active, coalesce(active_pid, 0),
			coalesce(confirmed_flush_lsn, '0/0')::text, coalesce(restart_lsn, '0/0')::text, coalesce(wal_status, ''),
			coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint
		FROM pg_replication_slots WHERE slot_name = $1`, slot).
		Scan(&info.Plugin, &info.Active, &info.ActivePID, &confirmed, &restart, &info.WALStatus, &info.RetainedBytes)
	if errors.Is(err, pgx.ErrNoRows) {
		return SlotInfo{}, nil
	}
	if err != nil {
		return SlotInfo{}, fmt.Errorf("wal: slot status %q: %w", slot, err)
	}
	info.Exists = true
	if info.ConfirmedFlush, err = pglogrepl.ParseLSN(confirmed); err != nil {
		return SlotInfo{}, fmt.Errorf("wal: slot status %q: %w", slot, err)
	}
	if info.RestartLSN, err = pglogrepl.ParseLSN(restart); err != nil {
		return SlotInfo{}, fmt.Errorf("wal: slot status %q: %w", slot, err)
	}
	return info, nil
}

// System identifies the database cluster a DSN reaches.
type System struct {
	ID       string        // the system identifier, shared by a primary and its physical replicas
	Timeline uint32        // the server's current timeline
	WALEnd   pglogrepl.LSN // its current WAL position (flush position)
}

// IdentifySystem asks the server of s's DSN who it is (IDENTIFY_SYSTEM on
// a replication connection).
func (s *Stream) IdentifySystem(ctx context.Context) (System, error) {
	ctx, cancel := withTimeout(ctx, queryTimeout)
	defer cancel()
	conn, err := s.connectRepl(ctx)
	if err != nil {
		return System{}, err
	}
	defer conn.Close(context.Background())
	r, err := pglogrepl.IdentifySystem(ctx, conn)
	if err != nil {
		return System{}, classify("identify system", err)
	}
	return System{ID: r.SystemID, Timeline: uint32(r.Timeline), WALEnd: r.XLogPos}, nil
}

// DropSlot drops s's slot if it exists and no process streams from it:
// after it was invalidated, so that Setup creates it anew.
func (s *Stream) DropSlot(ctx context.Context) error {
	return withConn(ctx, s.cfg.DSN, func(ctx context.Context, conn *pgx.Conn) error {
		if _, err := conn.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active`, s.cfg.Slot); err != nil {
			return fmt.Errorf("wal: drop slot %q: %w", s.cfg.Slot, err)
		}
		return nil
	})
}

// failoverSlots reports whether the slot should be a failover slot: the
// config asks for it and the server is PostgreSQL 17 or later.
func (s *Stream) failoverSlots(ctx context.Context, conn *pgx.Conn) bool {
	if !s.cfg.Failover {
		return false
	}
	var v int
	if err := conn.QueryRow(ctx, `SELECT current_setting('server_version_num')::int`).Scan(&v); err != nil {
		return false
	}
	return v >= 170000
}

// ensureFailover makes an existing slot a failover slot when it should be
// one (ALTER_REPLICATION_SLOT, on a replication connection).
func (s *Stream) ensureFailover(ctx context.Context, conn *pgx.Conn) error {
	if !s.failoverSlots(ctx, conn) {
		return nil
	}
	var failover, active bool
	if err := conn.QueryRow(ctx, `SELECT failover, active FROM pg_replication_slots WHERE slot_name = $1`, s.cfg.Slot).Scan(&failover, &active); err != nil {
		return fmt.Errorf("wal: look up slot %q: %w", s.cfg.Slot, err)
	}
	if failover || active { // an active slot is another process's to alter
		return nil
	}
	repl, err := s.connectRepl(ctx)
	if err != nil {
		return err
	}
	defer repl.Close(context.Background())
	if _, err := repl.Exec(ctx, "ALTER_REPLICATION_SLOT "+s.cfg.Slot+" (FAILOVER true)").ReadAll(); err != nil {
		s.log.Warn("could not make the slot a failover slot; after a promotion it will be lost", zap.String("slot", s.cfg.Slot), zap.Error(err))
		return nil
	}
	s.log.Info("the slot is now a failover slot", zap.String("slot", s.cfg.Slot))
	return nil
}

// FailoverSettings are what a failover slot needs on the primary
// (PostgreSQL 17 and later).
type FailoverSettings struct {
	Version int // server_version_num
	// SlotFailover: the slot exists and is a failover slot.
	SlotFailover bool
	// SynchronizedStandbySlots is the primary's synchronized_standby_slots.
	SynchronizedStandbySlots string
	// Standbys are the physical slots of connected standbys.
	Standbys []string
}

// CheckFailover reads what a failover needs from the primary, for
// `invalidator check`.
func CheckFailover(ctx context.Context, dsn, slot string) (f FailoverSettings, err error) {
	err = withConn(ctx, dsn, func(ctx context.Context, conn *pgx.Conn) error {
		if err := conn.QueryRow(ctx, `SELECT current_setting('server_version_num')::int`).Scan(&f.Version); err != nil {
			return fmt.Errorf("wal: server version: %w", err)
		}
		if f.Version < 170000 {
			return nil
		}
		if err := conn.QueryRow(ctx, `SELECT current_setting('synchronized_standby_slots'),
			coalesce((SELECT failover FROM pg_replication_slots WHERE slot_name = $1), false)`, slot).Scan(&f.SynchronizedStandbySlots, &f.SlotFailover); err != nil {
			return fmt.Errorf("wal: failover settings: %w", err)
		}
		rows, err := conn.Query(ctx, `SELECT slot_name FROM pg_replication_slots WHERE slot_type = 'physical' ORDER BY 1`)
		if err != nil {
			return fmt.Errorf("wal: standby slots: %w", err)
		}
		f.Standbys, err = pgx.CollectRows(rows, pgx.RowTo[string])
		return err
	})
	return f, err
}
