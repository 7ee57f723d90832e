package main

import (
	"bytes"
	"fmt"
	"os"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/pgcache/pgcache/chaos"
)

// checkFile is chaos-check.yaml. Unknown fields are errors.
type checkFile struct {
	Postgres struct {
		DSN string `yaml:"dsn"` // the primary
	} `yaml:"postgres"`
	NATS struct {
		URL    string `yaml:"url"`
		Stream string `yaml:"stream"` // default INVALIDATIONS
	} `yaml:"nats"`
	Delay      time.Duration `yaml:"delay"`       // M; default 5s
	SampleRate float64       `yaml:"sample_rate"` // default 0.2
	MaxTracked int           `yaml:"max_tracked"` // default 500
	Track      time.Duration `yaml:"track"`       // default 10 x delay, at least 30s
	DCs        []chaos.Pool  `yaml:"dcs"`
	// Builtin "workload" uses the rules of the chaos workload (item:{id},
	// likes:{item_id}); they are added to Rules.
	Builtin string       `yaml:"builtin"`
	Rules   []chaos.Rule `yaml:"rules"`
}

// parseCheckConfig parses and validates a checker config.
func parseCheckConfig(data []byte) (chaos.CheckerConfig, error) {
	var f checkFile
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil {
		return chaos.CheckerConfig{}, fmt.Errorf("%w: %v", errConfig, err)
	}
	c := chaos.DefaultCheckerConfig()
	c.PrimaryDSN, c.NATSURL = f.Postgres.DSN, f.NATS.URL
	if f.NATS.Stream != "" {
		c.Stream = f.NATS.Stream
	}
	if f.Delay != 0 {
		c.Delay = f.Delay
	}
	if f.SampleRate != 0 {
		c.SampleRate = f.SampleRate
	}
	if f.MaxTracked != 0 {
		c.MaxTracked = f.MaxTracked
	}
	c.Track = f.Track
	c.Pools = f.DCs
	switch f.Builtin {
	case "":
	case "workload":
		c.Rules = append(c.Rules, chaos.WorkloadRules()...)
	default:
		return c, fmt.Errorf("%w: builtin %q: want workload or nothing", errConfig, f.Builtin)
	}
	c.Rules = append(c.Rules, f.Rules...)
	if c.Track == 0 {
		c.Track = max(10*c.Delay, 30*time.Second)
	}
	if err := c.Validate(); err != nil {
		return c, fmt.Errorf("%w: %w", errConfig, err)
	}
	return c, nil
}

func loadCheckConfig(path string) (chaos.CheckerConfig, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return chaos.CheckerConfig{}, fmt.Errorf("%w: %v", errConfig, err)
	}
	return parseCheckConfig(data)
}
