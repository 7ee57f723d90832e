package main

import (
	"bytes"
	"errors"
	"fmt"
	"net/url"
	"os"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/pgcache/pgcache/keys"
)

// Config is invalidator.yaml. The shape is a user contract: extend it,
// never rename. Durations are Go durations ("250ms", "30s").
type Config struct {
	DC       string         `yaml:"dc"`       // this process's datacenter
	Postgres PostgresConfig `yaml:"postgres"` // the primary
	NATS     NATSConfig     `yaml:"nats"`
	Tail     bool           `yaml:"tail"`  // this process may hold the slot
	Purge    *PurgeConfig   `yaml:"purge"` // this DC's pool; nil: no purging here
	Rules    []keys.Rule    `yaml:"rules"`
	Messages MessagesConfig `yaml:"messages"`
	Counters []yaml.Node    `yaml:"counters"` // not supported by this build: rejected when present
	HTTP     HTTPConfig     `yaml:"http"`
}

// PostgresConfig names the primary, the slot and the publication.
type PostgresConfig struct {
	DSN         string `yaml:"dsn"`         // replication=database is added for the stream
	Slot        string `yaml:"slot"`        // default cache_invalidator
	Publication string `yaml:"publication"` // default cache_invalidator; created for the rule tables if missing
}

// NATSConfig says where JetStream is.
type NATSConfig struct {
	URL     string `yaml:"url"`      // empty: an embedded single-node server with data under DataDir
	Stream  string `yaml:"stream"`   // default INVALIDATIONS
	DataDir string `yaml:"data_dir"` // embedded server's store; default ./data
	// Placement is the NATS cluster the stream is created in when missing;
	// default: this DC.
	Placement string `yaml:"placement"`
}

// PurgeConfig is this DC's pool and how to apply keys to it.
type PurgeConfig struct {
	Servers     []string      `yaml:"servers"`
	Hash        string        `yaml:"hash"`        // ketama (default) | modula
	ReplicaDSN  string        `yaml:"replica_dsn"` // optional LSN gate
	Mode        string        `yaml:"mode"`        // delete (default) | stale
	StaleTTL    time.Duration `yaml:"stale_ttl"`   // stale mode: T of md I; default 30s
	GateMaxWait time.Duration `yaml:"gate_max_wait"`
	Concurrency int           `yaml:"concurrency"` // keys in flight; default 256
	Timeout     time.Duration `yaml:"timeout"`     // per memcached request; default 500ms
}

// MessagesConfig selects explicit invalidation messages.
type MessagesConfig struct {
	Prefix string `yaml:"prefix"` // pg_logical_emit_message(true, '<prefix>', 'k1 k2'); empty: messages ignored
}

// HTTPConfig is the metrics and health listener.
type HTTPConfig struct {
	Listen string `yaml:"listen"` // default 127.0.0.1:9187; "off" disables
}

// ErrConfig wraps every configuration error.
var ErrConfig = errors.New("invalidator: bad config")

// LoadConfig reads and validates a config file. Unknown fields are errors,
// so a misspelt key never silently does nothing.
func LoadConfig(path string) (*Config, *keys.Set, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrConfig, err)
	}
	return ParseConfig(data)
}

// ParseConfig parses, defaults and validates a config.
func ParseConfig(data []byte) (*Config, *keys.Set, error) {
	var c Config
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrConfig, err)
	}
	c.defaults()
	rules, err := c.Validate()
	if err != nil {
		return nil, nil, err
	}
	return &c, rules, nil
}

func (c *Config) defaults() {
	if c.Postgres.Slot == "" {
		c.Postgres.Slot = "cache_invalidator"
	}
	if c.Postgres.Publication == "" {
		c.Postgres.Publication = "cache_invalidator"
	}
	if c.NATS.Stream == "" {
		c.NATS.Stream = "INVALIDATIONS"
	}
	if c.NATS.DataDir == "" {
		c.NATS.DataDir = "data"
	}
	if c.NATS.Placement == "" && c.NATS.URL != "" {
		c.NATS.Placement = c.DC
	}
	if c.HTTP.Listen == "" {
		c.HTTP.Listen = "127.0.0.1:9187"
	}
	if p := c.Purge; p != nil {
		if p.Hash == "" {
			p.Hash = "ketama"
		}
		if p.Mode == "" {
			p.Mode = "delete"
		}
		if p.Timeout == 0 {
			p.Timeout = 500 * time.Millisecond
		}
	}
}

// Validate checks the config and compiles the rules. Every problem is
// reported, joined.
func (c *Config) Validate() (*keys.Set, error) {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if c.DC == "" {
		bad("dc is empty")
	}
	if c.Tail {
		if c.Postgres.DSN == "" {
			bad("postgres.dsn is empty (tail: true needs the primary)")
		} else if _, err := url.Parse(c.Postgres.DSN); err != nil {
			bad("postgres.dsn: %v", redact(err))
		}
		if len(c.Rules) == 0 && c.Messages.Prefix == "" {
			bad("tail: true with no rules and no messages.prefix: nothing to invalidate")
		}
	}
	if !c.Tail && c.Purge == nil {
		bad("neither tail nor purge is configured: nothing to do")
	}
	if p := c.Purge; p != nil {
		if len(p.Servers) == 0 {
			bad("purge.servers is empty")
		}
		if p.Hash != "ketama" && p.Hash != "modula" {
			bad("purge.hash %q: want ketama or modula", p.Hash)
		}
		if p.Mode != "delete" && p.Mode != "stale" {
			bad("purge.mode %q: want delete or stale", p.Mode)
		}
		if p.Timeout < 0 || p.GateMaxWait < 0 || p.StaleTTL < 0 || p.Concurrency < 0 {
			bad("purge: durations and concurrency must not be negative")
		}
	}
	if len(c.Counters) > 0 {
		bad("counters: not supported by this build yet (see issue: denormalized counters)")
	}
	rules, err := keys.Compile(c.Rules)
	if err != nil {
		errs = append(errs, fmt.Errorf("rules: %w", err))
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("%w: %w", ErrConfig, errors.Join(errs...))
	}
	return rules, nil
}

// redact hides a DSN's password in an error from url.Parse, which quotes
// the whole URL.
func redact(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return fmt.Errorf("%s: %v", ue.Op, ue.Err)
	}
	return err
}
