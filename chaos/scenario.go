package chaos

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/pgcache/pgcache/testenv"
	"go.uber.org/zap"
)

// Timing is how long each phase of a scenario lasts.
type Timing struct {
	Warmup    time.Duration // workload before the fault
	Fault     time.Duration // length of a repeated fault (kills, lag spikes, slowness)
	Outage    time.Duration // one server down (NATS, memcached)
	Partition time.Duration // a DC cut off
	Period    time.Duration // between kills or lag spikes
	After     time.Duration // workload after the fault ends
	Delay     time.Duration // the checker's M
	Converge  time.Duration // the longest wait for the pipeline to catch up
}

// String lists the phases, for the report.
func (t Timing) String() string {
	return fmt.Sprintf("warmup %s, Fault %s, Outage %s, Partition %s, Period %s, after %s, M (checker delay) %s, convergence limit %s",
		t.Warmup, t.Fault, t.Outage, t.Partition, t.Period, t.After, t.Delay, t.Converge)
}

// ShortTiming is the short form (the Go test): a few seconds per fault.
func ShortTiming() Timing {
	return Timing{Warmup: 2 * time.Second, Fault: 6 * time.Second, Outage: 4 * time.Second, Partition: 6 * time.Second,
		Period: 2 * time.Second, After: 2 * time.Second, Delay: 2 * time.Second, Converge: 4 * time.Minute}
}

// FullTiming is the full form (cmd/chaos): 30 to 60 s per scenario.
func FullTiming() Timing {
	return Timing{Warmup: 5 * time.Second, Fault: 40 * time.Second, Outage: 10 * time.Second, Partition: 30 * time.Second,
		Period: 5 * time.Second, After: 5 * time.Second, Delay: 5 * time.Second, Converge: 5 * time.Minute}
}

// Scenario is one fault under the workload.
type Scenario struct {
	Name  string // short id, e.g. "a-kill-tailer"
	Fault string // what is done, for the report
	// Inject runs the fault and returns once it has ended (everything
	// restarted or healed), with the number of faults injected.
	Inject func(ctx context.Context, w *World, t Timing, log *zap.Logger) (int, error)
	// Geo: the scenario runs in the per-datacenter world (WorldConfig.Geo:
	// each DC a three-server NATS cluster with its own stream).
	Geo bool
}

// Scenarios are (a) to (g) of issue 7, in order.
func Scenarios() []Scenario {
	return []Scenario{
		{Name: "a-kill-tailer", Fault: "kill -9 the active tailing invalidator every Period, restart it (dc2 standby takes the slot)", Inject: killTailer},
		{Name: "b-nats-dc2-restart", Fault: "stop NATS in dc2 for Outage, start it again; repeated while Fault lasts", Inject: natsRestart},
		{Name: "c-partition-dc2", Fault: "cut every link of dc2 (gateways, replication) for Partition, heal", Inject: partition},
		{Name: "d1-memcached-kill", Fault: "kill -9 one dc2 memcached for Outage, start it empty", Inject: memcachedDown(false)},
		{Name: "d2-memcached-pause", Fault: "SIGSTOP one dc2 memcached for Outage, SIGCONT (data kept)", Inject: memcachedDown(true)},
		{Name: "d3-memcached-paused-long", Fault: "SIGSTOP one dc1 memcached for 2 x Fault under the workload, SIGCONT (data kept): the other server's keys keep their latency, the paused one's are recorded and applied on its return", Inject: memcachedPausedLong},
		{Name: "e-replica-lag", Fault: "pause replay on a replica (dc2, then dc1, ...) for Period, resume, repeatedly", Inject: replicaLag},
		{Name: "f-primary-restart", Fault: "restart the Postgres primary (fast shutdown, start) twice", Inject: primaryRestart},
		{Name: "g-slow-memcached", Fault: "50ms latency each way on dc1's first memcached link for Fault", Inject: slowMemcached},
		// Last: it changes which server is the primary.
		{Name: "h-primary-failover", Fault: "kill -9 the primary under load, promote the replica that received the most WAL, repoint the other", Inject: primaryFailover},
		// The per-datacenter world (nats.datacenters, replicas 3).
		{Name: "j-nats-server-kill", Geo: true, Fault: "kill -9 the leader server of dc1's stream (R3 in dc1's three-server cluster) every Period under the workload, start it again after Outage", Inject: natsServerKill},
		// Last: dc1 does not come back.
		{Name: "i-dc-loss", Geo: true, Fault: "kill -9 every process of dc1 (the primary, its replica, its three NATS servers, its memcached, invalidator and leaseproxy) under the workload, promote dc2's replica", Inject: dcLoss},
	}
}

// dcLoss loses the datacenter of the primary and the active tail (dc1):
// every process of it is killed at once, as a power loss would, and dc2's
// replica is promoted (what Patroni would do). dc2's invalidator, its hot
// standby tail and its leaseproxy go on: the standby takes the slot on
// the new primary (a failover slot on PostgreSQL 17; before, the slot is
// lost and every pool flushed once), and dc2's purger reads dc2's copy of
// the stream. The time from the loss until dc2 purges again is recorded;
// then dc2's invalidators are killed and started again, which must work
// without dc1 too.
func dcLoss(ctx context.Context, w *World, t Timing, log *zap.Logger) (int, error) {
	sleep(ctx, t.Period)
	dc1, dc2 := w.Env.DCs[0], w.Env.DCs[1]
	lostAt := time.Now()
	w.lost[dc1.Name] = true
	for _, p := range []*testenv.Daemon{w.Purgers[dc1.Name], w.Proxies[dc1.Name]} {
		_ = p.Kill()
	}
	// The primary is dc1's: kill it with the rest (Failover kills it
	// again, harmlessly, and promotes dc2's replica).
	if err := dc1.KillNATS(); err != nil {
		log.Warn("kill dc1's NATS", zap.Error(err))
	}
	for _, m := range dc1.Memcached {
		_ = m.Kill()
	}
	if err := dc1.Replica.Kill(); err != nil {
		log.Warn("kill dc1's replica", zap.Error(err))
	}
	w.note("kill -9 every process of dc1")
	fo, err := w.Env.Failover(ctx, testenv.FailoverOptions{Target: dc2.Replica})
	if err != nil {
		return 1, fmt.Errorf("promote dc2's replica: %w", err)
	}
	switchLSN, err := testenv.ParseLSN(fo.SwitchLSN)
	if err != nil {
		return 1, err
	}
	w.failedOver = &failedOver{oldPort: fo.OldPrimary.Port, switchLSN: switchLSN}
	log.Info("dc1 lost; dc2's replica promoted", zap.Uint32("timeline", fo.Timeline), zap.String("switch_lsn", fo.SwitchLSN),
		zap.Duration("promoted_in", fo.Promoted))
	// Purging resumed in dc2: a key emitted on the new primary is gone
	// from dc2's pool.
	// Twice: the first key may go with the flush of every pool that a
	// lost slot (before PostgreSQL 17) brings; the second is purged by
	// its own invalidation.
	var resumed time.Time
	for range 2 {
		if resumed, err = w.purgedIn(ctx, dc2.Name, 3*time.Minute); err != nil {
			return 1, fmt.Errorf("dc2 after the loss of dc1: %w", err)
		}
	}
	after := resumed.Sub(lostAt)
	w.Measure(fmt.Sprintf("%s purged again %s after the loss of %s (promotion took %s)", dc2.Name, after.Round(10*time.Millisecond), dc1.Name, fo.Promoted.Round(10*time.Millisecond)))
	log.Info("dc2 purges again", zap.Duration("since_the_loss", after))
	// The survivors' processes must also start again without dc1: kill
	// -9 dc2's purger and its tail (which now holds the slot), start
	// them, and see dc2 purge once more.
	restarted := time.Now()
	for _, p := range []*testenv.Daemon{w.Purgers[dc2.Name], w.Tails[1]} {
		if err := p.Kill(); err != nil {
			return 1, err
		}
		w.note("kill -9 " + p.Name + " after the loss")
		if err := p.Start(); err != nil {
			return 1, err
		}
	}
	if resumed, err = w.purgedIn(ctx, dc2.Name, 3*time.Minute); err != nil {
		return 1, fmt.Errorf("dc2's restarted invalidators after the loss of dc1: %w", err)
	}
	w.Measure(fmt.Sprintf("%s's invalidators, killed and started again without %s, purged again after %s", dc2.Name, dc1.Name, resumed.Sub(restarted).Round(10*time.Millisecond)))
	sleep(ctx, t.Period)
	return 1, ctx.Err()
}

// Baseline is the workload with no fault, for comparison and for the
// negative control.
func Baseline() Scenario {
	return Scenario{Name: "baseline", Fault: "none (workload only, for Fault)", Inject: func(ctx context.Context, _ *World, t Timing, _ *zap.Logger) (int, error) {
		sleep(ctx, t.Fault)
		return 0, ctx.Err()
	}}
}

// SelectScenarios returns the scenarios whose names start with one of the
// comma-separated prefixes ("a,c,d1"); "" or "all" selects every one.
func SelectScenarios(list string) ([]Scenario, error) {
	if list == "" || list == "all" {
		return Scenarios(), nil
	}
	all := append([]Scenario{Baseline()}, Scenarios()...)
	var out []Scenario
	for _, want := range strings.Split(list, ",") {
		want = strings.TrimSpace(want)
		found := false
		for _, s := range all {
			if s.Name == want || strings.HasPrefix(s.Name, want+"-") {
				out = append(out, s)
				found = true
			}
		}
		if !found {
			return nil, fmt.Errorf("%w: no scenario %q", ErrConfig, want)
		}
	}
	return out, nil
}

func killTailer(ctx context.Context, w *World, t Timing, log *zap.Logger) (int, error) {
	n := 0
	end := time.Now().Add(t.Fault)
	for time.Now().Before(end) && ctx.Err() == nil {
		p := w.ActiveTail(ctx)
		if p == nil {
			sleep(ctx, 200*time.Millisecond)
			continue
		}
		log.Info("kill -9 active tailer", zap.String("proc", p.Name))
		if err := p.Kill(); err != nil {
			return n, err
		}
		w.note("kill -9 " + p.Name)
		n++
		sleep(ctx, 500*time.Millisecond)
		if err := p.Start(); err != nil {
			return n, err
		}
		sleep(ctx, t.Period)
	}
	return n, ctx.Err()
}

func natsRestart(ctx context.Context, w *World, t Timing, log *zap.Logger) (int, error) {
	n := w.Env.DCs[1].NATS
	count := 0
	for end := time.Now().Add(t.Fault); count == 0 || time.Until(end) >= t.Outage; {
		log.Info("stop NATS", zap.String("dc", w.Env.DCs[1].Name))
		if err := n.Stop(); err != nil {
			return count, err
		}
		count++
		sleep(ctx, t.Outage)
		if err := n.Start(); err != nil {
			return count, err
		}
		if ctx.Err() != nil {
			return count, ctx.Err()
		}
		sleep(ctx, t.Period)
	}
	return count, nil
}

func partition(ctx context.Context, w *World, t Timing, log *zap.Logger) (int, error) {
	dc := w.Env.DCs[1].Name
	log.Info("cut", zap.String("dc", dc))
	if err := w.Env.Cut(dc); err != nil {
		return 0, err
	}
	sleep(ctx, t.Partition)
	return 1, w.Env.Heal(dc)
}

// memcachedPausedLong pauses one of dc1's servers for twice the fault
// time (80 s in the full form): long past the purger's RecordAfter, so
// its keys go to the backlog while the live server's are purged as usual.
func memcachedPausedLong(ctx context.Context, w *World, t Timing, log *zap.Logger) (int, error) {
	m := w.Env.DCs[0].Memcached[0]
	log.Info("pause memcached", zap.String("server", m.Name), zap.Duration("for", 2*t.Fault))
	if err := m.Pause(); err != nil {
		return 0, err
	}
	sleep(ctx, 2*t.Fault)
	return 1, m.Resume()
}

func memcachedDown(pause bool) func(ctx context.Context, w *World, t Timing, log *zap.Logger) (int, error) {
	return func(ctx context.Context, w *World, t Timing, log *zap.Logger) (int, error) {
		m := w.Env.DCs[1].Memcached[0]
		if pause {
			log.Info("pause memcached", zap.String("server", m.Name))
			if err := m.Pause(); err != nil {
				return 0, err
			}
			sleep(ctx, t.Outage)
			return 1, m.Resume()
		}
		log.Info("kill memcached", zap.String("server", m.Name))
		if err := m.Kill(); err != nil {
			return 0, err
		}
		sleep(ctx, t.Outage)
		return 1, m.Start(context.WithoutCancel(ctx))
	}
}

func replicaLag(ctx context.Context, w *World, t Timing, log *zap.Logger) (int, error) {
	n := 0
	end := time.Now().Add(t.Fault)
	for i := 0; time.Now().Before(end) && ctx.Err() == nil; i++ {
		dc := w.Env.DCs[1-i%2]
		r := dc.Replica
		log.Info("pause replay", zap.String("dc", dc.Name))
		if err := r.PauseReplay(ctx); err != nil {
			return n, err
		}
		n++
		sleep(ctx, t.Period)
		if err := r.ResumeReplay(context.WithoutCancel(ctx)); err != nil {
			return n, err
		}
		sleep(ctx, t.Period/2)
	}
	return n, ctx.Err()
}

func primaryRestart(ctx context.Context, w *World, t Timing, log *zap.Logger) (int, error) {
	n := 0
	for i := 0; i < 2 && ctx.Err() == nil; i++ {
		log.Info("restart primary")
		if err := w.Env.Primary.Stop(); err != nil {
			return n, err
		}
		n++
		sleep(ctx, 2*time.Second)
		if err := w.Env.Primary.Start(context.WithoutCancel(ctx)); err != nil {
			return n, err
		}
		sleep(ctx, t.Period)
	}
	return n, ctx.Err()
}

// primaryFailover kills the primary and promotes a replica (testenv's
// Failover: as Patroni would). Commits the old primary acknowledged and no
// replica received are lost; keys the tail published of them are purged
// again (timeline switch), or, before PostgreSQL 17, the slot is lost and
// every pool is flushed once (on_slot_loss: flush).
func primaryFailover(ctx context.Context, w *World, t Timing, log *zap.Logger) (int, error) {
	sleep(ctx, t.Period)
	fo, err := w.Env.Failover(ctx, testenv.FailoverOptions{})
	if err != nil {
		return 0, err
	}
	switchLSN, err := testenv.ParseLSN(fo.SwitchLSN)
	if err != nil {
		return 1, err
	}
	w.failedOver = &failedOver{oldPort: fo.OldPrimary.Port, switchLSN: switchLSN}
	log.Info("failed over", zap.String("new_primary", fo.NewPrimary.Name), zap.Uint32("timeline", fo.Timeline),
		zap.String("switch_lsn", fo.SwitchLSN), zap.Duration("promoted_in", fo.Promoted))
	sleep(ctx, t.Period)
	return 1, ctx.Err()
}

// coveredByFlush reports whether every write of a key came before a flush
// announced on the stream: on the old primary (before a failover), or at
// or before the flush's position.
func (w *World) coveredByFlush(marks []WriteMark, flushes []uint64) bool {
	if len(flushes) == 0 || len(marks) == 0 {
		return false
	}
	last := slices.Max(flushes)
	for _, m := range marks {
		onOld := w.failedOver != nil && m.Port == w.failedOver.oldPort
		if !onOld && (m.LSN == 0 || m.LSN > last) {
			return false
		}
	}
	return true
}

// failedOver is what the lost-invalidation check needs of a failover.
type failedOver struct {
	oldPort   int
	switchLSN uint64
}

// lostInFailover reports whether every write of a key may have been lost
// by a failover: committed on the old primary past the switch, or with a
// position the workload could not read (the server was going away).
func (w *World) lostInFailover(marks []WriteMark) bool {
	fo := w.failedOver
	if fo == nil || len(marks) == 0 {
		return false
	}
	for _, m := range marks {
		if m.LSN != 0 && (m.Port != fo.oldPort || m.LSN <= fo.switchLSN) {
			return false
		}
	}
	return true
}

func slowMemcached(ctx context.Context, w *World, t Timing, log *zap.Logger) (int, error) {
	l := w.Links[w.Env.DCs[0].Name][0]
	log.Info("slow memcached link", zap.String("link", l.Name))
	l.SetLatency(50 * time.Millisecond)
	sleep(ctx, t.Fault)
	l.SetLatency(0)
	return 1, nil
}

// Result is one scenario's outcome.
type Result struct {
	Scenario string
	Fault    string
	Faults   int
	Events   []string // fault events by kind, e.g. "kill -9 invalidator-dc1 x4"
	Took     time.Duration
	Stats    WorkloadStats
	Check    CheckReport
	// Stale are the cached values that differ from the primary once the
	// pipeline caught up with the workload stopped.
	Stale     []StaleKey
	StaleByDC map[string]int
	// LostStream counts written keys that never reached the stream;
	// LostApplied counts written keys left stale in some DC (their purge
	// was not applied there). Lost is their sum.
	LostStream, LostApplied, Lost int
	// LostInFailover counts written keys not in the stream whose every
	// write committed on the old primary past the promotion's switch
	// point, as far as the workload can tell: writes the failover lost,
	// not invalidations.
	LostInFailover int
	// CoveredByFlush counts written keys not in the stream whose every
	// write came before a flush of every pool announced on the stream.
	CoveredByFlush int
	LostKeys       []string // the first few lost keys
	// Drift is nil when counters did not run (DriftNote says why).
	Drift     *Drift
	DriftNote string
	// Converge is how long after the fault ended every DC had applied
	// every invalidation committed before it ended.
	Converge    time.Duration
	ConvergeErr error
	// Measures are what the fault measured ("dc2 purged again 4.2s after
	// the loss of dc1"), for the report.
	Measures []string
	Exits    int
	ExitNote string
	Err      error
	Pass     bool
	Reasons  []string
}

// Run runs one scenario on the world: the checker and the workload, the
// fault, the quiesce (workload stopped, pipeline caught up) and the
// verdict. The world must be quiet when it starts.
func (w *World) Run(ctx context.Context, sc Scenario, t Timing, log *zap.Logger) (res Result) {
	log = log.Named(sc.Name)
	start := time.Now()
	res = Result{Scenario: sc.Name, Fault: sc.Fault, StaleByDC: map[string]int{}}
	defer func() {
		res.Took = time.Since(start)
		res.verdict()
	}()
	exits0, _ := w.Exits()
	last, err := w.StreamLastSeq(ctx)
	if err != nil {
		res.Err = fmt.Errorf("stream: %w", err)
		return res
	}
	ccfg := w.CheckerConfig()
	ccfg.Delay, ccfg.SampleRate, ccfg.StartSeq, ccfg.RecordKeys = t.Delay, 0.3, last+1, true
	checker, err := NewChecker(ccfg, log)
	if err != nil {
		res.Err = err
		return res
	}
	cctx, stopChecker := context.WithCancel(ctx)
	defer stopChecker()
	checkerDone := make(chan error, 1)
	go func() { checkerDone <- checker.Run(cctx) }()

	wl := NewWorkload(w.WorkloadConfig())
	wl.SetNextID(w.maxID)
	wctx, stopWorkload := context.WithCancel(ctx)
	defer stopWorkload()
	workloadDone := make(chan error, 1)
	go func() { workloadDone <- wl.Run(wctx) }()

	sleep(ctx, t.Warmup)
	w.takeNotes()
	w.takeMeasures()
	res.Faults, res.Err = sc.Inject(ctx, w, t, log)
	res.Events = w.takeNotes()
	res.Measures = w.takeMeasures()
	faultEnd := time.Now()
	convergeDone := make(chan struct{})
	go func() {
		defer close(convergeDone)
		c, cancel := context.WithTimeout(ctx, t.Converge)
		defer cancel()
		lsn, err := w.CurrentLSN(c)
		if err == nil {
			err = w.CaughtUp(c, lsn)
		}
		res.Converge, res.ConvergeErr = time.Since(faultEnd), err
	}()
	sleep(ctx, t.After)
	stopWorkload()
	if err := <-workloadDone; err != nil && res.Err == nil {
		res.Err = fmt.Errorf("workload: %w", err)
	}
	res.Stats = wl.Stats()
	if d := time.Since(start).Seconds(); d > 0 {
		res.Measures = append(res.Measures, fmt.Sprintf("workload: %.0f commits/s over the scenario", float64(res.Stats.Writes())/d))
	}
	w.maxID = max(w.maxID, wl.MaxID())
	log.Info("workload stopped; quiescing", zap.Any("stats", res.Stats))

	qctx, cancel := context.WithTimeout(ctx, t.Converge)
	defer cancel()
	if w.CountersOn {
		// The batcher flushes within its interval; wait for the counts
		// to settle before the final drain (the drift is judged after).
		for end := time.Now().Add(30 * time.Second); time.Now().Before(end); sleep(qctx, 200*time.Millisecond) {
			if d, err := w.CounterDrift(qctx); err == nil && d.Groups == 0 {
				break
			}
		}
	}
	lsn, err := w.CurrentLSN(qctx)
	if err == nil {
		err = w.CaughtUp(qctx, lsn)
	}
	<-convergeDone
	if err != nil {
		res.ConvergeErr = err
		log.Warn("not drained", zap.Error(err))
	}
	if w.CountersOn {
		d, err := w.CounterDrift(qctx)
		if err != nil {
			res.DriftNote = err.Error()
		} else {
			res.Drift = &d
		}
	} else {
		res.DriftNote = w.CountersNote
	}
	stale, err := w.Scan(qctx, w.maxID)
	if err != nil && res.Err == nil {
		res.Err = fmt.Errorf("scan: %w", err)
	}
	res.Stale = stale
	for _, s := range stale {
		res.StaleByDC[s.DC]++
	}
	// The checker must have read the whole stream before its keys are
	// compared with the writes.
	if last, err := w.StreamLastSeq(qctx); err == nil {
		for checker.ReadSeq() < last && qctx.Err() == nil {
			sleep(qctx, 50*time.Millisecond)
		}
	}
	sleep(ctx, t.Delay+500*time.Millisecond) // let samples finish
	stopChecker()
	if err := <-checkerDone; err != nil && res.Err == nil {
		res.Err = fmt.Errorf("checker: %w", err)
	}
	res.Check = checker.Report()
	inStream := checker.Keys()
	staleKeys := map[string]bool{}
	for _, s := range stale {
		staleKeys[s.Key] = true
	}
	flushes := checker.Flushes()
	for k, marks := range wl.Written() {
		_, ok := inStream[k]
		if !ok && w.coveredByFlush(marks, flushes) {
			// Invalidated by a flush of every pool (a lost slot).
			res.CoveredByFlush++
			continue
		}
		if !ok && w.lostInFailover(marks) {
			// Every write of the key may be one the new primary never
			// received: no row, no invalidation owed.
			res.LostInFailover++
			continue
		}
		if !ok {
			res.LostStream++
		}
		if staleKeys[k] {
			res.LostApplied++
		}
		if (!ok || staleKeys[k]) && len(res.LostKeys) < 10 {
			res.LostKeys = append(res.LostKeys, k)
		}
	}
	res.Lost = res.LostStream + res.LostApplied
	exits, note := w.Exits()
	res.Exits, res.ExitNote = exits-exits0, note
	return res
}

// WorkloadConfig is the workload over this world.
func (w *World) WorkloadConfig() WorkloadConfig {
	c := WorkloadConfig{PrimaryDSN: w.PrimaryDSN(), Items: w.cfg.Items, Likes: w.CountersOn, Writers: w.cfg.Writers}
	for _, dc := range w.liveDCs() {
		c.DCs = append(c.DCs, WorkloadDC{Name: dc.Name, ProxyAddr: w.ProxyAddr[dc.Name], ReplicaDSN: dc.Replica.DSN("")})
	}
	return c
}

// verdict sets Pass and Reasons.
func (r *Result) verdict() {
	r.Reasons = nil
	if r.Err != nil {
		r.Reasons = append(r.Reasons, "error: "+r.Err.Error())
	}
	if r.ConvergeErr != nil {
		r.Reasons = append(r.Reasons, "did not converge: "+r.ConvergeErr.Error())
	}
	if len(r.Stale) > 0 {
		dcs := make([]string, 0, len(r.StaleByDC))
		for dc, n := range r.StaleByDC {
			dcs = append(dcs, fmt.Sprintf("%s=%d", dc, n))
		}
		sort.Strings(dcs)
		r.Reasons = append(r.Reasons, fmt.Sprintf("STALE %s (e.g. %s)", strings.Join(dcs, " "), r.Stale[0]))
	}
	if r.Lost > 0 {
		r.Reasons = append(r.Reasons, fmt.Sprintf("lost invalidations: %d (%d never in the stream, %d not applied)", r.Lost, r.LostStream, r.LostApplied))
	}
	if r.Drift != nil && r.Drift.Groups > 0 {
		r.Reasons = append(r.Reasons, fmt.Sprintf("counter drift: %d groups off by %d in all", r.Drift.Groups, r.Drift.Sum))
	}
	if strings.Contains(r.ExitNote, "exit status 3") {
		r.Reasons = append(r.Reasons, "an invalidator exited with code 3 (slot gone)")
	}
	if r.Stats.Writes() == 0 || r.Stats.Reads == 0 {
		r.Reasons = append(r.Reasons, "the workload did nothing")
	}
	r.Pass = len(r.Reasons) == 0
}

// StaleVerdict is "0" or the stale count per DC.
func (r Result) StaleVerdict() string {
	if len(r.Stale) == 0 {
		return "0"
	}
	dcs := make([]string, 0, len(r.StaleByDC))
	for dc, n := range r.StaleByDC {
		dcs = append(dcs, fmt.Sprintf("%s: %d", dc, n))
	}
	sort.Strings(dcs)
	return "STALE " + strings.Join(dcs, ", ")
}

// DriftString is the counter drift column.
func (r Result) DriftString() string {
	if r.Drift == nil {
		return r.DriftNote
	}
	if r.Drift.Groups == 0 {
		return "0"
	}
	return fmt.Sprintf("%d groups (sum %d)", r.Drift.Groups, r.Drift.Sum)
}
