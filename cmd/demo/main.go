// Command demo runs the local two-datacenter environment with one
// invalidator per datacenter (dc1 tails the primary, both purge) and a
// writer, and shows cached keys disappearing from both datacenters'
// memcached as rows change. It stops cleanly on Ctrl-C.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/testenv"
)

func main() {
	rate := flag.Int("rate", 200, "row updates per second by the writer")
	dur := flag.Duration("duration", 0, "stop after this long (0: until Ctrl-C)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *dur > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *dur)
		defer cancel()
	}
	if err := demo(ctx, *rate); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

const schema = `
CREATE TABLE posts (id bigint PRIMARY KEY, author_id bigint NOT NULL, title text NOT NULL, version int NOT NULL DEFAULT 0);
ALTER TABLE posts REPLICA IDENTITY FULL;
INSERT INTO posts SELECT g, g % 50, 'post ' || g, 0 FROM generate_series(1, 1000) g;
`

func demo(ctx context.Context, rate int) error {
	fmt.Println("starting a two-datacenter environment (Postgres primary + replica per DC, NATS JetStream per DC, memcached per DC)...")
	env, err := testenv.Start(ctx, testenv.Options{})
	if err != nil {
		return err
	}
	defer func() {
		fmt.Println("\nstopping: invalidators drain, then the environment is removed")
		_ = env.Close()
	}()
	fmt.Print(env.Describe())
	if err := env.Primary.Exec(ctx, schema); err != nil {
		return err
	}
	self, _ := os.Executable()
	bin := filepath.Join(filepath.Dir(self), "invalidator")
	var procs []*exec.Cmd
	defer func() {
		for _, p := range procs {
			_ = p.Process.Signal(syscall.SIGTERM)
			_ = p.Wait()
		}
	}()
	for i, dc := range env.DCs {
		cfg := fmt.Sprintf(`dc: %s
postgres: {dsn: %q}
nats: {url: %q, placement: dc1}
tail: %t
purge:
  servers: [%s]
  replica_dsn: %q
rules:
  - table: public.posts
    keys: ["post:{id}", "user_posts:{author_id}"]
messages: {prefix: invalidate}
http: {listen: "127.0.0.1:%d"}
`, dc.Name, env.Primary.DSN(""), dc.NATS.URL(), i == 0, strings.Join(dc.MemcachedAddrs(), ", "), dc.Replica.DSN(""), 9187+i)
		path := filepath.Join(env.Dir, dc.Name+"-invalidator.yaml")
		if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
			return err
		}
		logf, err := os.Create(filepath.Join(env.Dir, dc.Name+"-invalidator.log"))
		if err != nil {
			return err
		}
		cmd := exec.Command(bin, "-config", path)
		cmd.Stdout, cmd.Stderr = logf, logf
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("start %s (build it with make build): %w", bin, err)
		}
		procs = append(procs, cmd)
		fmt.Printf("%s invalidator  pid %d, metrics http://127.0.0.1:%d/metrics, log %s\n", dc.Name, cmd.Process.Pid, 9187+i, logf.Name())
	}
	pools := map[string]*mcpool.Pool{}
	for _, dc := range env.DCs {
		c := mcpool.DefaultConfig()
		c.Servers = dc.MemcachedAddrs()
		p, err := mcpool.New(c, zap.NewNop())
		if err != nil {
			return err
		}
		defer p.Close()
		pools[dc.Name] = p
	}
	fmt.Printf("\nthe writer updates %d posts/s; before each update it caches post:{id} in both DCs,\n", rate)
	fmt.Println("then times how long each DC takes to lose it. Every 20s dc2's replica pauses replay for 3s:")
	fmt.Println("dc2 then holds its purges until the replica has the new row (the LSN gate). Ctrl-C stops.")
	fmt.Println()
	return run(ctx, env, pools, rate)
}

type stats struct {
	mu      sync.Mutex // guards the fields below
	commits int
	purged  map[string][]time.Duration
	waiting map[string]int
}

func run(ctx context.Context, env *testenv.Env, pools map[string]*mcpool.Pool, rate int) error {
	st := &stats{purged: map[string][]time.Duration{}, waiting: map[string]int{}}
	var wg sync.WaitGroup
	defer wg.Wait()
	tick := time.NewTicker(time.Second / time.Duration(max(rate, 1)))
	defer tick.Stop()
	report := time.NewTicker(time.Second)
	defer report.Stop()
	start := time.Now()
	paused := false
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			if paused {
				_ = env.DC("dc2").Replica.ResumeReplay(context.Background())
			}
			return nil
		case <-report.C:
			el := int(time.Since(start).Seconds())
			r := env.DC("dc2").Replica
			switch {
			case el%20 == 10 && !paused:
				if r.PauseReplay(ctx) == nil {
					paused = true
				}
			case el%20 == 13 && paused:
				if r.ResumeReplay(ctx) == nil {
					paused = false
				}
			}
			st.print(paused)
		case <-tick.C:
			id := i%1000 + 1
			key := fmt.Sprintf("post:%d", id)
			for _, p := range pools {
				_, _ = p.MetaSet(ctx, key, []byte("cached"), mcpool.SetOptions{})
			}
			if err := env.Primary.Exec(ctx, "UPDATE posts SET version = version + 1 WHERE id = $1", id); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return err
			}
			committed := time.Now()
			st.mu.Lock()
			st.commits++
			st.mu.Unlock()
			for name, p := range pools {
				wg.Add(1)
				go func() {
					defer wg.Done()
					st.watch(ctx, name, p, key, committed)
				}()
			}
		}
	}
}

// watch polls a DC until key is gone and records how long it took.
func (s *stats) watch(ctx context.Context, dc string, p *mcpool.Pool, key string, committed time.Time) {
	s.mu.Lock()
	s.waiting[dc]++
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.waiting[dc]--
		s.mu.Unlock()
	}()
	for ctx.Err() == nil {
		r, err := p.MetaGet(ctx, key)
		if err == nil && r.Status == mcpool.StatusEN {
			s.mu.Lock()
			s.purged[dc] = append(s.purged[dc], time.Since(committed))
			s.mu.Unlock()
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func (s *stats) print(paused bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	line := fmt.Sprintf("%s commits/s %4d", time.Now().Format("15:04:05"), s.commits)
	for _, dc := range []string{"dc1", "dc2"} {
		d := s.purged[dc]
		slices.Sort(d)
		p50, p99 := "-", "-"
		if len(d) > 0 {
			p50 = d[len(d)/2].Round(100 * time.Microsecond).String()
			p99 = d[len(d)*99/100].Round(100 * time.Microsecond).String()
		}
		line += fmt.Sprintf(" | %s purged %4d (commit->gone p50 %s p99 %s) still cached %d", dc, len(d), p50, p99, s.waiting[dc])
	}
	if paused {
		line += " | dc2 replay PAUSED"
	}
	fmt.Println(line)
	s.commits = 0
	s.purged = map[string][]time.Duration{}
}
