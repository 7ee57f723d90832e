package chaos

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/testenv"
)

// bins builds the daemons once per test binary.
var bins struct {
	once sync.Once
	b    testenv.Binaries
	err  error
	dir  string
}

func buildBinaries(t *testing.T) testenv.Binaries {
	t.Helper()
	bins.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		bins.dir, bins.err = makeTemp()
		if bins.err == nil {
			bins.b, bins.err = testenv.BuildBinaries(ctx, bins.dir)
		}
	})
	if bins.err != nil {
		t.Fatalf("build daemons: %v", bins.err)
	}
	return bins.b
}

func newWorld(t *testing.T, cfg WorldConfig) *World {
	t.Helper()
	cfg.Bins = buildBinaries(t)
	cfg.Dir = t.TempDir()
	env := testenv.New(t, EnvOptions(cfg.Geo))
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	w, err := StartWorld(ctx, env, cfg, quietLogger(t))
	if err != nil {
		t.Fatalf("start world: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("daemon logs:\n%s", w.Logs(4000))
		}
		w.Close()
	})
	return w
}

// quietLogger logs Info and up, shown only when the test fails.
func quietLogger(t *testing.T) *zap.Logger {
	return zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel))
}

func tableString(rs []Result) string {
	var b strings.Builder
	WriteTable(&b, rs)
	WriteDetails(&b, rs)
	return b.String()
}

// TestChaosShort runs every scenario (a)-(g) in its short form against a
// real environment with the real daemons, and asserts each verdict:
// nothing stale in any DC after quiesce, no invalidation lost, no counter
// drift, the pipeline converged; and that the workload and the checker
// really ran.
func TestChaosShort(t *testing.T) {
	w := newWorld(t, WorldConfig{Counters: true, Items: 200})
	if !w.CountersOn && !strings.Contains(w.CountersNote, "not built") {
		t.Fatalf("counters are built but could not be enabled: %s", w.CountersNote)
	}
	runShort(t, w, false)
}

// TestChaosGeoShort runs the scenarios of the per-datacenter world (each
// DC a three-server NATS cluster with its own stream) in their short
// form: a NATS server killed under load, then the loss of dc1.
func TestChaosGeoShort(t *testing.T) {
	w := newWorld(t, WorldConfig{Items: 200, Geo: true, Writers: 8})
	runShort(t, w, true)
}

// runShort runs the scenarios of one world (geo or not) in their short
// form and asserts each verdict.
func runShort(t *testing.T, w *World, geo bool) {
	ctx := context.Background()
	timing := ShortTiming()
	var results []Result
	for _, sc := range Scenarios() {
		if sc.Geo != geo {
			continue
		}
		t.Run(sc.Name, func(t *testing.T) {
			r := w.Run(ctx, sc, timing, quietLogger(t))
			results = append(results, r)
			t.Logf("%s: %s; stale %s; lost %d; drift %s; %s; worst %s; converge %s; reads %d writes %d faults %d; %s",
				r.Scenario, r.Verdict(), r.StaleVerdict(), r.Lost, r.DriftString(), r.Check.NinesString(),
				r.Check.WorstString(), r.ConvergeString(), r.Stats.Reads, r.Stats.Writes(), r.Faults, r.Took.Round(time.Second))
			if !r.Pass {
				t.Errorf("verdict FAIL:\n%s", strings.Join(r.Reasons, "\n"))
			}
			if r.Faults == 0 {
				t.Errorf("no fault was injected")
			}
			if r.Stats.Fills == 0 || r.Stats.Hits == 0 {
				t.Errorf("readers never filled or never hit: %+v", r.Stats)
			}
			if r.Check.Samples == 0 {
				t.Errorf("the checker finished no sample: %+v", r.Check)
			}
			if strings.HasPrefix(sc.Name, "i-") && len(r.Measures) == 0 {
				t.Errorf("the loss of a datacenter measured no resumption: %v", r.Measures)
			}
			if w.CountersOn && r.Drift == nil {
				t.Errorf("counters run but the drift was not measured: %s", r.DriftNote)
			}
		})
	}
	t.Logf("\n%s", tableString(results))
}

// TestCheckerDetectsStale is the negative control: dc2's purger deletes
// from a decoy memcached instead of dc2's pool, so dc2 keeps stale values.
// The verdict must say STALE for dc2 (and only dc2), count the
// invalidations as lost there, and the Polaris checker must see dc2 stale
// after M.
func TestCheckerDetectsStale(t *testing.T) {
	w := newWorld(t, WorldConfig{Items: 100, BrokenPurgeDC: "dc2"})
	timing := ShortTiming()
	timing.Converge = 2 * time.Minute
	r := w.Run(context.Background(), Baseline(), timing, quietLogger(t))
	t.Logf("\n%s", tableString([]Result{r}))
	if r.Pass {
		t.Fatalf("verdict PASS with dc2's purges going to a decoy; want FAIL")
	}
	if r.StaleByDC["dc2"] == 0 {
		t.Errorf("stale keys in dc2: got 0; want > 0")
	}
	if r.StaleByDC["dc1"] != 0 {
		t.Errorf("stale keys in dc1: got %d; want 0 (dc1 purges normally)", r.StaleByDC["dc1"])
	}
	if !strings.Contains(r.StaleVerdict(), "STALE dc2") {
		t.Errorf("stale verdict: got %q; want STALE dc2", r.StaleVerdict())
	}
	if r.LostApplied == 0 {
		t.Errorf("lost (not applied): got 0; want > 0")
	}
	if r.Check.StaleByDC["dc2"] == 0 {
		t.Errorf("checker stale samples in dc2: got 0; want > 0 (report %+v)", r.Check)
	}
	if r.Check.Stale == 0 || r.Check.Nines() > 3 {
		t.Errorf("checker nines: got %s; want a visible stale share", r.Check.NinesString())
	}
}

func TestCompilePattern(t *testing.T) {
	for _, tc := range []struct {
		pattern, key string
		args         []string // nil: no match
		err          bool
	}{
		{"item:{id}", "item:42", []string{"42"}, false},
		{"item:{id}", "item:", nil, false},
		{"item:{id}", "items:42", nil, false},
		{"u:{a}:p:{b}", "u:1:p:2", []string{"1", "2"}, false},
		{"a.b:{x}", "aXb:1", nil, false},
		{"post:{post_id}:likes", "post:7:likes", []string{"7"}, false},
		{"plain", "", nil, true},
		{"x:{", "", nil, true},
		{"x:}{a}", "", nil, true},
		{"x:{}", "", nil, true},
		{"", "", nil, true},
	} {
		t.Run(tc.pattern+"/"+tc.key, func(t *testing.T) {
			rs, err := compileRules([]Rule{{Key: tc.pattern, SQL: "SELECT 1"}})
			if (err != nil) != tc.err {
				t.Fatalf("compile %q: got error %v; want error %v", tc.pattern, err, tc.err)
			}
			if err != nil {
				return
			}
			r, args := matchRule(rs, tc.key)
			if tc.args == nil {
				if r != nil {
					t.Fatalf("match %q: got %v; want no match", tc.key, args)
				}
				return
			}
			if got, want := fmt.Sprint(args), fmt.Sprint(tc.args); r == nil || got != want {
				t.Fatalf("match %q: got %s; want %s", tc.key, got, want)
			}
		})
	}
}

func TestRuleFresh(t *testing.T) {
	v := &rule{Rule: Rule{Compare: CompareVersion}}
	e := &rule{Rule: Rule{Compare: CompareEqual}}
	for _, tc := range []struct {
		r          *rule
		cached, db string
		fresh      bool
	}{
		{v, "5", "5", true},
		{v, "6", "5", true},
		{v, "4", "5", false},
		{v, "abc", "abc", true},
		{e, "x", "x", true},
		{e, "6", "5", false},
	} {
		if got := tc.r.fresh(tc.cached, tc.db); got != tc.fresh {
			t.Errorf("%s fresh(%q, %q): got %t; want %t", tc.r.Compare, tc.cached, tc.db, got, tc.fresh)
		}
	}
}

func TestNinesString(t *testing.T) {
	for _, tc := range []struct {
		r    CheckReport
		want string
	}{
		{CheckReport{Delay: 5 * time.Second, Samples: 1000}, ">=3.0 nines within 5s (0/1000 stale)"},
		{CheckReport{Delay: 5 * time.Second, Samples: 1000, Stale: 1}, "3.00 nines within 5s (1/1000 stale)"},
		{CheckReport{Delay: 2 * time.Second, Samples: 100, Stale: 10}, "1.00 nines within 2s (10/100 stale)"},
		{CheckReport{Delay: time.Second}, "no samples within 1s"},
	} {
		if got := tc.r.NinesString(); got != tc.want {
			t.Errorf("got %q; want %q", got, tc.want)
		}
	}
}

func FuzzCompilePattern(f *testing.F) {
	for _, s := range []string{"item:{id}", "u:{a}:{b}", "{", "}", "{}", "a{b}c{", "x:{a b}"} {
		f.Add(s, "item:1")
	}
	f.Fuzz(func(t *testing.T, pattern, key string) {
		rs, err := compileRules([]Rule{{Key: pattern, SQL: "SELECT 1"}})
		if err != nil {
			return
		}
		matchRule(rs, key)
	})
}

func makeTemp() (string, error) { return os.MkdirTemp("", "pgcache-chaos-bin-") }

func TestMain(m *testing.M) {
	code := m.Run()
	if bins.dir != "" {
		_ = os.RemoveAll(bins.dir)
	}
	os.Exit(code)
}
