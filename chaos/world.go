package chaos

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/testenv"
)

// Names the world gives the database objects and cache keys of the
// workload.
const (
	Slot        = "cache_invalidator"
	Stream      = "INVALIDATIONS"
	CounterName = "item_likes"
	counterTbl  = "pgcache_counters"
)

// schema is the workload's tables. likes needs REPLICA IDENTITY FULL so
// that a DELETE carries item_id, the counter's group.
const schema = `
CREATE TABLE IF NOT EXISTS items (id bigint PRIMARY KEY, version bigint NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS likes (id bigserial PRIMARY KEY, item_id bigint NOT NULL);
ALTER TABLE likes REPLICA IDENTITY FULL;
`

// WorkloadRules are the checker's rules for the workload's keys (the
// built-in mode of cmd/chaos check).
func WorkloadRules() []Rule {
	return []Rule{
		{Key: "item:{id}", SQL: "SELECT version::text FROM items WHERE id = $1::bigint", Compare: CompareVersion},
		{Key: "likes:{item_id}", SQL: "SELECT coalesce((SELECT n FROM " + counterTbl + " WHERE key = 'likes:' || $1::text), 0)::text", Compare: CompareEqual},
	}
}

// WorldConfig says how to run the daemons over an environment.
type WorldConfig struct {
	Bins testenv.Binaries
	// Dir holds the daemons' configs and logs.
	Dir string
	// Items is the number of rows items starts with; default 300.
	Items int
	// Counters asks for the likes counter (used only when the
	// invalidator's config supports counters:).
	Counters bool
	// BrokenPurgeDC, when set, points that DC's purger at a decoy
	// memcached instead of the DC's pool: the negative control, whose
	// verdict must be STALE for that DC.
	BrokenPurgeDC string
	// Geo runs the per-datacenter layout (nats.datacenters, replicas 3,
	// copy_timeout 20s) on an environment started with EnvOptions(true):
	// each DC a three-server NATS cluster with its own stream.
	Geo bool
	// Writers is the workload's writer count; 0 means the workload's
	// default (2).
	Writers int
}

// EnvOptions is the environment a world needs: with geo, a three-server
// NATS cluster in each datacenter.
func EnvOptions(geo bool) testenv.Options {
	if geo {
		return testenv.Options{NATSPerDC: 3}
	}
	return testenv.Options{}
}

// World is an environment with the real daemons running on it: dc1's
// invalidator tails and purges, dc2's purges, and a second tail-capable
// invalidator in dc2 is the slot's hot standby; one leaseproxy per DC.
// Every memcached is reached through a Link (so that it can be slowed),
// by the purgers and the proxies alike.
type World struct {
	Env *testenv.Env
	cfg WorldConfig
	log *zap.Logger

	// Links are the links in front of each DC's memcached, in order.
	Links map[string][]*testenv.Link
	// Tails are the tail-capable invalidators: "dc1" and "dc2-standby".
	Tails []*testenv.Daemon
	// Purgers are the purging invalidators by DC (dc1's also tails).
	Purgers map[string]*testenv.Daemon
	// Proxies are the leaseproxies by DC, ProxyAddr their listeners.
	Proxies   map[string]*testenv.Daemon
	ProxyAddr map[string]string
	// CountersOn says whether the likes counter runs; CountersNote why not.
	CountersOn   bool
	CountersNote string

	pools  map[string]*mcpool.Pool   // through the links, hashed as the purger
	direct map[string][]*mcpool.Pool // one per memcached, bypassing links
	procs  []*testenv.Daemon
	decoy  *testenv.Memcached
	maxID  int64 // highest item id any workload may have written
	// failedOver is set by the failover scenario.
	failedOver *failedOver
	// lost are the datacenters lost for good (i-dc-loss).
	lost map[string]bool

	notesMu  sync.Mutex // guards notes, measures
	notes    map[string]int
	measures []string
	nc       *nats.Conn
	js       jetstream.JetStream
}

// StartWorld creates the schema and starts the daemons on env. Close
// stops them (not env).
func StartWorld(ctx context.Context, env *testenv.Env, cfg WorldConfig, log *zap.Logger) (_ *World, err error) {
	if cfg.Items <= 0 {
		cfg.Items = 300
	}
	if len(env.DCs) < 2 {
		return nil, fmt.Errorf("%w: the world needs two datacenters", ErrConfig)
	}
	w := &World{Env: env, cfg: cfg, log: log, Links: map[string][]*testenv.Link{}, Purgers: map[string]*testenv.Daemon{},
		Proxies: map[string]*testenv.Daemon{}, ProxyAddr: map[string]string{}, pools: map[string]*mcpool.Pool{}, direct: map[string][]*mcpool.Pool{},
		lost: map[string]bool{}}
	defer func() {
		if err != nil {
			w.Close()
		}
	}()
	w.maxID = int64(cfg.Items)
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, err
	}
	if err := env.Primary.Exec(ctx, schema); err != nil {
		return nil, err
	}
	if err := env.Primary.Exec(ctx, "INSERT INTO items SELECT g, 1 FROM generate_series(1, $1::int) g ON CONFLICT DO NOTHING", cfg.Items); err != nil {
		return nil, err
	}
	for _, dc := range env.DCs {
		var addrs []string
		for _, m := range dc.Memcached {
			l, err := testenv.StartLink(dc.Name+"-"+m.Name+"-link", m.Addr)
			if err != nil {
				return nil, err
			}
			w.Links[dc.Name] = append(w.Links[dc.Name], l)
			addrs = append(addrs, l.Addr)
			p, err := newPool([]string{m.Addr}, log)
			if err != nil {
				return nil, err
			}
			w.direct[dc.Name] = append(w.direct[dc.Name], p)
		}
		p, err := newPool(addrs, log)
		if err != nil {
			return nil, err
		}
		w.pools[dc.Name] = p
	}
	if cfg.BrokenPurgeDC != "" {
		w.decoy, err = testenv.StartMemcached(ctx, "decoy", filepath.Join(cfg.Dir, "decoy"))
		if err != nil {
			return nil, err
		}
	}
	if cfg.Counters {
		w.CountersOn, w.CountersNote = countersSupported(ctx, cfg.Bins.Invalidator, cfg.Dir, env)
	} else {
		w.CountersNote = "n/a (counters not requested)"
	}
	// Invalidators.
	dc1, dc2 := env.DCs[0], env.DCs[1]
	add := func(p *testenv.Daemon, err error) (*testenv.Daemon, error) {
		if err != nil {
			return nil, err
		}
		p.Supervise = true // as systemd's Restart=on-failure
		w.procs = append(w.procs, p)
		return p, p.Start()
	}
	port, err := testenv.FreePort()
	if err != nil {
		return nil, err
	}
	p, err := add(testenv.NewDaemon("invalidator-dc1", cfg.Bins.Invalidator, cfg.Dir, w.invalidatorConfig(dc1, true, true, port), port, log, "-drain-timeout", "20s"))
	if err != nil {
		return nil, err
	}
	w.Tails = append(w.Tails, p)
	w.Purgers[dc1.Name] = p
	if port, err = testenv.FreePort(); err != nil {
		return nil, err
	}
	if p, err = add(testenv.NewDaemon("invalidator-dc2", cfg.Bins.Invalidator, cfg.Dir, w.invalidatorConfig(dc2, false, true, port), port, log, "-drain-timeout", "20s")); err != nil {
		return nil, err
	}
	w.Purgers[dc2.Name] = p
	if port, err = testenv.FreePort(); err != nil {
		return nil, err
	}
	if p, err = add(testenv.NewDaemon("invalidator-dc2-standby", cfg.Bins.Invalidator, cfg.Dir, w.invalidatorConfig(dc2, true, false, port), port, log, "-drain-timeout", "20s")); err != nil {
		return nil, err
	}
	w.Tails = append(w.Tails, p)
	// Leaseproxies.
	for _, dc := range env.DCs[:2] {
		lport, err := testenv.FreePort()
		if err != nil {
			return nil, err
		}
		hport, err := testenv.FreePort()
		if err != nil {
			return nil, err
		}
		addr := "127.0.0.1:" + strconv.Itoa(lport)
		var servers []string
		for _, l := range w.Links[dc.Name] {
			servers = append(servers, l.Addr)
		}
		conf := fmt.Sprintf("listen: %s\nservers: [%s]\nhash: ketama\nlease: {ttl: 2s, wait: 250ms}\nhttp: {listen: \"127.0.0.1:%d\"}\nlog: {level: warn}\n",
			addr, strings.Join(servers, ", "), hport)
		p, err := add(testenv.NewDaemon("leaseproxy-"+dc.Name, cfg.Bins.Leaseproxy, cfg.Dir, conf, hport, log))
		if err != nil {
			return nil, err
		}
		w.Proxies[dc.Name], w.ProxyAddr[dc.Name] = p, addr
	}
	w.nc, err = nats.Connect(w.natsURL(), nats.MaxReconnects(-1), nats.ReconnectWait(200*time.Millisecond))
	if err != nil {
		return nil, fmt.Errorf("connect nats: %w", err)
	}
	if w.js, err = jetstream.New(w.nc); err != nil {
		return nil, err
	}
	if err := w.waitReady(ctx); err != nil {
		return nil, err
	}
	return w, nil
}

func newPool(servers []string, log *zap.Logger) (*mcpool.Pool, error) {
	c := mcpool.DefaultConfig()
	c.Servers = servers
	c.Timeout = 2 * time.Second
	return mcpool.New(c, log.Named("pool"))
}

// invalidatorConfig is the YAML of one invalidator in dc.
func (w *World) invalidatorConfig(dc *testenv.DC, tail, purge bool, httpPort int) string {
	var b strings.Builder
	// Every server that may become primary, as a deployment that rides a
	// failover lists them; a lost slot (a promotion before PostgreSQL 17)
	// is recovered with one flush of every pool.
	fmt.Fprintf(&b, "dc: %s\npostgres: {dsn: %q, slot: %s, publication: cache_invalidator}\non_slot_loss: flush\n", dc.Name, w.PrimaryDSN(), Slot)
	if w.cfg.Geo {
		var names []string
		for _, d := range w.Env.DCs[:2] {
			names = append(names, d.Name)
		}
		fmt.Fprintf(&b, "nats: {url: %q, stream: %s, replicas: 3, datacenters: [%s], durable_dcs: 2, copy_timeout: 20s}\ntail: %t\n",
			dc.NATSURL(), Stream, strings.Join(names, ", "), tail)
	} else {
		fmt.Fprintf(&b, "nats: {url: %q, stream: %s, placement: %s}\ntail: %t\n", dc.NATS.URL(), Stream, w.Env.DCs[0].Name, tail)
	}
	if purge {
		var servers []string
		for _, l := range w.Links[dc.Name] {
			servers = append(servers, l.Addr)
		}
		if dc.Name == w.cfg.BrokenPurgeDC {
			servers = []string{w.decoy.Addr}
		}
		fmt.Fprintf(&b, "purge:\n  servers: [%s]\n  hash: ketama\n  replica_dsn: %q\n  gate_max_wait: 120s\n", strings.Join(servers, ", "), dc.Replica.DSN(""))
	}
	b.WriteString("rules:\n  - table: public.items\n    keys: [\"item:{id}\"]\nmessages: {prefix: invalidate}\n")
	if w.CountersOn && tail {
		// Counters run with the tail role: every tail-capable process
		// has the same counters (the standby takes them over with the slot).
		b.WriteString(countersYAML)
	}
	fmt.Fprintf(&b, "http: {listen: \"127.0.0.1:%d\"}\n", httpPort)
	return b.String()
}

const countersYAML = `counters:
  - name: ` + CounterName + `
    table: public.likes
    group_by: [item_id]
    key: "likes:{item_id}"
batcher: {interval: 100ms}
`

// countersSupported asks the built invalidator whether its config knows
// counters: by validating a config that uses them (invalidator check).
// Only the "unknown field" answer means unsupported; anything else that
// fails is reported in the note and counters stay off.
func countersSupported(ctx context.Context, bin, dir string, env *testenv.Env) (bool, string) {
	cfg := fmt.Sprintf("dc: probe\npostgres: {dsn: %q}\ntail: true\nrules:\n  - table: public.items\n    keys: [\"item:{id}\"]\nmessages: {prefix: invalidate}\n%shttp: {listen: \"off\"}\n",
		env.Primary.DSN(""), countersYAML)
	path := filepath.Join(dir, "counters-probe.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		return false, "n/a (" + err.Error() + ")"
	}
	out, err := exec.CommandContext(ctx, bin, "check", "-config", path).CombinedOutput()
	switch {
	case err == nil:
		return true, ""
	case strings.Contains(string(out), "field counters not found"):
		return false, "n/a (counters not built)"
	default:
		return false, fmt.Sprintf("n/a (invalidator check with counters failed: %s)", firstLine(string(out)))
	}
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

// waitReady waits until a key emitted in a message is purged in both DCs
// (or, for a broken purger, in the others) and the proxies listen.
func (w *World) waitReady(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	for dc, addr := range w.ProxyAddr {
		for {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				c.Close()
				break
			}
			if ctx.Err() != nil {
				return fmt.Errorf("leaseproxy %s not listening: %w\n%s", dc, err, w.Proxies[dc].LogTail(2048))
			}
			sleep(ctx, 50*time.Millisecond)
		}
	}
	for i := 0; ; i++ {
		key := fmt.Sprintf("chaos-probe-%d", i)
		var dcs []string
		for _, dc := range w.liveDCs() {
			if dc.Name == w.cfg.BrokenPurgeDC {
				continue
			}
			if _, err := w.pools[dc.Name].MetaSet(ctx, key, []byte("x"), mcpool.SetOptions{}); err == nil {
				dcs = append(dcs, dc.Name)
			}
		}
		_ = w.Env.Primary.Exec(ctx, "SELECT pg_logical_emit_message(true, 'invalidate', $1::text)", key)
		for end := time.Now().Add(3 * time.Second); time.Now().Before(end); sleep(ctx, 50*time.Millisecond) {
			gone := 0
			for _, dc := range dcs {
				r, err := w.pools[dc].MetaGet(ctx, key, "v")
				if err == nil && r.Status == mcpool.StatusEN {
					gone++
				}
			}
			if len(dcs) == 2-boolInt(w.cfg.BrokenPurgeDC != "") && gone == len(dcs) {
				return nil
			}
		}
		if ctx.Err() != nil {
			var logs strings.Builder
			for _, p := range w.procs {
				fmt.Fprintf(&logs, "=== %s\n%s\n", p.Name, p.LogTail(3000))
			}
			return fmt.Errorf("daemons not ready: an emitted key was never purged: %w\n%s", ctx.Err(), logs.String())
		}
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// Close stops every daemon, link and pool of the world (not the env).
func (w *World) Close() {
	for _, p := range w.procs {
		_ = p.Kill()
	}
	for _, ls := range w.Links {
		for _, l := range ls {
			_ = l.Close()
		}
	}
	for _, p := range w.pools {
		_ = p.Close()
	}
	for _, ps := range w.direct {
		for _, p := range ps {
			_ = p.Close()
		}
	}
	if w.decoy != nil {
		_ = w.decoy.Close()
	}
	if w.nc != nil {
		w.nc.Close()
	}
}

// Logs is the end of every daemon's log, for a failure report.
func (w *World) Logs(n int) string {
	var b strings.Builder
	for _, p := range w.procs {
		fmt.Fprintf(&b, "=== %s (last %d bytes)\n%s\n", p.Name, n, p.LogTail(n))
	}
	return b.String()
}

// Exits sums the daemons' exits that no fault caused, with a summary.
func (w *World) Exits() (int, string) {
	n := 0
	var parts []string
	for _, p := range w.procs {
		if e, last := p.Exits(); e > 0 {
			n += e
			parts = append(parts, fmt.Sprintf("%s x%d (%s)", p.Name, e, last))
		}
	}
	return n, strings.Join(parts, "; ")
}

// ActiveTail returns the invalidator that holds the slot, or nil.
func (w *World) ActiveTail(ctx context.Context) *testenv.Daemon {
	for _, p := range w.Tails {
		if v, err := p.Metric(ctx, "invalidator_slot_active"); err == nil && v == 1 {
			return p
		}
	}
	return nil
}

// primary opens a connection to the primary, retrying while it restarts.
func (w *World) primary(ctx context.Context) (*pgx.Conn, error) {
	for {
		c, err := pgx.Connect(ctx, w.Env.Primary.DSN(""))
		if err == nil {
			return c, nil
		}
		if ctx.Err() != nil {
			return nil, err
		}
		sleep(ctx, 200*time.Millisecond)
	}
}

// ErrNotDrained reports a pipeline that did not catch up in time.
var ErrNotDrained = errors.New("chaos: pipeline not drained")

// CaughtUp waits until every invalidation committed before lsn is applied
// in every DC: the slot's confirmed LSN has reached lsn (so the stream
// holds every batch up to it), then every purge consumer's ack floor has
// reached the stream's last sequence as read then.
func (w *World) CaughtUp(ctx context.Context, lsn string) error {
	conn, err := w.primary(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	for {
		var ok bool
		err := conn.QueryRow(ctx, "SELECT coalesce(confirmed_flush_lsn >= $1::pg_lsn, false) FROM pg_replication_slots WHERE slot_name = $2", lsn, Slot).Scan(&ok)
		if err == nil && ok {
			break
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%w: slot confirmed LSN below %s: %v", ErrNotDrained, lsn, err)
		}
		if conn.IsClosed() || (err != nil && !errors.Is(err, pgx.ErrNoRows)) {
			conn.Close(context.Background())
			if conn, err = w.primary(ctx); err != nil {
				return err
			}
		}
		sleep(ctx, 100*time.Millisecond)
	}
	for _, dc := range w.liveDCs() {
		stream := w.streamOf(dc.Name)
		var last uint64
		for {
			s, err := w.js.Stream(ctx, stream)
			if err == nil {
				var info *jetstream.StreamInfo
				if info, err = s.Info(ctx); err == nil {
					last = info.State.LastSeq
					break
				}
			}
			if ctx.Err() != nil {
				return fmt.Errorf("%w: stream %s info: %v", ErrNotDrained, stream, err)
			}
			sleep(ctx, 200*time.Millisecond)
		}
		name := "purge-" + dc.Name
		for {
			c, err := w.js.Consumer(ctx, stream, name)
			var info *jetstream.ConsumerInfo
			if err == nil {
				info, err = c.Info(ctx)
			}
			if err == nil && info.AckFloor.Stream >= last && info.NumAckPending == 0 {
				break
			}
			if ctx.Err() != nil {
				if info != nil {
					return fmt.Errorf("%w: %s ack floor %d, stream last %d, ack pending %d", ErrNotDrained, name, info.AckFloor.Stream, last, info.NumAckPending)
				}
				return fmt.Errorf("%w: %s: %v", ErrNotDrained, name, err)
			}
			sleep(ctx, 100*time.Millisecond)
		}
	}
	return nil
}

// CurrentLSN is the primary's WAL position, retried while it restarts.
func (w *World) CurrentLSN(ctx context.Context) (string, error) {
	for {
		lsn, err := w.Env.Primary.CurrentLSN(ctx)
		if err == nil {
			return lsn, nil
		}
		if ctx.Err() != nil {
			return "", err
		}
		sleep(ctx, 200*time.Millisecond)
	}
}

// StreamLastSeq is the last sequence of the stream the checker reads.
func (w *World) StreamLastSeq(ctx context.Context) (uint64, error) {
	s, err := w.js.Stream(ctx, w.readStream())
	if err != nil {
		return 0, err
	}
	info, err := s.Info(ctx)
	if err != nil {
		return 0, err
	}
	return info.State.LastSeq, nil
}

// Drift is the counters' disagreement with the truth.
type Drift struct {
	Groups int   // groups whose counter differs from SELECT count(*)
	Sum    int64 // sum of |counter - count|
}

// CounterDrift compares every likes counter with SELECT count(*) of its
// group on the primary.
func (w *World) CounterDrift(ctx context.Context) (Drift, error) {
	conn, err := w.primary(ctx)
	if err != nil {
		return Drift{}, err
	}
	defer conn.Close(context.Background())
	var d Drift
	err = conn.QueryRow(ctx, `
SELECT count(*), coalesce(sum(abs(coalesce(l.n, 0) - coalesce(c.n, 0))), 0)::bigint
FROM (SELECT 'likes:' || item_id AS k, count(*) AS n FROM likes GROUP BY item_id) l
FULL JOIN (SELECT key AS k, n FROM `+counterTbl+` WHERE counter = $1) c ON l.k = c.k
WHERE coalesce(l.n, 0) <> coalesce(c.n, 0)`, CounterName).Scan(&d.Groups, &d.Sum)
	if err != nil {
		return d, fmt.Errorf("counter drift: %w", err)
	}
	return d, nil
}

// StaleKey is one cached value that disagrees with the primary.
type StaleKey struct {
	DC, Server, Key, Cached, Want string
}

func (s StaleKey) String() string {
	want := strconv.Quote(s.Want)
	if s.Want == "" {
		want = "no row"
	}
	return fmt.Sprintf("%s %s %s=%q want %s", s.DC, s.Server, s.Key, s.Cached, want)
}

// Scan reads every key of the workload's keyspace (item:1..maxID and,
// with counters, likes:1..maxID) from every memcached server of both DCs
// directly, and returns each value that differs from the primary. Run it
// once the pipeline has caught up with the workload stopped: then every
// cached value must equal the row's current value.
func (w *World) Scan(ctx context.Context, maxID int64) ([]StaleKey, error) {
	conn, err := w.primary(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Close(context.Background())
	want := map[string]string{}
	rows, err := conn.Query(ctx, "SELECT id, version FROM items")
	if err != nil {
		return nil, err
	}
	for rows.Next() {
		var id, v int64
		if err := rows.Scan(&id, &v); err != nil {
			return nil, err
		}
		want["item:"+strconv.FormatInt(id, 10)] = strconv.FormatInt(v, 10)
		maxID = max(maxID, id)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	keys := make([]string, 0, 2*maxID)
	for id := int64(1); id <= maxID; id++ {
		keys = append(keys, "item:"+strconv.FormatInt(id, 10))
	}
	if w.CountersOn {
		for id := int64(1); id <= maxID; id++ {
			k := "likes:" + strconv.FormatInt(id, 10)
			keys = append(keys, k)
			want[k] = "0"
		}
		rows, err := conn.Query(ctx, "SELECT key, n FROM "+counterTbl+" WHERE counter = $1", CounterName)
		if err != nil {
			return nil, err
		}
		for rows.Next() {
			var k string
			var n int64
			if err := rows.Scan(&k, &n); err != nil {
				return nil, err
			}
			want[k] = strconv.FormatInt(n, 10)
		}
		if err := rows.Err(); err != nil {
			return nil, err
		}
	}
	var out []StaleKey
	for _, dc := range w.liveDCs() {
		for i, p := range w.direct[dc.Name] {
			// A server just restarted (or resumed) may take a moment
			// before the pool reconnects and its breaker closes: read it
			// again for up to 30 s before the scan fails.
			var resps []mcpool.Response
			var errs []error
			for deadline := time.Now().Add(30 * time.Second); ; {
				resps, errs = p.MetaGetMulti(ctx, keys, "v")
				failed := slices.IndexFunc(errs, func(err error) bool { return err != nil })
				if failed < 0 || !mcpool.Retryable(errs[failed]) || time.Now().After(deadline) || ctx.Err() != nil {
					break
				}
				sleep(ctx, 200*time.Millisecond)
			}
			for j, r := range resps {
				if errs[j] != nil {
					return nil, fmt.Errorf("scan %s %s %s: %w", dc.Name, dc.Memcached[i].Addr, keys[j], errs[j])
				}
				if r.Status != mcpool.StatusVA || len(r.Value) == 0 || r.Stale {
					continue
				}
				if w, ok := want[keys[j]]; !ok || string(r.Value) != w {
					out = append(out, StaleKey{DC: dc.Name, Server: dc.Memcached[i].Addr, Key: keys[j], Cached: string(r.Value), Want: want[keys[j]]})
				}
			}
		}
	}
	return out, nil
}

// PrimaryDSN lists every server that may be the primary, with
// target_session_attrs=read-write: whichever accepts writes, before and
// after a failover.
func (w *World) PrimaryDSN() string {
	servers := []*testenv.Postgres{w.Env.Primary}
	for _, dc := range w.Env.DCs {
		if dc.Replica != nil && dc.Replica != w.Env.Primary {
			servers = append(servers, dc.Replica)
		}
	}
	return testenv.MultiHostDSN("", servers...)
}

// CheckerConfig is a checker over this world's stream, pools and the
// workload's rules.
func (w *World) CheckerConfig() CheckerConfig {
	c := DefaultCheckerConfig()
	c.PrimaryDSN = w.PrimaryDSN()
	c.NATSURL = w.natsURL()
	c.Stream = w.readStream()
	for _, dc := range w.liveDCs() {
		var servers []string
		for _, l := range w.Links[dc.Name] {
			servers = append(servers, l.Addr)
		}
		c.Pools = append(c.Pools, Pool{DC: dc.Name, Servers: servers, Hash: mcpool.HashKetama})
	}
	c.Rules = WorkloadRules()
	return c
}

// note counts one fault event for the report ("kill -9 invalidator-dc1").
func (w *World) note(event string) {
	w.notesMu.Lock()
	defer w.notesMu.Unlock()
	if w.notes == nil {
		w.notes = map[string]int{}
	}
	w.notes[event]++
}

// Measure records a figure a fault measured, for the report.
func (w *World) Measure(m string) {
	w.notesMu.Lock()
	defer w.notesMu.Unlock()
	w.measures = append(w.measures, m)
}

// takeMeasures returns the figures since the last call.
func (w *World) takeMeasures() []string {
	w.notesMu.Lock()
	defer w.notesMu.Unlock()
	m := w.measures
	w.measures = nil
	return m
}

// takeNotes returns the fault events since the last call, sorted.
func (w *World) takeNotes() []string {
	w.notesMu.Lock()
	defer w.notesMu.Unlock()
	out := make([]string, 0, len(w.notes))
	for e, n := range w.notes {
		out = append(out, fmt.Sprintf("%s x%d", e, n))
	}
	sort.Strings(out)
	w.notes = nil
	return out
}

// liveDCs are the world's two datacenters, less any lost for good.
func (w *World) liveDCs() []*testenv.DC {
	var out []*testenv.DC
	for _, dc := range w.Env.DCs[:2] {
		if !w.lost[dc.Name] {
			out = append(out, dc)
		}
	}
	return out
}

// natsURL is where the world reads the stream: dc1's server, or, in the
// per-datacenter world, every server of dc2's cluster (dc2 outlives dc1).
func (w *World) natsURL() string {
	if w.cfg.Geo {
		return w.Env.DCs[1].NATSURL()
	}
	return w.Env.DCs[0].NATS.URL()
}

// streamOf is the stream datacenter dc purges from.
func (w *World) streamOf(dc string) string {
	if w.cfg.Geo {
		return Stream + "_" + dc
	}
	return Stream
}

// readStream is the stream the checker reads: the one stream, or dc2's
// copy of every origin in the per-datacenter world.
func (w *World) readStream() string { return w.streamOf(w.Env.DCs[1].Name) }

// purgedIn emits a fresh key as an invalidation message on the primary
// until one is gone from dc's pool, and returns when it was seen gone.
func (w *World) purgedIn(ctx context.Context, dc string, timeout time.Duration) (time.Time, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for i := 0; ; i++ {
		key := fmt.Sprintf("chaos-resume-%d-%d", time.Now().UnixNano(), i)
		if _, err := w.pools[dc].MetaSet(ctx, key, []byte("x"), mcpool.SetOptions{}); err == nil {
			if conn, err := pgx.Connect(ctx, w.PrimaryDSN()); err == nil {
				_, err = conn.Exec(ctx, "SELECT pg_logical_emit_message(true, 'invalidate', $1::text)", key)
				conn.Close(context.Background())
				for end := time.Now().Add(5 * time.Second); err == nil && time.Now().Before(end) && ctx.Err() == nil; sleep(ctx, 20*time.Millisecond) {
					if r, err := w.pools[dc].MetaGet(ctx, key, "v"); err == nil && r.Status == mcpool.StatusEN {
						return time.Now(), nil
					}
				}
			}
		}
		if ctx.Err() != nil {
			return time.Time{}, fmt.Errorf("no key emitted on the primary was purged in %s within %s", dc, timeout)
		}
		sleep(ctx, 200*time.Millisecond)
	}
}
