package deploy

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"gopkg.in/yaml.v3"

	"github.com/pgcache/pgcache/lease"
)

// The units, as installed; ExecStart paths start with binDir.
var units = []string{"invalidator.service", "leaseproxy.service", "leaseproxy@.service"}

const binDir = "/usr/local/bin/"

// lookPath finds a tool the tests need, failing (never skipping) with how
// to install it.
func lookPath(t *testing.T, tool, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(tool)
	if err != nil {
		t.Fatalf("%s is missing: install it (apt-get install -y --no-install-recommends %s, or make setup): %v", tool, pkg, err)
	}
	return p
}

// TestSystemdVerify runs systemd-analyze verify on copies of the units
// whose ExecStart binaries point at stub executables, and wants it silent.
func TestSystemdVerify(t *testing.T) {
	sa := lookPath(t, "systemd-analyze", "systemd")
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, b := range []string{"invalidator", "leaseproxy"} {
		if err := os.WriteFile(filepath.Join(bin, b), []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	args := []string{"verify", "--man=no"}
	for _, u := range units {
		data, err := os.ReadFile(filepath.Join("systemd", u))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(data), "ExecStart="+binDir) {
			t.Fatalf("%s: no ExecStart=%s...", u, binDir)
		}
		data = []byte(strings.ReplaceAll(string(data), binDir, bin+"/"))
		if err := os.WriteFile(filepath.Join(dir, u), data, 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, filepath.Join(dir, strings.Replace(u, "@.", "@dc1.", 1)))
	}
	cmd := exec.Command(sa, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "SYSTEMD_LOG_COLOR=0")
	out, err := cmd.CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// parseUnit returns a unit file's settings as key -> values, in order.
func parseUnit(t *testing.T, path string) map[string][]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m := map[string][]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l == "" || l[0] == '#' || l[0] == ';' || l[0] == '[' {
			continue
		}
		k, v, ok := strings.Cut(l, "=")
		if !ok {
			t.Fatalf("%s: bad line %q", path, l)
		}
		m[k] = append(m[k], v)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return m
}

// TestUnitSettings holds the units to the settings the daemons rely on:
// notify and watchdog, restart policy, stop timeout above the drain, and
// the sandbox.
func TestUnitSettings(t *testing.T) {
	common := map[string]string{
		"Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30s", "Restart": "on-failure",
		"KillSignal": "SIGTERM", "DynamicUser": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
		"PrivateTmp": "yes", "NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "AmbientCapabilities": "",
		"RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "SystemCallFilter": "@system-service",
		"LimitNOFILE": "65536", "MemoryMax": "1G",
	}
	want := map[string]map[string]string{
		"invalidator.service": {
			"RestartPreventExitStatus": "3", "StateDirectory": "pgcache-invalidator",
			"EnvironmentFile": "-/etc/pgcache/invalidator.env", "ExecReload": "/bin/kill -HUP $MAINPID",
			"ExecStart": binDir + "invalidator -config /etc/pgcache/invalidator.yaml -drain-timeout 30s",
		},
		"leaseproxy.service": {
			"ExecReload": "/bin/kill -HUP $MAINPID", "EnvironmentFile": "-/etc/pgcache/leaseproxy.env",
			"ExecStart": binDir + "leaseproxy -config /etc/pgcache/leaseproxy.yaml",
		},
		"leaseproxy@.service": {
			"ExecReload": "/bin/kill -HUP $MAINPID", "EnvironmentFile": "-/etc/pgcache/leaseproxy-%i.env",
			"ExecStart": binDir + "leaseproxy -config /etc/pgcache/leaseproxy-%i.yaml",
		},
	}
	// Drain timeouts: the invalidator's -drain-timeout flag, leaseproxy's
	// drain_timeout default (cmd/leaseproxy/config.go).
	drains := map[string]time.Duration{"invalidator.service": 30 * time.Second, "leaseproxy.service": 10 * time.Second, "leaseproxy@.service": 10 * time.Second}
	for _, u := range units {
		t.Run(u, func(t *testing.T) {
			got := parseUnit(t, filepath.Join("systemd", u))
			for k, v := range common {
				if !contains(got[k], v) {
					t.Errorf("%s: got %s=%q; want %q among them", u, k, got[k], v)
				}
			}
			for k, v := range want[u] {
				if !contains(got[k], v) {
					t.Errorf("%s: got %s=%q; want %q", u, k, got[k], v)
				}
			}
			stop, err := time.ParseDuration(last(got["TimeoutStopSec"]))
			if err != nil {
				t.Fatalf("%s: TimeoutStopSec: %v", u, err)
			}
			if stop <= drains[u] {
				t.Errorf("%s: got TimeoutStopSec=%s; want more than the drain timeout %s", u, stop, drains[u])
			}
			if strings.Contains(strings.Join(got["ExecStart"], " "), "-drain-timeout") {
				m := regexp.MustCompile(`-drain-timeout (\S+)`).FindStringSubmatch(last(got["ExecStart"]))
				if d, err := time.ParseDuration(m[1]); err != nil || d != drains[u] {
					t.Errorf("%s: got -drain-timeout %s; want %s (TimeoutStopSec is set above it)", u, m[1], drains[u])
				}
			}
		})
	}
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func last(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[len(s)-1]
}

func promtool(t *testing.T, dir string, args ...string) {
	t.Helper()
	pt := lookPath(t, "promtool", "prometheus")
	cmd := exec.Command(pt, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	if !strings.Contains(string(out), "SUCCESS") {
		t.Fatalf("promtool %s: no SUCCESS in:\n%s", strings.Join(args, " "), out)
	}
}

// TestPromtool checks the rules and the example config, and runs the
// rules' unit tests (each alert firing, and not firing where it must not).
func TestPromtool(t *testing.T) {
	promtool(t, "prometheus", "check", "rules", "alerts.yml")
	promtool(t, "prometheus", "check", "config", "prometheus.example.yml")
	promtool(t, "prometheus", "test", "rules", "alerts_test.yml")
}

type ruleFile struct {
	Groups []struct {
		Name  string `yaml:"name"`
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Record      string            `yaml:"record"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Labels      map[string]string `yaml:"labels"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

func loadRules(t *testing.T) ruleFile {
	t.Helper()
	data, err := os.ReadFile("prometheus/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	var rf ruleFile
	if err := yaml.Unmarshal(data, &rf); err != nil {
		t.Fatalf("alerts.yml: %v", err)
	}
	return rf
}

const runbook = "https://github.com/pgcache/pgcache/blob/main/docs/RUNBOOK.md#"

// anchors returns the GitHub anchors of a Markdown file's headings.
func anchors(t *testing.T, path string) map[string]bool {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (the alerts' runbook_url points there)", err)
	}
	a := map[string]bool{}
	fence := false
	for _, l := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(l, "```") {
			fence = !fence
		}
		if fence || !strings.HasPrefix(l, "#") {
			continue
		}
		h := strings.TrimSpace(strings.TrimLeft(l, "#"))
		var b strings.Builder
		for _, r := range strings.ToLower(h) {
			switch {
			case r >= 'a' && r <= 'z', r >= '0' && r <= '9', r == '-', r == '_':
				b.WriteRune(r)
			case r == ' ':
				b.WriteRune('-')
			}
		}
		a[b.String()] = true
	}
	return a
}

// TestAlertsActionable: every alert has a severity, a summary, a
// description and a runbook_url whose anchor is a heading of
// docs/RUNBOOK.md, and alerts_test.yml shows each one firing.
func TestAlertsActionable(t *testing.T) {
	rf := loadRules(t)
	heads := anchors(t, "../docs/RUNBOOK.md")
	tests, err := os.ReadFile("prometheus/alerts_test.yml")
	if err != nil {
		t.Fatal(err)
	}
	var tf struct {
		Tests []struct {
			AlertRuleTest []struct {
				Alertname string           `yaml:"alertname"`
				ExpAlerts []map[string]any `yaml:"exp_alerts"`
			} `yaml:"alert_rule_test"`
		} `yaml:"tests"`
	}
	if err := yaml.Unmarshal(tests, &tf); err != nil {
		t.Fatalf("alerts_test.yml: %v", err)
	}
	fires := map[string]bool{}
	for _, tc := range tf.Tests {
		for _, a := range tc.AlertRuleTest {
			if len(a.ExpAlerts) > 0 {
				fires[a.Alertname] = true
			}
		}
	}
	n := 0
	for _, g := range rf.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue
			}
			n++
			if s := r.Labels["severity"]; s != "critical" && s != "warning" {
				t.Errorf("%s: got severity %q; want critical or warning", r.Alert, s)
			}
			for _, k := range []string{"summary", "description", "runbook_url"} {
				if strings.TrimSpace(r.Annotations[k]) == "" {
					t.Errorf("%s: no %s annotation", r.Alert, k)
				}
			}
			u := r.Annotations["runbook_url"]
			if !strings.HasPrefix(u, runbook) {
				t.Errorf("%s: got runbook_url %q; want %s<anchor>", r.Alert, u, runbook)
			} else if a := strings.TrimPrefix(u, runbook); !heads[a] {
				t.Errorf("%s: runbook_url anchor #%s is not a heading of docs/RUNBOOK.md", r.Alert, a)
			}
			if !fires[r.Alert] {
				t.Errorf("%s: alerts_test.yml has no test where it fires", r.Alert)
			}
		}
	}
	if n < 15 {
		t.Errorf("got %d alerts; want the full set (15 or more)", n)
	}
}

// exported returns the metric names the code exports: string literals
// named invalidator_* or leaseproxy_* in the module's Go sources (test
// files excluded), and the names of lease's collector (built from a
// namespace at run time).
func exported(t *testing.T) map[string]bool {
	t.Helper()
	known := map[string]bool{"up": true}
	lit := regexp.MustCompile(`"((?:invalidator|leaseproxy)_[a-z0-9_]+)"`)
	err := filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "testdata" || strings.HasPrefix(d.Name(), ".")) && path != ".." {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, m := range lit.FindAllStringSubmatch(string(data), -1) {
			known[m[1]] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	descs := make(chan *prometheus.Desc, 256)
	lease.NewCollector("leaseproxy", nil, nil).Describe(descs)
	close(descs)
	fq := regexp.MustCompile(`fqName: "([^"]+)"`)
	nlease := 0
	for d := range descs {
		if m := fq.FindStringSubmatch(d.String()); m != nil {
			known[m[1]] = true
			nlease++
		}
	}
	if nlease < 10 {
		t.Fatalf("got %d metrics from lease.NewCollector; want its full set", nlease)
	}
	return known
}

var metricRef = regexp.MustCompile(`\b(?:up|(?:invalidator|leaseproxy|go|process)_[a-zA-Z0-9_]+)\b`)

// unknownMetrics returns the metric names expr uses that the code does not
// export (histogram suffixes allowed; go_ and process_ come from the
// standard collectors).
func unknownMetrics(expr string, known map[string]bool) []string {
	expr = regexp.MustCompile(`\$\w+`).ReplaceAllString(expr, "") // dashboard variables
	expr = regexp.MustCompile(`"[^"]*"`).ReplaceAllString(expr, `""`)
	var bad []string
	for _, m := range metricRef.FindAllString(expr, -1) {
		base := m
		for _, s := range []string{"_bucket", "_sum", "_count"} {
			if b, ok := strings.CutSuffix(m, s); ok && known[b] {
				base = b
			}
		}
		if known[base] || strings.HasPrefix(m, "go_") || strings.HasPrefix(m, "process_") {
			continue
		}
		bad = append(bad, m)
	}
	return bad
}

func TestAlertMetricsExist(t *testing.T) {
	known := exported(t)
	for _, g := range loadRules(t).Groups {
		for _, r := range g.Rules {
			if bad := unknownMetrics(r.Expr, known); len(bad) > 0 {
				t.Errorf("%s: uses %v, which the code does not export", r.Alert, bad)
			}
		}
	}
}

type dashboard struct {
	Title  string `json:"title"`
	UID    string `json:"uid"`
	Panels []struct {
		ID      int    `json:"id"`
		Type    string `json:"type"`
		Title   string `json:"title"`
		Targets []struct {
			RefID string `json:"refId"`
			Expr  string `json:"expr"`
		} `json:"targets"`
	} `json:"panels"`
}

// TestDashboard parses the Grafana dashboard, checks that every query
// uses only exported metrics, and has promtool parse every query (with
// the dashboard's variables substituted) as a recording rule.
func TestDashboard(t *testing.T) {
	data, err := os.ReadFile("grafana/pgcache.json")
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(data, &d); err != nil {
		t.Fatalf("pgcache.json: %v", err)
	}
	if d.UID == "" || d.Title == "" {
		t.Errorf("got uid %q title %q; want both set", d.UID, d.Title)
	}
	known := exported(t)
	ids := map[int]bool{}
	subst := strings.NewReplacer("$__rate_interval", "5m", "$invalidator_job", "invalidator", "$leaseproxy_job", "leaseproxy", "$dc", ".*")
	var rules strings.Builder
	rules.WriteString("groups:\n  - name: dashboard\n    rules:\n")
	nexpr := 0
	used := map[string]bool{}
	for _, p := range d.Panels {
		if ids[p.ID] {
			t.Errorf("panel %q: duplicate id %d", p.Title, p.ID)
		}
		ids[p.ID] = true
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q: no queries", p.Title)
		}
		for _, tg := range p.Targets {
			if strings.TrimSpace(tg.Expr) == "" {
				t.Errorf("panel %q %s: empty expr", p.Title, tg.RefID)
				continue
			}
			if bad := unknownMetrics(tg.Expr, known); len(bad) > 0 {
				t.Errorf("panel %q: uses %v, which the code does not export", p.Title, bad)
			}
			for _, m := range metricRef.FindAllString(tg.Expr, -1) {
				used[m] = true
			}
			q, _ := json.Marshal(subst.Replace(tg.Expr))
			nexpr++
			fmt.Fprintf(&rules, "      - record: pgcache_dashboard_query_%d\n        expr: %s\n", nexpr, q)
		}
	}
	// The dashboard shows what the alerts watch.
	for _, m := range []string{"invalidator_slot_lag_bytes", "invalidator_replication_lag_seconds", "invalidator_commit_to_purge_seconds_bucket",
		"invalidator_purge_failures_total", "invalidator_breaker_state", "leaseproxy_server_breaker_state", "invalidator_slot_active",
		"invalidator_published_batches_total", "leaseproxy_lease_wait_timeouts_total", "invalidator_batcher_lag_seconds", "up"} {
		if !used[m] {
			t.Errorf("no panel shows %s", m)
		}
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "dashboard_rules.yml"), []byte(rules.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	promtool(t, dir, "check", "rules", "dashboard_rules.yml")
}

// TestUnknownMetrics: the check itself catches a misspelt metric.
func TestUnknownMetrics(t *testing.T) {
	known := map[string]bool{"invalidator_commit_to_purge_seconds": true, "up": true}
	tests := []struct {
		expr string
		want []string
	}{
		{`histogram_quantile(0.99, sum by (le) (rate(invalidator_commit_to_purge_seconds_bucket{dc=~"$dc"}[5m])))`, nil},
		{`up{job="invalidator_x"} == 0 and go_goroutines > 0`, nil},
		{`rate(invalidator_comit_to_purge_seconds_count[5m])`, []string{"invalidator_comit_to_purge_seconds_count"}},
		{`leaseproxy_nope + $leaseproxy_job`, []string{"leaseproxy_nope"}},
	}
	for _, tt := range tests {
		got := unknownMetrics(tt.expr, known)
		sort.Strings(got)
		if strings.Join(got, ",") != strings.Join(tt.want, ",") {
			t.Errorf("unknownMetrics(%q): got %v; want %v", tt.expr, got, tt.want)
		}
	}
}
