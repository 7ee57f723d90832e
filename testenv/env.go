// Package testenv runs a real multi-datacenter environment for tests and
// demos: a Postgres primary with logical WAL, one streaming replica per
// datacenter, an embedded nats-server with JetStream per datacenter joined
// by gateways, and memcached servers per datacenter. It injects faults: kill,
// stop and start any server, pause replay on a replica, cut, heal and slow
// down a datacenter's links. It knows nothing of the packages it tests.
package testenv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sync/errgroup"
)

// Options says what to start. The zero value is the default environment:
// two datacenters, each with a replica, a NATS server and two memcached.
type Options struct {
	DCs            int  // datacenters; 0 means 2
	MemcachedPerDC int  // memcached servers per DC; 0 means 2, negative means none
	NoReplicas     bool // start no replicas (a primary only)
	NoNATS         bool // start no NATS servers
	// NATSPerDC is the number of NATS servers in each DC's cluster: 0
	// means 1, an embedded server. With more, each runs as a process (Kill
	// is kill -9), routed to the others of its DC in a cluster named after
	// the DC.
	NATSPerDC  int
	NoPostgres bool // start no Postgres at all (implies NoReplicas)
	// PGVersion is the PostgreSQL major version: 0 means $PGCACHE_PG, or
	// the system's when that is unset; 17 is scripts/setup.sh's npm build.
	PGVersion int
}

// DC is one datacenter's servers and the links that connect it to the others.
type DC struct {
	Name      string // dc1, dc2, ...
	Replica   *Postgres
	NATS      *NATS // the first NATS server: NATSServers[0]
	Memcached []*Memcached
	// NATSServers are every NATS server of the DC's cluster.
	NATSServers []*NATS

	// ReplLink carries the replica's replication connection to the primary.
	ReplLink *Link
	// GatewayLinks carry every NATS gateway connection from and to this DC.
	GatewayLinks []*Link
	// cut is set by Env.Cut and cleared by Env.Heal: a link shared with
	// a DC that is still cut stays cut when another heals.
	cut bool
}

// MemcachedAddrs are the DC's memcached addresses, in order.
func (d *DC) MemcachedAddrs() []string {
	out := make([]string, len(d.Memcached))
	for i, m := range d.Memcached {
		out[i] = m.Addr
	}
	return out
}

// links is every link of the DC.
func (d *DC) links() []*Link {
	out := append([]*Link(nil), d.GatewayLinks...)
	if d.ReplLink != nil {
		out = append(out, d.ReplLink)
	}
	return out
}

// Env is a running environment. Close tears all of it down.
type Env struct {
	Dir     string // the temporary directory that holds every server's files
	Primary *Postgres
	DCs     []*DC
}

// Start brings the environment up. On error everything started is torn down.
func Start(ctx context.Context, opts Options) (env *Env, err error) {
	if opts.DCs <= 0 {
		opts.DCs = 2
	}
	if opts.MemcachedPerDC == 0 {
		opts.MemcachedPerDC = 2
	}
	if opts.NoPostgres {
		opts.NoReplicas = true
	}
	dir, err := os.MkdirTemp("", "pgcache-testenv-")
	if err != nil {
		return nil, fmt.Errorf("testenv dir: %w", err)
	}
	// The postgres user must be able to reach its data directories.
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, fmt.Errorf("testenv dir: %w", err)
	}
	e := &Env{Dir: dir}
	defer func() {
		if err != nil {
			_ = e.Close()
		}
	}()
	for i := 1; i <= opts.DCs; i++ {
		e.DCs = append(e.DCs, &DC{Name: fmt.Sprintf("dc%d", i)})
	}

	g, gctx := errgroup.WithContext(ctx)
	// Postgres primary, then the replicas in parallel.
	g.Go(func() error {
		if opts.NoPostgres {
			return nil
		}
		p, err := StartPrimaryVersion(gctx, opts.PGVersion, "primary", filepath.Join(dir, "primary"))
		if err != nil {
			return err
		}
		e.Primary = p
		if opts.NoReplicas {
			return nil
		}
		rg, rctx := errgroup.WithContext(gctx)
		for _, dc := range e.DCs {
			l, err := StartLink(dc.Name+"-replication", p.Addr())
			if err != nil {
				return err
			}
			dc.ReplLink = l
			rg.Go(func() error {
				r, err := StartReplicaOf(rctx, dc.Name+"-replica", filepath.Join(dir, dc.Name, "replica"), p, l.Addr)
				if err != nil {
					return err
				}
				dc.Replica = r
				return nil
			})
		}
		return rg.Wait()
	})
	// Memcached.
	g.Go(func() error {
		for _, dc := range e.DCs {
			for j := 1; j <= opts.MemcachedPerDC; j++ {
				name := fmt.Sprintf("%s-mc%d", dc.Name, j)
				m, err := StartMemcached(gctx, name, filepath.Join(dir, dc.Name, fmt.Sprintf("mc%d", j)))
				if err != nil {
					return err
				}
				dc.Memcached = append(dc.Memcached, m)
			}
		}
		return nil
	})
	// NATS.
	g.Go(func() error {
		if opts.NoNATS {
			return nil
		}
		return e.startNATS(gctx, opts.NATSPerDC)
	})
	if err := g.Wait(); err != nil {
		return nil, err
	}
	return e, nil
}

// startNATS starts per servers per DC (0 means 1). Every DC a gets its own
// link to each server s of every other DC, which a uses to reach s's
// gateway; cutting a DC cuts every link to and from it. Each server
// advertises the address its first peer DC uses to reach it, so that
// gossip never teaches a peer a direct route around the links. With more
// than two DCs a third DC may learn that address too, so a cut of one DC
// can also slow the others' reconnects. Routes within a DC's cluster are
// direct.
func (e *Env) startNATS(ctx context.Context, per int) error {
	if per <= 0 {
		per = 1
	}
	var bin string
	if per > 1 {
		var err error
		if bin, err = NATSServerBinary(ctx); err != nil {
			return err
		}
	}
	for _, dc := range e.DCs {
		var routes []int
		for i := 1; i <= per; i++ {
			var n *NATS
			var err error
			if per == 1 {
				n, err = newNATS(dc.Name, filepath.Join(e.Dir, dc.Name, "nats"))
			} else {
				name := fmt.Sprintf("%s-nats%d", dc.Name, i)
				n, err = newNATSProcess(name, dc.Name, filepath.Join(e.Dir, dc.Name, name), bin)
			}
			if err != nil {
				return err
			}
			dc.NATSServers = append(dc.NATSServers, n)
			if n.ext != nil {
				routes = append(routes, n.ext.clusterPort)
			}
		}
		dc.NATS = dc.NATSServers[0]
		for _, n := range dc.NATSServers {
			if n.ext != nil {
				n.ext.routes = routes
			}
		}
	}
	// pair[a][s] is the link that DC a uses to reach server s.
	pair := map[string]map[*NATS]*Link{}
	for _, a := range e.DCs {
		pair[a.Name] = map[*NATS]*Link{}
		for _, b := range e.DCs {
			if a == b {
				continue
			}
			for _, s := range b.NATSServers {
				name := a.Name + "-to-" + s.Name + "-gateway"
				l, err := StartLink(name, fmt.Sprintf("127.0.0.1:%d", s.GWPort))
				if err != nil {
					return err
				}
				pair[a.Name][s] = l
				a.GatewayLinks = append(a.GatewayLinks, l)
				b.GatewayLinks = append(b.GatewayLinks, l)
			}
		}
	}
	for _, b := range e.DCs {
		for _, s := range b.NATSServers {
			remotes := map[string][]string{}
			advertise := ""
			for _, a := range e.DCs {
				if a == b {
					continue
				}
				for _, r := range a.NATSServers {
					remotes[a.Name] = append(remotes[a.Name], pair[b.Name][r].Addr)
				}
				if advertise == "" {
					advertise = pair[a.Name][s].Addr
				}
			}
			if err := s.setGateways(advertise, remotes); err != nil {
				return err
			}
		}
	}
	g := errgroup.Group{}
	for _, dc := range e.DCs {
		for _, n := range dc.NATSServers {
			g.Go(n.Start)
		}
	}
	if err := g.Wait(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	for _, dc := range e.DCs {
		for _, n := range dc.NATSServers {
			g.Go(func() error { return n.WaitJetStream(ctx) })
		}
	}
	if err := g.Wait(); err != nil {
		return err
	}
	if per == 1 {
		return nil
	}
	// Answering is not enough for a cluster: until the meta leader sees
	// every server, a stream of per replicas cannot be placed ("peer
	// offline"). Wait until one can, in every DC.
	for _, dc := range e.DCs {
		g.Go(func() error { return dc.NATS.waitPlacement(ctx, dc.Name, per) })
	}
	return g.Wait()
}

// DC returns the datacenter with that name, or nil.
func (e *Env) DC(name string) *DC {
	for _, dc := range e.DCs {
		if dc.Name == name {
			return dc
		}
	}
	return nil
}

// Cut cuts every link of the named DC: its NATS gateway connections and
// its replica's replication connection.
func (e *Env) Cut(dc string) error {
	d := e.DC(dc)
	if d == nil {
		return fmt.Errorf("testenv: no datacenter %q", dc)
	}
	d.cut = true
	for _, l := range d.links() {
		l.Cut()
	}
	return nil
}

// Heal restores every link of the named DC. A link shared with another DC
// that is still cut stays cut.
func (e *Env) Heal(dc string) error {
	d := e.DC(dc)
	if d == nil {
		return fmt.Errorf("testenv: no datacenter %q", dc)
	}
	d.cut = false
	cut := map[*Link]bool{}
	for _, o := range e.DCs {
		if o == d || !o.cut {
			continue
		}
		for _, l := range o.links() {
			cut[l] = true
		}
	}
	for _, l := range d.links() {
		if !cut[l] {
			l.Heal()
		}
	}
	return nil
}

// SetLatency delays every link of the named DC by d in each direction.
func (e *Env) SetLatency(dc string, d time.Duration) error {
	x := e.DC(dc)
	if x == nil {
		return fmt.Errorf("testenv: no datacenter %q", dc)
	}
	for _, l := range x.links() {
		l.SetLatency(d)
	}
	return nil
}

// Close stops every server and link and removes the directory. It is safe
// to call twice.
func (e *Env) Close() error {
	var errs []error
	for _, dc := range e.DCs {
		for _, n := range dc.NATSServers {
			errs = append(errs, n.Close())
		}
	}
	for _, dc := range e.DCs {
		for _, l := range dc.links() {
			errs = append(errs, l.Close()) // Close is idempotent; shared links are closed once
		}
	}
	g := errgroup.Group{}
	for _, dc := range e.DCs {
		if dc.Replica != nil {
			g.Go(dc.Replica.Close)
		}
		for _, m := range dc.Memcached {
			g.Go(m.Close)
		}
	}
	if e.Primary != nil {
		g.Go(e.Primary.Close)
	}
	errs = append(errs, g.Wait())
	if e.Dir != "" {
		errs = append(errs, os.RemoveAll(e.Dir))
	}
	return errors.Join(errs...)
}

// PIDs are the process ids of every running child server, for tests that
// check that nothing is left behind.
func (e *Env) PIDs() []int {
	var out []int
	add := func(pid int) {
		if pid > 0 {
			out = append(out, pid)
		}
	}
	if e.Primary != nil {
		add(e.Primary.PID())
	}
	for _, dc := range e.DCs {
		if dc.Replica != nil {
			add(dc.Replica.PID())
		}
		for _, m := range dc.Memcached {
			add(m.PID())
		}
		for _, n := range dc.NATSServers {
			add(n.PID()) // 0 (skipped) for an embedded server
		}
	}
	return out
}

// Describe lists every endpoint of the environment, one per line.
func (e *Env) Describe() string {
	var b strings.Builder
	if e.Primary != nil {
		fmt.Fprintf(&b, "primary          %s\n", e.Primary.DSN(""))
	}
	for _, dc := range e.DCs {
		if dc.Replica != nil {
			fmt.Fprintf(&b, "%s replica      %s  (replication via link %s)\n", dc.Name, dc.Replica.DSN(""), dc.ReplLink.Addr)
		}
		for _, n := range dc.NATSServers {
			fmt.Fprintf(&b, "%s nats         %s  (server %s, gateway port %d)\n", dc.Name, n.URL(), n.Name, n.GWPort)
		}
		for _, m := range dc.Memcached {
			fmt.Fprintf(&b, "%s memcached    %s\n", dc.Name, m.Addr)
		}
	}
	return b.String()
}
