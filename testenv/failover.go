package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// ErrNotReplica is returned when a failover's target is not a running
// replica of the environment.
var ErrNotReplica = errors.New("testenv: not a running replica")

// TimelineSwitch is one line of a timeline history file: timeline Parent
// ended at SwitchLSN, where the next timeline begins.
type TimelineSwitch struct {
	Parent    uint32
	SwitchLSN string // pg_lsn text, e.g. "0/3000148"
	Reason    string
}

// FailoverOptions says how Env.Failover fails over.
type FailoverOptions struct {
	// Target is the replica to promote. nil means the one that has
	// received the most WAL once the old primary is stopped (the first
	// DC's on a tie), as Patroni picks: a replica further ahead than the
	// promoted one could not follow it.
	Target *Postgres
	// Switchover stops the old primary with a fast shutdown, which first
	// sends its WAL to the connected replicas, instead of kill -9.
	Switchover bool
}

// Failover is what Env.Failover did.
type Failover struct {
	OldPrimary *Postgres // stopped
	NewPrimary *Postgres // now Env.Primary
	// Timeline is the new primary's timeline, and History its timeline
	// history; the last entry is the switch this failover made.
	Timeline uint32
	History  []TimelineSwitch
	// SwitchLSN is where the new timeline begins: what the old primary
	// wrote past it (commits no replica received) is not in the new
	// history.
	SwitchLSN string
	// Repointed are the replicas that now follow the new primary.
	Repointed []*Postgres
	// Rebuilt are those of them that had received WAL of the old timeline
	// past SwitchLSN (possible when Target was given): they cannot follow
	// the new timeline, so they were made again from a copy of the new
	// primary, as an operator would with pg_rewind or a new base backup.
	Rebuilt []*Postgres
	// Promoted is how long the promotion took, from the old primary's stop
	// until the target accepted writes.
	Promoted time.Duration
}

// Failover does what an operator or Patroni does when the primary dies:
// kill -9 the primary (or, with Switchover, a fast shutdown), promote the
// target with pg_ctl promote and wait until it accepts writes, then repoint
// every other replica at it: a new Link to the new primary replaces the
// DC's ReplLink (cut and slowed as the old one was), primary_conninfo and
// primary_slot_name are changed and the replica restarts with
// recovery_target_timeline = latest. The replicas' physical slots are made
// on the target before the promotion, so that it keeps the WAL they need;
// on PostgreSQL 17 its synchronized_standby_slots lists them.
//
// A replica that holds WAL of the old timeline past the switch (when a
// Target behind it was given) cannot follow: it is made again from a copy
// of the new primary (Failover.Rebuilt).
//
// Env.Primary becomes the target. The promoted replica stays its DC's
// Replica too (a purge gate on it reads pg_current_wal_lsn()). Failover
// waits until every repointed replica whose link is not cut streams the
// new timeline. It writes Env.Primary and the DCs' ReplLink: goroutines
// that run during it must not read those fields (take the servers and
// DSNs they need before; a MultiHostDSN rides the failover).
func (e *Env) Failover(ctx context.Context, opts FailoverOptions) (*Failover, error) {
	target := opts.Target
	if target != nil && (!target.Replica || !target.Running()) {
		return nil, fmt.Errorf("failover: %s: %w", target.Name, ErrNotReplica)
	}
	var replicas []*Postgres
	for _, dc := range e.DCs {
		if dc.Replica != nil && dc.Replica.Replica && dc.Replica.Running() {
			replicas = append(replicas, dc.Replica)
		}
	}
	if len(replicas) == 0 {
		return nil, fmt.Errorf("failover: %w", ErrNotReplica)
	}
	// Every replica gets its slot on every other before the promotion, so
	// that the one promoted keeps the WAL the others need from it.
	for _, r := range replicas {
		for _, o := range replicas {
			if o == r || (target != nil && r != target) {
				continue
			}
			if err := r.Exec(ctx, `SELECT pg_create_physical_replication_slot($1, true)
				WHERE NOT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = $1)`, o.Slot); err != nil {
				return nil, fmt.Errorf("failover: slot for %s on %s: %w", o.Name, r.Name, err)
			}
		}
	}
	old := e.Primary
	start := time.Now()
	if old != nil && old.Running() {
		stop := old.Kill
		if opts.Switchover {
			stop = old.Stop
		}
		if err := stop(); err != nil {
			return nil, fmt.Errorf("failover: stop %s: %w", old.Name, err)
		}
	}
	// WAL still in flight through a link reaches its replica before the
	// replica's walreceiver sees the connection end: wait for that, so that
	// the positions compared are final.
	for _, r := range replicas {
		if err := r.waitNotStreaming(ctx, 10*time.Second); err != nil {
			return nil, fmt.Errorf("failover: %w", err)
		}
	}
	pos, err := receivedLSNs(ctx, replicas)
	if err != nil {
		return nil, fmt.Errorf("failover: %w", err)
	}
	if target == nil {
		// The most advanced, the first on a tie.
		for _, r := range replicas {
			if target == nil || pos[r] > pos[target] {
				target = r
			}
		}
	}
	f := &Failover{OldPrimary: old, NewPrimary: target}
	var others []*DC
	for _, dc := range e.DCs {
		if dc.Replica != nil && dc.Replica != target && dc.Replica.Running() {
			others = append(others, dc)
		}
	}
	// Slots made for a choice not taken would hold WAL forever.
	for _, r := range replicas {
		if r == target {
			continue
		}
		for _, o := range replicas {
			if o != r {
				_ = r.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
					WHERE slot_name = $1 AND NOT active`, o.Slot)
			}
		}
	}
	if err := target.Promote(ctx); err != nil {
		return nil, fmt.Errorf("failover: %w", err)
	}
	f.Promoted = time.Since(start)
	e.Primary = target
	if err := target.syncStandbySlots(ctx); err != nil {
		return nil, fmt.Errorf("failover: %w", err)
	}
	tli, err := target.Timeline(ctx)
	if err != nil {
		return nil, fmt.Errorf("failover: %w", err)
	}
	f.Timeline = tli
	if f.History, err = target.TimelineHistory(ctx); err != nil {
		return nil, fmt.Errorf("failover: %w", err)
	}
	if n := len(f.History); n > 0 {
		f.SwitchLSN = f.History[n-1].SwitchLSN
	}
	switchAt, err := ParseLSN(f.SwitchLSN)
	if err != nil {
		return nil, fmt.Errorf("failover: %w", err)
	}
	for _, dc := range others {
		rebuild := pos[dc.Replica] > switchAt
		if !rebuild {
			if err := e.repoint(ctx, dc, target); err != nil {
				return nil, fmt.Errorf("failover: %w", err)
			}
			if dc.ReplLink.IsCut() {
				f.Repointed = append(f.Repointed, dc.Replica)
				continue
			}
			// A replica measured behind that was in fact ahead never
			// streams the new timeline: rebuild it after a while.
			wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			err := dc.Replica.WaitTimeline(wctx, tli)
			cancel()
			if err != nil && ctx.Err() != nil {
				return nil, fmt.Errorf("failover: %w", err)
			}
			rebuild = err != nil
		}
		if rebuild {
			if err := e.rebuild(ctx, dc, target); err != nil {
				return nil, fmt.Errorf("failover: %w", err)
			}
			f.Rebuilt = append(f.Rebuilt, dc.Replica)
			if !dc.ReplLink.IsCut() {
				if err := dc.Replica.WaitTimeline(ctx, tli); err != nil {
					return nil, fmt.Errorf("failover: %w", err)
				}
			}
		}
		f.Repointed = append(f.Repointed, dc.Replica)
	}
	return f, nil
}

// waitNotStreaming waits until a replica's WAL receiver has lost its
// primary, up to timeout (a switchover's stopped primary is gone at once).
func (pg *Postgres) waitNotStreaming(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		var streaming bool
		err := pg.QueryRow(ctx, "SELECT EXISTS (SELECT FROM pg_stat_wal_receiver WHERE status = 'streaming')", &streaming)
		if err == nil && !streaming {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("replica %s still streaming from a stopped primary: %w (last error: %v)", pg.Name, ctx.Err(), err)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// receivedLSNs is how far each replica's WAL goes: the greater of what it
// received and what it replayed (a restarted WAL receiver reports from the
// start of its segment).
func receivedLSNs(ctx context.Context, replicas []*Postgres) (map[*Postgres]uint64, error) {
	out := map[*Postgres]uint64{}
	for _, r := range replicas {
		var s string
		if err := r.QueryRow(ctx, `SELECT coalesce(greatest(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), '0/0')::text`, &s); err != nil {
			return nil, err
		}
		lsn, err := ParseLSN(s)
		if err != nil {
			return nil, err
		}
		out[r] = lsn
	}
	return out, nil
}

// ParseLSN parses pg_lsn text ("16/B374D848").
func ParseLSN(s string) (uint64, error) {
	hi, lo, ok := strings.Cut(s, "/")
	if !ok || !isHex(hi) || !isHex(lo) {
		return 0, fmt.Errorf("testenv: bad LSN %q", s)
	}
	h, _ := strconv.ParseUint(hi, 16, 32)
	l, _ := strconv.ParseUint(lo, 16, 32)
	return h<<32 | l, nil
}

// rebuild makes dc's replica again from a copy of primary and starts it
// following primary through a new link.
func (e *Env) rebuild(ctx context.Context, dc *DC, primary *Postgres) error {
	r := dc.Replica
	if err := r.Stop(); err != nil && !errors.Is(err, ErrNotRunning) {
		return fmt.Errorf("rebuild %s: %w", r.Name, err)
	}
	if err := os.RemoveAll(r.DataDir); err != nil {
		return fmt.Errorf("rebuild %s: %w", r.Name, err)
	}
	if err := os.Mkdir(r.DataDir, 0o700); err != nil {
		return fmt.Errorf("rebuild %s: %w", r.Name, err)
	}
	if err := os.Chown(r.DataDir, int(r.cred.Uid), int(r.cred.Gid)); err != nil {
		return fmt.Errorf("rebuild %s: %w", r.Name, err)
	}
	if err := r.copyFrom(ctx, primary); err != nil {
		return fmt.Errorf("rebuild %s: %w", r.Name, err)
	}
	l, err := e.newReplLink(dc, primary)
	if err != nil {
		return err
	}
	if err := r.writeStandby(l.Addr); err != nil {
		_ = l.Close()
		return fmt.Errorf("rebuild %s: %w", r.Name, err)
	}
	if err := r.writeConf(); err != nil {
		_ = l.Close()
		return err
	}
	if err := primary.syncStandbySlots(ctx); err != nil {
		_ = l.Close()
		return err
	}
	if err := r.Start(ctx); err != nil {
		_ = l.Close()
		return fmt.Errorf("rebuild %s: %w", r.Name, err)
	}
	e.swapReplLink(dc, l)
	return nil
}

// newReplLink is a link to primary for dc's replication, cut and slowed as
// dc's current one is.
func (e *Env) newReplLink(dc *DC, primary *Postgres) (*Link, error) {
	l, err := StartLink(dc.Name+"-replication", primary.Addr())
	if err != nil {
		return nil, err
	}
	if old := dc.ReplLink; old != nil {
		l.SetLatency(old.Latency())
		if old.IsCut() {
			l.Cut()
		}
	}
	return l, nil
}

// swapReplLink makes l dc's replication link and closes the one it had.
func (e *Env) swapReplLink(dc *DC, l *Link) {
	old := dc.ReplLink
	dc.ReplLink = l
	if old != nil && old != l {
		_ = old.Close()
	}
}

// repoint makes dc's replica follow primary through a new link.
func (e *Env) repoint(ctx context.Context, dc *DC, primary *Postgres) error {
	l, err := e.newReplLink(dc, primary)
	if err != nil {
		return err
	}
	if err := dc.Replica.Repoint(ctx, l.Addr); err != nil {
		_ = l.Close()
		return err
	}
	e.swapReplLink(dc, l)
	return nil
}

// Promote promotes a replica with pg_ctl promote and waits until it
// accepts writes.
func (pg *Postgres) Promote(ctx context.Context) error {
	pgctl, err := lookPath("pg_ctl", pg.binDir)
	if err != nil {
		return err
	}
	if err := runAs(ctx, pg.cred, pgctl, "promote", "-D", pg.DataDir, "-w", "-t", "60"); err != nil {
		return fmt.Errorf("promote %s: %w", pg.Name, err)
	}
	for {
		var rec bool
		err := pg.QueryRow(ctx, "SELECT pg_is_in_recovery()", &rec)
		if err == nil && !rec {
			pg.Replica = false
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("promote %s: still in recovery: %w (last error: %v)", pg.Name, ctx.Err(), err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Repoint makes a replica stream from the primary reachable at via
// (host:port) from its slot there, with recovery_target_timeline =
// latest, and restarts it. The slot must exist on that primary.
func (pg *Postgres) Repoint(ctx context.Context, via string) error {
	pg.confMu.Lock()
	defer pg.confMu.Unlock()
	conn, err := pgx.Connect(ctx, pg.DSN(""))
	if err != nil {
		return fmt.Errorf("repoint %s: %w", pg.Name, err)
	}
	defer conn.Close(context.Background())
	for _, q := range []string{
		"ALTER SYSTEM SET primary_conninfo = '" + pg.conninfo(via) + "'",
		"ALTER SYSTEM SET primary_slot_name = '" + pg.Slot + "'",
		"ALTER SYSTEM SET recovery_target_timeline = 'latest'",
	} {
		if _, err := conn.Exec(ctx, q); err != nil {
			return fmt.Errorf("repoint %s: %s: %w", pg.Name, q, err)
		}
	}
	conn.Close(ctx)
	if err := pg.Stop(); err != nil {
		return fmt.Errorf("repoint %s: stop: %w", pg.Name, err)
	}
	if err := pg.Start(ctx); err != nil {
		return fmt.Errorf("repoint %s: %w", pg.Name, err)
	}
	return nil
}

// Timeline is the server's timeline: on a primary the one it writes, on a
// replica the one its WAL receiver streams (or, with no receiver, its last
// restart point's).
func (pg *Postgres) Timeline(ctx context.Context) (uint32, error) {
	var tli int64
	err := pg.QueryRow(ctx, `SELECT CASE WHEN pg_is_in_recovery()
		THEN coalesce((SELECT received_tli FROM pg_stat_wal_receiver), (SELECT timeline_id FROM pg_control_checkpoint()))
		ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint END`, &tli)
	if err != nil {
		return 0, fmt.Errorf("timeline of %s: %w", pg.Name, err)
	}
	return uint32(tli), nil
}

// TimelineHistory reads the history file of the server's timeline from its
// pg_wal: every earlier timeline and where it ended. Timeline 1 has none.
func (pg *Postgres) TimelineHistory(ctx context.Context) ([]TimelineSwitch, error) {
	tli, err := pg.Timeline(ctx)
	if err != nil || tli <= 1 {
		return nil, err
	}
	var text string
	name := filepath.Join("pg_wal", fmt.Sprintf("%08X.history", tli))
	if err := pg.QueryRowArgs(ctx, "SELECT pg_read_file($1)", []any{name}, &text); err != nil {
		return nil, fmt.Errorf("timeline history of %s: %w", pg.Name, err)
	}
	return ParseTimelineHistory(text)
}

// ParseTimelineHistory parses a timeline history file (what pg_wal's
// N.history holds and TIMELINE_HISTORY returns): one line per earlier
// timeline, "parent<TAB>switch LSN<TAB>reason"; # starts a comment.
func ParseTimelineHistory(text string) ([]TimelineSwitch, error) {
	var out []TimelineSwitch
	for _, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.SplitN(line, "\t", 3)
		if len(f) < 2 {
			return nil, fmt.Errorf("testenv: timeline history line %q: want parent, LSN, reason", line)
		}
		p, err := strconv.ParseUint(strings.TrimSpace(f[0]), 10, 32)
		if err != nil {
			return nil, fmt.Errorf("testenv: timeline history line %q: %w", line, err)
		}
		lsn := strings.TrimSpace(f[1])
		if hi, lo, ok := strings.Cut(lsn, "/"); !ok || !isHex(hi) || !isHex(lo) {
			return nil, fmt.Errorf("testenv: timeline history line %q: bad LSN", line)
		}
		ts := TimelineSwitch{Parent: uint32(p), SwitchLSN: lsn}
		if len(f) == 3 {
			ts.Reason = strings.TrimSpace(f[2])
		}
		out = append(out, ts)
	}
	return out, nil
}

func isHex(s string) bool {
	if s == "" || len(s) > 8 {
		return false
	}
	_, err := strconv.ParseUint(s, 16, 32)
	return err == nil
}

// WaitTimeline waits until a replica streams timeline tli or a later one.
func (pg *Postgres) WaitTimeline(ctx context.Context, tli uint32) error {
	for {
		var ok bool
		err := pg.QueryRowArgs(ctx, `SELECT coalesce((SELECT received_tli >= $1 AND status = 'streaming' FROM pg_stat_wal_receiver), false)`,
			[]any{int64(tli)}, &ok)
		if err == nil && ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("replica %s: wait for timeline %d: %w (last error: %v)", pg.Name, tli, ctx.Err(), err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// MultiHostDSN is a libpq URL for database db (default postgres) that lists
// every server and picks the one that accepts writes
// (target_session_attrs=read-write), as a client that rides a failover does.
func MultiHostDSN(db string, servers ...*Postgres) string {
	if db == "" {
		db = "postgres"
	}
	hosts := make([]string, len(servers))
	for i, s := range servers {
		hosts[i] = s.Addr()
	}
	return fmt.Sprintf("postgres://postgres@%s/%s?sslmode=disable&target_session_attrs=read-write", strings.Join(hosts, ","), db)
}
