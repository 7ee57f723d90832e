// Command demo runs the whole system on one machine: two datacenters
// (a Postgres primary, a replica, NATS JetStream and two memcached per
// DC), an invalidator per DC (both may tail: one holds the slot, the
// other is its hot standby; both purge their DC), a leaseproxy per DC,
// and app-like traffic: writers, readers that go through their DC's
// leaseproxy and fill from their DC's replica, and likes that feed a
// counter. A status line every second shows the system at work. Ctrl-C
// stops it cleanly.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/pgcache/pgcache/testenv"
)

func main() {
	o := options{}
	flag.IntVar(&o.writes, "rate", 200, "post updates per second")
	flag.IntVar(&o.readers, "readers", 8, "readers per datacenter")
	flag.IntVar(&o.likes, "likes", 100, "likes (and some unlikes) per second")
	flag.DurationVar(&o.pauseEvery, "pause-every", 20*time.Second, "pause dc2's replica replay this often for 3s (0: never)")
	dur := flag.Duration("duration", 0, "stop after this long (0: until Ctrl-C)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *dur > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *dur)
		defer cancel()
	}
	if err := demo(ctx, o); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

type options struct {
	writes, readers, likes int
	pauseEvery             time.Duration
}

const schema = `
CREATE TABLE posts (id bigint PRIMARY KEY, author_id bigint NOT NULL, title text NOT NULL, version int NOT NULL DEFAULT 0);
ALTER TABLE posts REPLICA IDENTITY FULL;
INSERT INTO posts SELECT g, g % 50, 'post ' || g, 0 FROM generate_series(1, 1000) g;
CREATE TABLE likes (post_id bigint NOT NULL, user_id bigint NOT NULL, PRIMARY KEY (post_id, user_id));
ALTER TABLE likes REPLICA IDENTITY FULL;
`

// proc is one of the demo's daemons.
type proc struct {
	name string
	cmd  *exec.Cmd
	http string // its /metrics address
}

func demo(ctx context.Context, o options) error {
	self, _ := os.Executable()
	binDir := filepath.Dir(self)
	for _, b := range []string{"invalidator", "leaseproxy"} {
		if _, err := os.Stat(filepath.Join(binDir, b)); err != nil {
			return fmt.Errorf("%s is not next to the demo binary (build all with make build): %w", b, err)
		}
	}
	fmt.Println("starting two datacenters: a Postgres primary, and per DC a replica, NATS JetStream and two memcached...")
	env, err := testenv.Start(ctx, testenv.Options{})
	if err != nil {
		return err
	}
	defer func() {
		fmt.Println("\nstopping: the daemons drain, then the environment is removed")
		_ = env.Close()
	}()
	fmt.Print(env.Describe())
	if err := env.Primary.Exec(ctx, schema); err != nil {
		return err
	}
	var procs []*proc
	defer func() {
		for _, p := range procs {
			_ = p.cmd.Process.Signal(syscall.SIGTERM)
		}
		for _, p := range procs {
			_ = p.cmd.Wait()
		}
	}()
	start := func(name, bin, config string) (*proc, error) {
		path := filepath.Join(env.Dir, name+".yaml")
		if err := os.WriteFile(path, []byte(config), 0o600); err != nil {
			return nil, err
		}
		logf, err := os.Create(filepath.Join(env.Dir, name+".log"))
		if err != nil {
			return nil, err
		}
		cmd := exec.Command(filepath.Join(binDir, bin), "-config", path)
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			return nil, fmt.Errorf("start %s: %w", name, err)
		}
		p := &proc{name: name, cmd: cmd}
		procs = append(procs, p)
		return p, nil
	}
	sys := &system{env: env}
	for i, dc := range env.DCs {
		port, err := testenv.FreePort()
		if err != nil {
			return err
		}
		inv, err := start(dc.Name+"-invalidator", "invalidator", invalidatorConfig(env, dc, port))
		if err != nil {
			return err
		}
		inv.http = fmt.Sprintf("127.0.0.1:%d", port)
		lport, err := testenv.FreePort()
		if err != nil {
			return err
		}
		hport, err := testenv.FreePort()
		if err != nil {
			return err
		}
		lp, err := start(dc.Name+"-leaseproxy", "leaseproxy", fmt.Sprintf(`listen: 127.0.0.1:%d
servers: [%s]
hash: ketama
lease: {ttl: 2s, wait: 250ms, stale: true}
http: {listen: 127.0.0.1:%d}
`, lport, strings.Join(dc.MemcachedAddrs(), ", "), hport))
		if err != nil {
			return err
		}
		lp.http = fmt.Sprintf("127.0.0.1:%d", hport)
		d := &dcState{dc: dc, invalidator: inv, leaseproxy: lp, proxyAddr: fmt.Sprintf("127.0.0.1:%d", lport)}
		sys.dcs = append(sys.dcs, d)
		if i == 0 {
			// dc1 takes the slot first; the others then wait as standbys.
			if err := d.waitReady(ctx); err != nil {
				return err
			}
		}
		role := "tails (holds the slot) and purges dc1"
		if i > 0 {
			role = "hot standby for the slot, purges " + dc.Name
		}
		fmt.Printf("%s invalidator pid %d: %s; metrics http://%s/metrics\n", dc.Name, inv.cmd.Process.Pid, role, inv.http)
		fmt.Printf("%s leaseproxy  pid %d: memcached protocol on %s; metrics http://%s/metrics\n", dc.Name, lp.cmd.Process.Pid, sys.dcs[i].proxyAddr, lp.http)
	}
	fmt.Printf("logs and configs: %s\n\n", env.Dir)
	for _, d := range sys.dcs {
		if err := d.waitReady(ctx); err != nil {
			return err
		}
	}
	fmt.Printf(`traffic: %d post updates/s on the primary; %d readers per DC read post:{id} through their
DC's leaseproxy (hot posts get most reads) and fill misses from their DC's replica; %d likes/s
feed the post_likes counter. Every %s dc2's replica pauses replay for 3 s: dc2 then holds its
purges until the replica has the new row (the LSN gate), while dc1 goes on. Ctrl-C stops.

`, o.writes, o.readers, o.likes, o.pauseEvery)
	return sys.run(ctx, o)
}

// invalidatorConfig tails in every DC (one holds the slot, the others
// wait as hot standbys) and purges the DC's own pool.
func invalidatorConfig(env *testenv.Env, dc *testenv.DC, port int) string {
	return fmt.Sprintf(`dc: %s
postgres: {dsn: %q}
nats: {url: %q, placement: dc1}
tail: true
purge:
  servers: [%s]
  replica_dsn: %q
rules:
  - table: public.posts
    keys: ["post:{id}", "user_posts:{author_id}"]
messages: {prefix: invalidate}
counters:
  - name: post_likes
    table: public.likes
    group_by: [post_id]
    key: "post:{post_id}:likes"
http: {listen: "127.0.0.1:%d"}
`, dc.Name, env.Primary.DSN(""), dc.NATS.URL(), strings.Join(dc.MemcachedAddrs(), ", "), dc.Replica.DSN(""), port)
}
