package chaos

import (
	"context"
	"errors"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bradfitz/gomemcache/memcache"
	"github.com/jackc/pgx/v5"
	"github.com/pgcache/pgcache/testenv"
)

// WorkloadConfig configures a Workload.
type WorkloadConfig struct {
	PrimaryDSN string
	// DCs are the readers' datacenters: each reads through its leaseproxy
	// and fills from its replica.
	DCs []WorkloadDC
	// Items is the number of rows at start (ids 1..Items); inserts take
	// ids above.
	Items int
	// Writers and ReadersPerDC are goroutine counts; default 2 and 4.
	Writers      int
	ReadersPerDC int
	// WritePause is each writer's pause between writes; default 10ms.
	WritePause time.Duration
	// ReadPause is each reader's pause between reads; default 2ms.
	ReadPause time.Duration
	// Likes adds likes and unlikes (feeding the likes counter) to the
	// writes, and reads of likes:{id} to the reads.
	Likes bool
}

// WorkloadDC is one datacenter's entry points.
type WorkloadDC struct {
	Name       string
	ProxyAddr  string // the DC's leaseproxy
	ReplicaDSN string // the DC's replica
}

// WorkloadStats are the workload's counts.
type WorkloadStats struct {
	Reads, Hits, Fills, FillsRefused, ReadErrors int64
	// NoRow counts misses of deleted (or never inserted) rows: nothing
	// to fill. SlowFills counts fills dropped because the replica read
	// took longer than the lease.
	NoRow, SlowFills                          int64
	Updates, Inserts, Deletes, Likes, Unlikes int64
	WriteErrors                               int64
}

// Writes is the sum of committed writes.
func (s WorkloadStats) Writes() int64 {
	return s.Updates + s.Inserts + s.Deletes + s.Likes + s.Unlikes
}

// Workload writes to the primary and reads cache-aside in every DC. It
// logs the key of every committed write for the lost-invalidation check.
type Workload struct {
	cfg WorkloadConfig

	reads, hits, fills, refused, readErrs atomic.Int64
	noRow, slowFills                      atomic.Int64
	updates, inserts, deletes, likes      atomic.Int64
	unlikes, writeErrs                    atomic.Int64
	nextID                                atomic.Int64

	mu      sync.Mutex // guards written
	written map[string][]WriteMark
}

// WriteMark is where a write committed, as far as the workload can tell:
// the WAL position its server reported just after the commit (an upper
// bound of the commit's) and that server's port. After a failover, a write
// marked on the old primary past the switch may be one the new primary
// never received: its row does not exist, so no invalidation is owed.
type WriteMark struct {
	LSN  uint64
	Port int
}

// NewWorkload returns a Workload; Run runs it.
func NewWorkload(cfg WorkloadConfig) *Workload {
	if cfg.Writers <= 0 {
		cfg.Writers = 2
	}
	if cfg.ReadersPerDC <= 0 {
		cfg.ReadersPerDC = 4
	}
	if cfg.WritePause <= 0 {
		cfg.WritePause = 10 * time.Millisecond
	}
	if cfg.ReadPause <= 0 {
		cfg.ReadPause = 2 * time.Millisecond
	}
	w := &Workload{cfg: cfg, written: map[string][]WriteMark{}}
	w.nextID.Store(int64(cfg.Items))
	return w
}

// SetNextID makes inserts take ids above id (when a previous workload
// inserted rows).
func (w *Workload) SetNextID(id int64) {
	if id > w.nextID.Load() {
		w.nextID.Store(id)
	}
}

// MaxID is the highest id the workload may have written.
func (w *Workload) MaxID() int64 { return w.nextID.Load() }

// Stats returns the counts so far.
func (w *Workload) Stats() WorkloadStats {
	return WorkloadStats{
		Reads: w.reads.Load(), Hits: w.hits.Load(), Fills: w.fills.Load(), FillsRefused: w.refused.Load(), ReadErrors: w.readErrs.Load(),
		NoRow: w.noRow.Load(), SlowFills: w.slowFills.Load(),
		Updates: w.updates.Load(), Inserts: w.inserts.Load(), Deletes: w.deletes.Load(), Likes: w.likes.Load(), Unlikes: w.unlikes.Load(),
		WriteErrors: w.writeErrs.Load(),
	}
}

// Written returns the keys of every committed write (item:{id}, and
// likes:{id} for likes when counters run), each with where its writes
// committed.
func (w *Workload) Written() map[string][]WriteMark {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make(map[string][]WriteMark, len(w.written))
	for k, m := range w.written {
		out[k] = append([]WriteMark(nil), m...)
	}
	return out
}

// wrote records a committed write of key, with the position its server
// reports now.
func (w *Workload) wrote(ctx context.Context, db *connPool, key string) {
	var mark WriteMark
	var lsn string
	if err := db.queryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text, inet_server_port()`, nil, &lsn, &mark.Port); err == nil {
		mark.LSN, _ = testenv.ParseLSN(lsn) // 0 when unreadable
	}
	w.mu.Lock()
	w.written[key] = append(w.written[key], mark)
	w.mu.Unlock()
}

// Run runs writers and readers until ctx ends. Errors (a server down
// during a fault) are counted and retried, never returned.
func (w *Workload) Run(ctx context.Context) error {
	primary := newConnPool(w.cfg.PrimaryDSN, w.cfg.Writers)
	defer primary.Close()
	var wg sync.WaitGroup
	for i := 0; i < w.cfg.Writers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.writer(ctx, primary)
		}()
	}
	for _, dc := range w.cfg.DCs {
		replica := newConnPool(dc.ReplicaDSN, w.cfg.ReadersPerDC)
		defer replica.Close()
		mc := memcache.New(dc.ProxyAddr)
		mc.Timeout = 2 * time.Second
		mc.MaxIdleConns = w.cfg.ReadersPerDC
		for i := 0; i < w.cfg.ReadersPerDC; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				w.reader(ctx, mc, replica)
			}()
		}
	}
	wg.Wait()
	return nil
}

// pick returns a row id, skewed so that a quarter of the rows get most of
// the traffic (hot keys that are cached when they are written).
func (w *Workload) pick() int64 {
	n := w.nextID.Load()
	if rand.IntN(4) > 0 {
		return 1 + rand.Int64N(max(n/4, 1))
	}
	return 1 + rand.Int64N(max(n, 1))
}

func (w *Workload) writer(ctx context.Context, db *connPool) {
	for ctx.Err() == nil {
		var err error
		x := rand.IntN(100)
		switch {
		case x < 70 || (!w.cfg.Likes && x < 90):
			id := w.pick()
			var tag int64
			tag, err = db.exec(ctx, "UPDATE items SET version = version + 1 WHERE id = $1", id)
			if err == nil && tag > 0 {
				w.updates.Add(1)
				w.wrote(ctx, db, itemKey(id))
			}
		case x < 75 || (!w.cfg.Likes && x < 95):
			id := w.nextID.Add(1)
			_, err = db.exec(ctx, "INSERT INTO items (id, version) VALUES ($1, 1)", id)
			if err == nil {
				w.inserts.Add(1)
				w.wrote(ctx, db, itemKey(id))
			}
		case x < 78 || !w.cfg.Likes:
			id := 1 + rand.Int64N(max(w.nextID.Load(), 1))
			var tag int64
			tag, err = db.exec(ctx, "DELETE FROM items WHERE id = $1", id)
			if err == nil && tag > 0 {
				w.deletes.Add(1)
				w.wrote(ctx, db, itemKey(id))
			}
		case x < 92:
			id := w.pick()
			_, err = db.exec(ctx, "INSERT INTO likes (item_id) VALUES ($1)", id)
			if err == nil {
				w.likes.Add(1)
				w.wrote(ctx, db, "likes:"+strconv.FormatInt(id, 10))
			}
		default:
			var id int64
			err = db.queryRow(ctx, "DELETE FROM likes WHERE id = (SELECT min(id) FROM likes WHERE item_id = $1) RETURNING item_id", []any{w.pick()}, &id)
			if errors.Is(err, pgx.ErrNoRows) {
				err = nil
			} else if err == nil {
				w.unlikes.Add(1)
				w.wrote(ctx, db, "likes:"+strconv.FormatInt(id, 10))
			}
		}
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			w.writeErrs.Add(1)
			sleep(ctx, 100*time.Millisecond)
			continue
		}
		sleep(ctx, w.cfg.WritePause)
	}
}

func itemKey(id int64) string { return "item:" + strconv.FormatInt(id, 10) }

// reader reads cache-aside through the proxy. On a miss (the proxy's lease
// winner, or a waiter whose wait ran out) it reads the row from its DC's
// replica and sets it; the proxy turns the set into a fill checked against
// the lease, so a fill that raced with an invalidation is refused. A fill
// that took longer than the lease's TTL is dropped, as a careful client
// does: without a lease the proxy could store it unchecked.
func (w *Workload) reader(ctx context.Context, mc *memcache.Client, replica *connPool) {
	for ctx.Err() == nil {
		sleep(ctx, w.cfg.ReadPause)
		id := w.pick()
		key, sql := itemKey(id), "SELECT version::text FROM items WHERE id = $1"
		var arg any = id
		if w.cfg.Likes && rand.IntN(4) == 0 {
			key = "likes:" + strconv.FormatInt(id, 10)
			sql = "SELECT coalesce((SELECT n FROM " + counterTbl + " WHERE key = $1), 0)::text"
			arg = key
		}
		w.reads.Add(1)
		start := time.Now()
		_, err := mc.Get(key)
		if err == nil {
			w.hits.Add(1)
			continue
		}
		if !errors.Is(err, memcache.ErrCacheMiss) {
			w.readErrs.Add(1)
			sleep(ctx, 50*time.Millisecond)
			continue
		}
		qctx, cancel := context.WithTimeout(ctx, time.Second)
		var v string
		err = replica.queryRow(qctx, sql, []any{arg}, &v)
		cancel()
		if errors.Is(err, pgx.ErrNoRows) {
			w.noRow.Add(1) // deleted: nothing to cache
			continue
		}
		if err != nil {
			if ctx.Err() == nil {
				w.readErrs.Add(1)
			}
			continue
		}
		if time.Since(start) > 1500*time.Millisecond {
			w.slowFills.Add(1)
			continue
		}
		err = mc.Set(&memcache.Item{Key: key, Value: []byte(v)})
		switch {
		case err == nil:
			w.fills.Add(1)
		case errors.Is(err, memcache.ErrNotStored):
			w.refused.Add(1)
		default:
			w.readErrs.Add(1)
		}
	}
}
