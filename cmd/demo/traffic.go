package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bradfitz/gomemcache/memcache"
	"github.com/jackc/pgx/v5"
	"go.uber.org/zap"

	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/testenv"
)

// system is the running demo: its datacenters and what the traffic saw.
type system struct {
	env *testenv.Env
	dcs []*dcState

	commits atomic.Int64
	likes   atomic.Int64
}

// dcState is one datacenter's daemons and the traffic's figures there.
type dcState struct {
	dc          *testenv.DC
	invalidator *proc
	leaseproxy  *proc
	proxyAddr   string
	direct      *mcpool.Pool // straight to the DC's memcached, to time purges

	reads, hits, fills, refused, readErrs atomic.Int64

	mu   sync.Mutex      // guards gone
	gone []time.Duration // commit to key gone, sampled writes
}

var httpc = &http.Client{Timeout: time.Second}

// waitReady waits until the DC's invalidator answers /readyz.
func (d *dcState) waitReady(ctx context.Context) error {
	for {
		resp, err := httpc.Get("http://" + d.invalidator.http + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if d.invalidator.cmd.ProcessState != nil {
			return fmt.Errorf("%s exited; see its log", d.invalidator.name)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (s *system) run(ctx context.Context, o options) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	errc := make(chan error, 1)
	fail := func(err error) {
		if err != nil && ctx.Err() == nil {
			select {
			case errc <- err:
			default:
			}
			cancel()
		}
	}
	for _, d := range s.dcs {
		mc := memcache.New(d.proxyAddr)
		mc.MaxIdleConns = o.readers
		mc.Timeout = time.Second
		for i := 0; i < o.readers; i++ {
			replica, err := pgx.Connect(ctx, d.dc.Replica.DSN(""))
			if err != nil {
				return err
			}
			defer replica.Close(context.Background())
			wg.Add(1)
			go func() {
				defer wg.Done()
				d.read(ctx, mc, replica)
			}()
		}
		c := mcpool.DefaultConfig()
		c.Servers = d.dc.MemcachedAddrs()
		pool, err := mcpool.New(c, zap.NewNop())
		if err != nil {
			return err
		}
		defer pool.Close()
		d.direct = pool
	}
	var primaries [2]*pgx.Conn
	for i := range primaries {
		c, err := pgx.Connect(ctx, s.env.Primary.DSN(""))
		if err != nil {
			return err
		}
		defer c.Close(context.Background())
		primaries[i] = c
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		fail(s.write(ctx, primaries[0], o.writes))
	}()
	go func() {
		defer wg.Done()
		fail(s.like(ctx, primaries[1], o.likes))
	}()
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.faults(ctx, o.pauseEvery)
	}()
	s.status(ctx)
	cancel()
	select {
	case err := <-errc:
		return err
	default:
		return nil
	}
}

// hotID picks a post: most reads go to ten hot posts, so each of their
// invalidations starts a herd at the leaseproxy.
func hotID() int {
	if rand.IntN(10) < 8 {
		return 1 + rand.IntN(10)
	}
	return 1 + rand.IntN(1000)
}

// read is one reader: get through the DC's leaseproxy; on a miss (a lease
// won) read the row from the DC's replica and set it.
func (d *dcState) read(ctx context.Context, mc *memcache.Client, replica *pgx.Conn) {
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		id := hotID()
		key := "post:" + strconv.Itoa(id)
		d.reads.Add(1)
		if _, err := mc.Get(key); err == nil {
			d.hits.Add(1)
			continue
		} else if !errors.Is(err, memcache.ErrCacheMiss) {
			d.readErrs.Add(1)
			continue
		}
		var version int
		if err := replica.QueryRow(ctx, "SELECT version FROM posts WHERE id = $1", id).Scan(&version); err != nil {
			d.readErrs.Add(1)
			continue
		}
		err := mc.Set(&memcache.Item{Key: key, Value: []byte("v" + strconv.Itoa(version))})
		switch {
		case err == nil:
			d.fills.Add(1)
		case errors.Is(err, memcache.ErrNotStored):
			d.refused.Add(1) // an invalidation landed during the fill
		default:
			d.readErrs.Add(1)
		}
	}
}

// write updates posts at rate a second. Every tenth write first puts a
// marker in post:{id} in every DC, and times how long each DC takes to
// lose it.
func (s *system) write(ctx context.Context, primary *pgx.Conn, rate int) error {
	tick := time.NewTicker(time.Second / time.Duration(max(rate, 1)))
	defer tick.Stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		// One write in five changes a hot post. Samples are cold posts:
		// a hot post's earlier purge, still in flight, would take the
		// marker early.
		id := 11 + rand.IntN(990)
		if i%5 == 0 {
			id = 1 + rand.IntN(10)
		}
		key := "post:" + strconv.Itoa(id)
		marker := []byte("marker-" + strconv.Itoa(i))
		sample := i%10 == 1
		if sample {
			for _, d := range s.dcs {
				_, _ = d.direct.MetaSet(ctx, key, marker, mcpool.SetOptions{})
			}
		}
		if _, err := primary.Exec(ctx, "UPDATE posts SET version = version + 1 WHERE id = $1", id); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		committed := time.Now()
		s.commits.Add(1)
		if !sample {
			continue
		}
		for _, d := range s.dcs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				d.watch(ctx, key, marker, committed)
			}()
		}
	}
}

// watch polls until key no longer holds marker (deleted, or refilled with
// the new row) and records how long that took.
func (d *dcState) watch(ctx context.Context, key string, marker []byte, committed time.Time) {
	for ctx.Err() == nil {
		r, err := d.direct.MetaGet(ctx, key, "v")
		if err == nil && (r.Status == mcpool.StatusEN || string(r.Value) != string(marker)) {
			d.mu.Lock()
			d.gone = append(d.gone, time.Since(committed))
			d.mu.Unlock()
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// like inserts likes at rate a second; one in four is an unlike.
func (s *system) like(ctx context.Context, primary *pgx.Conn, rate int) error {
	if rate <= 0 {
		return nil
	}
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		post, user := 1+rand.IntN(20), rand.IntN(5000)
		sql := "INSERT INTO likes VALUES ($1, $2) ON CONFLICT DO NOTHING"
		if rand.IntN(4) == 0 {
			sql = "DELETE FROM likes WHERE post_id = $1 AND user_id = $2"
		}
		if _, err := primary.Exec(ctx, sql, post, user); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		s.likes.Add(1)
	}
}

// faults pauses dc2's replica replay for 3 s every period.
func (s *system) faults(ctx context.Context, every time.Duration) {
	if every <= 0 || len(s.dcs) < 2 {
		return
	}
	r := s.dcs[1].dc.Replica
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
		if r.PauseReplay(ctx) != nil {
			continue
		}
		paused.Store(true)
		select {
		case <-ctx.Done():
		case <-time.After(3 * time.Second):
		}
		_ = r.ResumeReplay(context.Background())
		paused.Store(false)
	}
}

var paused atomic.Bool

// percentiles returns p50 and p99 of d, sorted in place.
func percentiles(d []time.Duration) (string, string) {
	if len(d) == 0 {
		return "-", "-"
	}
	slices.Sort(d)
	r := func(x time.Duration) string { return x.Round(100 * time.Microsecond).String() }
	return r(d[len(d)/2]), r(d[len(d)*99/100])
}
