package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/chaos"
	"github.com/pgcache/pgcache/testenv"
)

func TestParseCheckConfig(t *testing.T) {
	good := `postgres: {dsn: "postgres://x@h/db"}
nats: {url: "nats://h:4222"}
delay: 3s
dcs:
  - {dc: dc1, servers: ["127.0.0.1:11211"], hash: ketama}
  - {dc: dc2, servers: ["127.0.0.1:11212", "127.0.0.1:11213"], hash: modula}
rules:
  - {key: "item:{id}", sql: "SELECT version::text FROM items WHERE id = $1::bigint", compare: version}
`
	c, err := parseCheckConfig([]byte(good))
	if err != nil {
		t.Fatalf("good config: %v", err)
	}
	if c.Delay != 3*time.Second || c.Stream != "INVALIDATIONS" || c.SampleRate != 0.2 || c.Track != 30*time.Second || len(c.Pools) != 2 {
		t.Errorf("got %+v; want delay 3s, stream INVALIDATIONS, rate 0.2, track 30s, 2 pools", c)
	}
	builtin := strings.Replace(good, "rules:", "builtin: workload\nrules:", 1)
	if c, err = parseCheckConfig([]byte(builtin)); err != nil || len(c.Rules) != 3 {
		t.Errorf("builtin: got %d rules, %v; want 3, nil", len(c.Rules), err)
	}
	for _, tc := range []struct{ name, edit, want string }{
		{"unknown field", "delay: 3s\nnope: 1", "field nope not found"},
		{"no dsn", `postgres: {dsn: "postgres://x@h/db"}`, "primary dsn is empty"},
		{"bad hash", "hash: modula", "hash"},
		{"bad compare", "compare: version", "compare"},
		{"bad pattern", `key: "item:{id}"`, "bad key pattern"},
		{"no rules", "rules:\n  - {key: \"item:{id}\", sql: \"SELECT version::text FROM items WHERE id = $1::bigint\", compare: version}\n", "no rules"},
		{"bad builtin", "rules:", "builtin"},
		{"negative rate", "delay: 3s", "sample rate"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var cfg string
			switch tc.name {
			case "no dsn":
				cfg = strings.Replace(good, tc.edit, "postgres: {dsn: \"\"}", 1)
			case "bad hash":
				cfg = strings.Replace(good, tc.edit, "hash: crc", 1)
			case "bad compare":
				cfg = strings.Replace(good, tc.edit, "compare: newer", 1)
			case "bad pattern":
				cfg = strings.Replace(good, tc.edit, `key: "item:{id"`, 1)
			case "no rules":
				cfg = strings.Replace(good, tc.edit, "", 1)
			case "bad builtin":
				cfg = strings.Replace(good, tc.edit, "builtin: mine\nrules:", 1)
			case "negative rate":
				cfg = strings.Replace(good, tc.edit, "delay: 3s\nsample_rate: -1", 1)
			default:
				cfg = strings.Replace(good, "delay: 3s", tc.edit, 1)
			}
			_, err := parseCheckConfig([]byte(cfg))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v; want an error containing %q", err, tc.want)
			}
		})
	}
}

func TestExampleConfigParses(t *testing.T) {
	data, err := os.ReadFile("check.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	c, err := parseCheckConfig(data)
	if err != nil {
		t.Fatalf("check.example.yaml: %v", err)
	}
	if len(c.Pools) != 2 || len(c.Rules) != 2 {
		t.Errorf("got %d pools, %d rules; want 2, 2", len(c.Pools), len(c.Rules))
	}
}

func TestUsageErrors(t *testing.T) {
	for _, args := range [][]string{nil, {"nope"}, {"run", "-scenarios", "zz"}, {"check", "-config", "/nonexistent.yaml"}} {
		var out, errb bytes.Buffer
		if code := run(args, &out, &errb); code != exitConfig {
			t.Errorf("run %q: got exit %d; want %d (stderr %q)", args, code, exitConfig, errb.String())
		}
	}
}

// TestCheckAgainstDeployment runs `chaos check` with a user-written config
// (a SQL rule, compare: equal) against a live environment whose dc2 purger
// deletes from a decoy memcached while the chaos workload runs: the check
// must report dc2 stale and exit 3 under -min-nines 2.
func TestCheckAgainstDeployment(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	dir := t.TempDir()
	bins, err := testenv.BuildBinaries(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	env := testenv.New(t, testenv.Options{})
	w, err := chaos.StartWorld(ctx, env, chaos.WorldConfig{Bins: bins, Dir: filepath.Join(dir, "daemons"), Items: 100, BrokenPurgeDC: "dc2"},
		zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)))
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	var pools strings.Builder
	for _, p := range w.CheckerConfig().Pools {
		fmt.Fprintf(&pools, "  - {dc: %s, servers: [%s], hash: ketama}\n", p.DC, strings.Join(p.Servers, ", "))
	}
	cfg := fmt.Sprintf(`postgres: {dsn: %q}
nats: {url: %q}
delay: 1s
sample_rate: 0.5
dcs:
%srules:
  - {key: "item:{id}", sql: "SELECT version::text FROM items WHERE id = $1::bigint"}
`, env.Primary.DSN(""), env.DCs[0].NATS.URL(), pools.String())
	path := filepath.Join(dir, "check.yaml")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	wctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- chaos.NewWorkload(w.WorkloadConfig()).Run(wctx) }()
	var out, errb bytes.Buffer
	code := run([]string{"check", "-config", path, "-duration", "10s", "-min-nines", "2"}, &out, &errb)
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	t.Logf("chaos check output:\n%s\nstderr:\n%s", out.String(), errb.String())
	if code != exitNines {
		t.Errorf("exit code: got %d; want %d (nines below 2 with dc2 unpurged)", code, exitNines)
	}
	if !strings.Contains(out.String(), "dc2=") {
		t.Errorf("output does not name dc2 as stale:\n%s", out.String())
	}
}
