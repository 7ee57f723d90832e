// Package counterstore keeps denormalized counters in Postgres: the
// tables (DDL), the batcher's Flusher (one transaction per batch: the
// upsert of every group, the checkpoints, and a logical message with the
// changed counters' keys so that every datacenter invalidates them), the
// checkpoints' Load, and the recount behind `invalidator repair` and a
// counter's first start. It leaves aggregation to batcher and counter
// rules to counters.
//
// # The tables
//
//	CREATE TABLE pgcache_counters (
//	    counter text   NOT NULL,  -- the counter's name
//	    grp     text   NOT NULL,  -- the group values, a JSON array of strings: ["42"]
//	    key     text   NOT NULL,  -- the group's cache key: post:42:likes
//	    n       bigint NOT NULL,  -- the count
//	    PRIMARY KEY (counter, grp));
//	CREATE INDEX pgcache_counters_key ON pgcache_counters (key);
//	CREATE TABLE pgcache_counter_checkpoints (
//	    source     text        PRIMARY KEY,  -- "wal", "nats:<stream>"
//	    pos        bigint      NOT NULL,     -- LSN or stream sequence
//	    sub        bigint      NOT NULL,     -- position inside the input at pos (WAL: change ordinal in the transaction)
//	    updated_at timestamptz NOT NULL DEFAULT now());
//	CREATE TABLE pgcache_counter_repairs (   -- revoked from PUBLIC
//	    id bigserial PRIMARY KEY, payload text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
//
// An application reads a counter by its cache key, on a miss:
// SELECT n FROM pgcache_counters WHERE key = 'post:42:likes' (no row: 0).
// It never needs COUNT(*).
package counterstore

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/pgcache/pgcache/batcher"
)

// Config says where the counters live.
type Config struct {
	// DSN of the primary.
	DSN string
	// Table is the counters table; "" means pgcache_counters. An optional
	// schema may be given ("app.pgcache_counters"); lower-case names only.
	Table string
	// CheckpointTable is the checkpoint table; "" means
	// pgcache_counter_checkpoints.
	CheckpointTable string
	// RepairTable holds repair requests; "" means
	// pgcache_counter_repairs. Only the role that created it may write it
	// (EnsureSchema revokes it from PUBLIC), and the tail applies a repair
	// only when it reads the request's INSERT from the WAL, so no other
	// database role can change counters by forging one.
	RepairTable string
	// MessagePrefix, when set, makes every flush emit
	// pg_logical_emit_message(true, MessagePrefix, 'k1 k2 ...') with the
	// cache keys of the groups it changed, in the same transaction, so the
	// invalidator's tailer invalidates them in every datacenter.
	MessagePrefix string
	// Timeout bounds one flush when ctx has no deadline; 0 means 30s.
	Timeout time.Duration
}

// Defaults of Config.
const (
	DefaultTable           = "pgcache_counters"
	DefaultCheckpointTable = "pgcache_counter_checkpoints"
	DefaultRepairTable     = "pgcache_counter_repairs"
)

var identRE = regexp.MustCompile(`^([a-z_][a-z0-9_]{0,62}\.)?[a-z_][a-z0-9_]{0,62}$`)

func (c Config) withDefaults() Config {
	if c.Table == "" {
		c.Table = DefaultTable
	}
	if c.CheckpointTable == "" {
		c.CheckpointTable = DefaultCheckpointTable
	}
	if c.RepairTable == "" {
		c.RepairTable = DefaultRepairTable
	}
	if c.Timeout == 0 {
		c.Timeout = 30 * time.Second
	}
	return c
}

// Validate checks c with zero fields taken as defaults.
func (c Config) Validate() error {
	c = c.withDefaults()
	if c.DSN == "" {
		return errors.New("counterstore: config: DSN is empty")
	}
	if _, err := pgx.ParseConfig(c.DSN); err != nil {
		return fmt.Errorf("counterstore: config: DSN: %w", err)
	}
	for _, t := range []string{c.Table, c.CheckpointTable, c.RepairTable} {
		if !identRE.MatchString(t) {
			return fmt.Errorf("counterstore: config: table name %q: want [schema.]name in lower-case letters, digits and underscores", t)
		}
	}
	if c.Table == c.CheckpointTable || c.RepairTable == c.Table || c.RepairTable == c.CheckpointTable {
		return errors.New("counterstore: config: Table, CheckpointTable and RepairTable must differ")
	}
	if strings.IndexByte(c.MessagePrefix, 0) >= 0 {
		return errors.New("counterstore: config: MessagePrefix holds NUL")
	}
	if c.Timeout < 0 {
		return errors.New("counterstore: config: Timeout is negative")
	}
	return nil
}

// PG is the Postgres Flusher. Flush and Load are called from one goroutine
// at a time.
type Store struct {
	cfg Config

	mu    sync.Mutex // guards conn, stats
	conn  *pgx.Conn
	stats StoreStats
}

// StoreStats counts what PG sent, for benchmarks.
type StoreStats struct {
	Transactions uint64 // flush transactions committed
	Statements   uint64 // SQL statements sent (BEGIN and COMMIT included)
}

// New validates cfg. It connects lazily.
func New(cfg Config) (*Store, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Store{cfg: cfg.withDefaults()}, nil
}

// Stats returns what was sent so far.
func (p *Store) Stats() StoreStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stats
}

// Close closes the connection.
func (p *Store) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.drop()
}

func (p *Store) drop() {
	if p.conn != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_ = p.conn.Close(ctx)
		cancel()
		p.conn = nil
	}
}

func (p *Store) withTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, p.cfg.Timeout)
}

// connLocked returns the connection, connecting if needed; p.mu is held.
func (p *Store) connLocked(ctx context.Context) (*pgx.Conn, error) {
	if p.conn != nil && !p.conn.IsClosed() {
		return p.conn, nil
	}
	cfg, err := pgx.ParseConfig(p.cfg.DSN)
	if err != nil {
		return nil, fmt.Errorf("batcher: parse DSN: %w", err)
	}
	delete(cfg.RuntimeParams, "replication")
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 10 * time.Second
	}
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("batcher: connect: %w", err)
	}
	p.conn = conn
	return conn, nil
}

// Schema is the DDL that EnsureSchema runs (with the configured names).
func (p *Store) Schema() string {
	t, c := p.cfg.Table, p.cfg.CheckpointTable
	idx := strings.ReplaceAll(t, ".", "_") + "_key"
	if i := strings.IndexByte(t, '.'); i >= 0 {
		idx = t[i+1:] + "_key"
	}
	return `CREATE TABLE IF NOT EXISTS ` + t + ` (
	counter text NOT NULL,
	grp text NOT NULL,
	key text NOT NULL,
	n bigint NOT NULL,
	PRIMARY KEY (counter, grp));
CREATE INDEX IF NOT EXISTS ` + idx + ` ON ` + t + ` (key);
CREATE TABLE IF NOT EXISTS ` + c + ` (
	source text PRIMARY KEY,
	pos bigint NOT NULL,
	sub bigint NOT NULL,
	updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS ` + p.cfg.RepairTable + ` (
	id bigserial PRIMARY KEY,
	payload text NOT NULL,
	created_at timestamptz NOT NULL DEFAULT now());
REVOKE ALL ON ` + p.cfg.RepairTable + ` FROM PUBLIC;`
}

// RepairTable is the repair requests' table as "schema.table", the name
// the WAL stream reports.
func (p *Store) RepairTable() string {
	if strings.IndexByte(p.cfg.RepairTable, '.') >= 0 {
		return p.cfg.RepairTable
	}
	return "public." + p.cfg.RepairTable
}

// EnsureSchema creates the tables if missing. Concurrent callers are
// serialized with an advisory lock.
func (p *Store) EnsureSchema(ctx context.Context) error {
	ctx, cancel := p.withTimeout(ctx)
	defer cancel()
	p.mu.Lock()
	defer p.mu.Unlock()
	conn, err := p.connLocked(ctx)
	if err != nil {
		return err
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		p.drop()
		return fmt.Errorf("batcher: create tables: %w", err)
	}
	defer func() { _ = tx.Rollback(context.Background()) }()
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('pgcache_counters_schema'))`); err != nil {
		return fmt.Errorf("batcher: create tables: %w", err)
	}
	if _, err := tx.Exec(ctx, p.Schema()); err != nil {
		return fmt.Errorf("batcher: create tables: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("batcher: create tables: %w", err)
	}
	return nil
}

// Load implements Flusher. It also creates the missing checkpoint rows at
// zero, so that two writers starting at once conflict on the row lock.
func (p *Store) Load(ctx context.Context, sources []string) (map[string]batcher.Pos, error) {
	ctx, cancel := p.withTimeout(ctx)
	defer cancel()
	p.mu.Lock()
	defer p.mu.Unlock()
	conn, err := p.connLocked(ctx)
	if err != nil {
		return nil, err
	}
	if len(sources) > 0 {
		if _, err := conn.Exec(ctx, `INSERT INTO `+p.cfg.CheckpointTable+` (source, pos, sub)
			SELECT s, 0, 0 FROM unnest($1::text[]) s ON CONFLICT (source) DO NOTHING`, sources); err != nil {
			p.drop()
			return nil, err
		}
	}
	rows, err := conn.Query(ctx, `SELECT source, pos, sub FROM `+p.cfg.CheckpointTable)
	if err != nil {
		p.drop()
		return nil, err
	}
	out := map[string]batcher.Pos{}
	for rows.Next() {
		var src string
		var pos, sub int64
		if err := rows.Scan(&src, &pos, &sub); err != nil {
			rows.Close()
			return nil, err
		}
		out[src] = batcher.Pos{Major: uint64(pos), Minor: uint64(sub)}
	}
	if err := rows.Err(); err != nil {
		p.drop()
		return nil, err
	}
	return out, nil
}

// Flush implements Flusher: in one transaction it locks the checkpoint
// rows of the batch's sources and checks them. When they already hold the
// batch's positions, the batch committed before (a lost COMMIT reply) and
// nothing is done; when they hold neither the batch's previous positions
// nor its new ones, ErrCheckpointMoved. Otherwise it deletes the groups of
// reset counters, upserts the groups (n = n + delta, or n = value for a
// set), stores the checkpoints and, with a MessagePrefix, emits the
// changed groups' keys, then commits.
func (p *Store) Flush(ctx context.Context, b *batcher.Batch) error {
	ctx, cancel := p.withTimeout(ctx)
	defer cancel()
	p.mu.Lock()
	defer p.mu.Unlock()
	conn, err := p.connLocked(ctx)
	if err != nil {
		return err
	}
	err = p.flush(ctx, conn, b)
	if err != nil && !errors.Is(err, batcher.ErrCheckpointMoved) {
		p.drop() // the connection's state is unknown
	}
	return err
}

func (p *Store) flush(ctx context.Context, conn *pgx.Conn, b *batcher.Batch) error {
	stmts := uint64(0)
	defer func() { p.stats.Statements += stmts }()
	tx, err := conn.Begin(ctx)
	stmts++
	if err != nil {
		return fmt.Errorf("batcher: begin: %w", err)
	}
	defer func() { _ = tx.Rollback(context.Background()) }()

	srcs := make([]string, len(b.Checkpoints))
	for i, c := range b.Checkpoints {
		srcs[i] = c.Source
	}
	cur := map[string]batcher.Pos{}
	rows, err := tx.Query(ctx, `SELECT source, pos, sub FROM `+p.cfg.CheckpointTable+` WHERE source = ANY($1) ORDER BY source FOR UPDATE`, srcs)
	stmts++
	if err != nil {
		return fmt.Errorf("batcher: lock checkpoints: %w", err)
	}
	for rows.Next() {
		var s string
		var pos, sub int64
		if err := rows.Scan(&s, &pos, &sub); err != nil {
			rows.Close()
			return fmt.Errorf("batcher: lock checkpoints: %w", err)
		}
		cur[s] = batcher.Pos{Major: uint64(pos), Minor: uint64(sub)}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("batcher: lock checkpoints: %w", err)
	}
	atPrev, atNew := true, true
	for _, c := range b.Checkpoints {
		atPrev = atPrev && cur[c.Source] == c.Prev
		atNew = atNew && cur[c.Source] == c.Pos
	}
	if atNew && !atPrev {
		return nil // committed before; the reply was lost
	}
	if !atPrev {
		return fmt.Errorf("%w: stored %v; this batcher expected %v", batcher.ErrCheckpointMoved, cur, b.Checkpoints)
	}

	keys := make([]string, 0, len(b.Groups))
	for _, c := range b.Resets {
		rows, err := tx.Query(ctx, `DELETE FROM `+p.cfg.Table+` WHERE counter = $1 RETURNING key`, c)
		stmts++
		if err != nil {
			return fmt.Errorf("batcher: reset %s: %w", c, err)
		}
		for rows.Next() {
			var k string
			if err := rows.Scan(&k); err != nil {
				rows.Close()
				return fmt.Errorf("batcher: reset %s: %w", c, err)
			}
			keys = append(keys, k)
		}
		if err := rows.Err(); err != nil {
			return fmt.Errorf("batcher: reset %s: %w", c, err)
		}
	}

	var add, set struct {
		counter, grp, key []string
		n                 []int64
	}
	for _, g := range b.Groups {
		t := &add
		if g.Set {
			t = &set
		}
		t.counter = append(t.counter, g.Counter)
		t.grp = append(t.grp, g.Group)
		t.key = append(t.key, g.Key)
		t.n = append(t.n, g.N)
		keys = append(keys, g.Key)
	}
	var pb pgx.Batch
	if len(add.n) > 0 {
		pb.Queue(`INSERT INTO `+p.cfg.Table+` AS c (counter, grp, key, n)
			SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
			ON CONFLICT (counter, grp) DO UPDATE SET n = c.n + excluded.n, key = excluded.key`,
			add.counter, add.grp, add.key, add.n)
	}
	if len(set.n) > 0 {
		pb.Queue(`INSERT INTO `+p.cfg.Table+` AS c (counter, grp, key, n)
			SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
			ON CONFLICT (counter, grp) DO UPDATE SET n = excluded.n, key = excluded.key`,
			set.counter, set.grp, set.key, set.n)
	}
	var cs []string
	var cp, csub []int64
	for _, c := range b.Checkpoints {
		cs = append(cs, c.Source)
		cp = append(cp, int64(c.Pos.Major))
		csub = append(csub, int64(c.Pos.Minor))
	}
	pb.Queue(`INSERT INTO `+p.cfg.CheckpointTable+` AS c (source, pos, sub)
		SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])
		ON CONFLICT (source) DO UPDATE SET pos = excluded.pos, sub = excluded.sub, updated_at = now()`, cs, cp, csub)
	if p.cfg.MessagePrefix != "" && len(keys) > 0 {
		pb.Queue(`SELECT pg_logical_emit_message(true, $1, $2)`, p.cfg.MessagePrefix, strings.Join(dedup(keys), " "))
	}
	stmts += uint64(pb.Len())
	if err := tx.SendBatch(ctx, &pb).Close(); err != nil {
		return fmt.Errorf("batcher: write batch: %w", err)
	}
	stmts++
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("batcher: commit: %w", err)
	}
	p.stats.Transactions++
	return nil
}

func dedup(keys []string) []string {
	seen := make(map[string]struct{}, len(keys))
	out := keys[:0]
	for _, k := range keys {
		if _, ok := seen[k]; ok {
			continue
		}
		seen[k] = struct{}{}
		out = append(out, k)
	}
	return out
}
