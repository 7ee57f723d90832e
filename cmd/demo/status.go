package main

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/pgcache/pgcache/testenv"
)

// scrape reads a daemon's metrics, each summed over its labels; empty
// when the daemon does not answer.
func scrape(addr string) map[string]float64 {
	m, err := testenv.Metrics(context.Background(), addr)
	if err != nil {
		return map[string]float64{}
	}
	return m
}

// counterCheck compares one counter with COUNT(*) on the primary; it
// returns "" when the counters table is not there (yet).
func (s *system) counterCheck(ctx context.Context) string {
	var stored, counted int64
	err := s.env.Primary.QueryRow(ctx, "SELECT count(*) FROM likes WHERE post_id = 1", &counted)
	if err != nil {
		return ""
	}
	if err := s.env.Primary.QueryRow(ctx, counterQuery, &stored); err != nil {
		return ""
	}
	return fmt.Sprintf("post 1: counter %d, count(*) %d", stored, counted)
}

// status prints a line a second until ctx ends.
func (s *system) status(ctx context.Context) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	prev := map[string]map[string]float64{}
	var lastCommits, lastLikes int64
	lastReads := map[*dcState][5]int64{}
	for n := 0; ; n++ {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		commits, likes := s.commits.Load(), s.likes.Load()
		line := fmt.Sprintf("%s commits/s %4d likes/s %4d", time.Now().Format("15:04:05"), commits-lastCommits, likes-lastLikes)
		lastCommits, lastLikes = commits, likes
		// The replicas first, then the primary: the lag is never negative.
		replayed := map[*dcState]pglogrepl.LSN{}
		for _, d := range s.dcs {
			var r string
			if d.dc.Replica.QueryRow(ctx, "SELECT pg_last_wal_replay_lsn()::text", &r) == nil {
				replayed[d], _ = pglogrepl.ParseLSN(r)
			}
		}
		var head string
		_ = s.env.Primary.QueryRow(ctx, "SELECT pg_current_wal_lsn()::text", &head)
		headLSN, _ := pglogrepl.ParseLSN(head)
		for _, d := range s.dcs {
			inv, lp := scrape(d.invalidator.http), scrape(d.leaseproxy.http)
			pi, pl := prev[d.invalidator.name], prev[d.leaseproxy.name]
			prev[d.invalidator.name], prev[d.leaseproxy.name] = inv, lp
			rate := func(m, p map[string]float64, name string) float64 {
				if p == nil {
					return 0
				}
				return m[name] - p[name]
			}
			d.mu.Lock()
			p50, p99 := percentiles(d.gone)
			d.gone = d.gone[:0]
			d.mu.Unlock()
			cur := [5]int64{d.reads.Load(), d.hits.Load(), d.fills.Load(), d.refused.Load(), d.readErrs.Load()}
			lr := lastReads[d]
			lastReads[d] = cur
			reads, hits := cur[0]-lr[0], cur[1]-lr[1]
			hit := "-"
			if reads > 0 {
				hit = fmt.Sprintf("%.0f%%", 100*float64(hits)/float64(reads))
			}
			lag := "?"
			if r, ok := replayed[d]; ok && r > 0 && headLSN >= r {
				lag = fmt.Sprintf("%dKB", (headLSN-r)>>10)
			}
			role := "standby"
			if inv["invalidator_slot_active"] > 0 {
				role = "TAILING"
			}
			line += fmt.Sprintf(" | %s %s purged/s %4.0f gone p50 %s p99 %s replica lag %s reads/s %d hit %s herd waits/s %.0f fills/s %d refused %d",
				d.dc.Name, role, rate(inv, pi, "invalidator_keys_purged_total"), p50, p99, lag, reads, hit,
				rate(lp, pl, "leaseproxy_lease_waits_total"), cur[2]-lr[2], cur[3]-lr[3])
			if inv["invalidator_slot_active"] > 0 {
				if _, ok := inv["invalidator_batcher_lag_seconds"]; ok {
					line += fmt.Sprintf(" counter lag %.0fms", 1000*inv["invalidator_batcher_lag_seconds"])
				}
			}
		}
		if paused.Load() {
			line += " | dc2 replay PAUSED"
		}
		fmt.Println(line)
		if n%10 == 9 {
			if c := s.counterCheck(ctx); c != "" {
				fmt.Println("         counters: " + c)
			}
		}
	}
}

// counterQuery reads post 1's like counter the way an application does on
// a cache miss (see package batcher): no COUNT(*).
const counterQuery = "SELECT coalesce((SELECT n FROM pgcache_counters WHERE key = 'post:1:likes'), 0)"
