// Package config is the invalidator's config file: its YAML schema, the
// ${VAR} expansion for secrets, defaults and validation (every problem
// reported at once, with the rules and counters compiled). It leaves
// turning the file into each package's Config to cmd/invalidator.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"net/url"
	"os"
	"regexp"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/pgcache/pgcache/batcher"
	"github.com/pgcache/pgcache/counterstore"

	"github.com/pgcache/pgcache/counters"
	"github.com/pgcache/pgcache/keys"
)

// Config is invalidator.yaml. The shape is a user contract: extend it,
// never rename. Durations are Go durations ("250ms", "30s").
type Config struct {
	DC       string         `yaml:"dc"`       // this process's datacenter
	Postgres PostgresConfig `yaml:"postgres"` // the primary
	NATS     NATSConfig     `yaml:"nats"`
	Tail     bool           `yaml:"tail"` // this process may hold the slot
	// OnSlotLoss is what the tail does when its slot was lost (missing
	// after this pipeline ran, or invalidated): exit (default: exit 3,
	// an operator flushes) or flush (every datacenter's pool is flushed
	// once, announced on the stream, and the counters recounted).
	OnSlotLoss string          `yaml:"on_slot_loss"`
	Purge      *PurgeConfig    `yaml:"purge"` // this DC's pool; nil: no purging here
	Rules      []keys.Rule     `yaml:"rules"`
	Messages   MessagesConfig  `yaml:"messages"`
	Counters   []counters.Rule `yaml:"counters"` // denormalized counters (see counters.go); need tail: true and messages.prefix (see package tail)
	// Batcher tunes how counter deltas are batched and where they are stored.
	Batcher BatcherConfig `yaml:"batcher"`
	// Increments is the JetStream stream of direct increments for counters
	// without a source table.
	Increments IncrementsConfig `yaml:"increments"`
	HTTP       HTTPConfig       `yaml:"http"`
	// MemoryLimit is the process's soft memory limit in bytes, set as Go's
	// memory limit (debug.SetMemoryLimit): the GC works harder as the heap
	// nears it. 0 (default): none, or GOMEMLIMIT from the environment.
	// It does not count the binary's own pages (about 18 MB).
	MemoryLimit int64 `yaml:"memory_limit"`

	CounterSet *counters.Set `yaml:"-"` // compiled by Validate
}

// BatcherConfig is the batcher: section.
type BatcherConfig struct {
	MaxPending      int           `yaml:"max_pending"`      // groups pending before a flush (and backpressure); default 10000
	Interval        time.Duration `yaml:"interval"`         // longest wait of a delta before its flush; default 100ms
	Table           string        `yaml:"table"`            // default pgcache_counters
	CheckpointTable string        `yaml:"checkpoint_table"` // default pgcache_counter_checkpoints
}

// IncrementsConfig is the increments: section: where applications publish
// increments of counters without a source table, on subject
// counters.incr.<counter>.
type IncrementsConfig struct {
	Stream    string `yaml:"stream"`    // default COUNTERS; created if missing, capturing counters.incr.>
	Placement string `yaml:"placement"` // NATS cluster it is created in; default nats.placement
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
	// default: this DC. Not used with datacenters (each DC's stream is in
	// its own cluster).
	Placement string `yaml:"placement"`
	// Replicas is each stream's replicas within its cluster: 1 (default),
	// 3 or 5, at most the cluster's JetStream servers. 3 survives the
	// loss of one server, 5 of two.
	Replicas int `yaml:"replicas"`
	// Datacenters turns on the per-datacenter layout: every DC listed
	// has its own stream <stream>_<dc> in its own NATS cluster (named
	// after the DC), copying every other DC's batches, so losing a
	// datacenter loses no confirmed invalidation (see RUNBOOK). List
	// every DC, the same list in every DC's config. Empty: one stream.
	Datacenters []string `yaml:"datacenters"`
	// DurableDCs is how many datacenters' streams must hold a batch
	// before the slot is confirmed past it: the writer's and
	// durable_dcs-1 others. Default 2 (1 with a single datacenter).
	DurableDCs int `yaml:"durable_dcs"`
	// CopyTimeout is how long a batch waits for those copies before it
	// is confirmed with the ones it has (logged and counted). 0 (the
	// default) waits as long as it takes: while a datacenter is down,
	// nothing is confirmed and the slot retains WAL, unless the other
	// datacenters are enough for durable_dcs. With two datacenters, set
	// it (e.g. 1m) to keep confirming while one of them is lost.
	CopyTimeout time.Duration `yaml:"copy_timeout"`
	// Creds is a NATS credentials file (user JWT and nkey seed); NKey is
	// an nkey seed file. At most one of them. A user and password go in
	// the URL, best as ${VARIABLES} (see LoadConfig).
	Creds string    `yaml:"creds"`
	NKey  string    `yaml:"nkey"`
	TLS   TLSConfig `yaml:"tls"`
}

// TLSConfig is a client's TLS: CA verifies the server; Cert and Key (both
// or neither) authenticate the client.
type TLSConfig struct {
	CA   string `yaml:"ca"`
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
}

// PurgeConfig is this DC's pool and how to apply keys to it.
type PurgeConfig struct {
	Servers     []string      `yaml:"servers"`
	Hash        string        `yaml:"hash"`        // ketama (default) | modula
	ReplicaDSN  string        `yaml:"replica_dsn"` // optional LSN gate
	Mode        string        `yaml:"mode"`        // delete (default) | stale
	StaleTTL    time.Duration `yaml:"stale_ttl"`   // stale mode: T of md I; default 30s
	GateMaxWait time.Duration `yaml:"gate_max_wait"`
	Concurrency int           `yaml:"concurrency"` // deprecated, ignored: each server has one pipelined worker
	// RecordAfter: a server failing this long has its keys recorded in the
	// DC's backlog stream until it returns. 0 means 2s.
	RecordAfter time.Duration `yaml:"record_after"`
	// MaxBacklogBytes bounds the keys recorded for one down server;
	// past it the server is flushed when it returns. 0 means 64 MiB.
	MaxBacklogBytes int64 `yaml:"max_backlog_bytes"`
	// MaxBytes bounds the keys of the batches being applied at once. 0
	// means 64 MiB.
	MaxBytes int64         `yaml:"max_bytes"`
	Timeout  time.Duration `yaml:"timeout"` // per memcached request; default 500ms
	// AckWait is how long the DC's durable consumer waits for a batch's
	// ack before it delivers it again, to another purge process of the DC
	// if one runs (scale-out): the time a killed purger's batches wait.
	// Above 10s; 0 means 30s.
	AckWait time.Duration `yaml:"ack_wait"`
}

// MessagesConfig selects explicit invalidation messages.
type MessagesConfig struct {
	Prefix string `yaml:"prefix"` // pg_logical_emit_message(true, '<prefix>', 'k1 k2'); empty: messages ignored
}

// HTTPConfig is the metrics and health listener.
type HTTPConfig struct {
	Listen string `yaml:"listen"` // default 127.0.0.1:9187; "off" disables
	// Pprof serves Go's profiles under /debug/pprof/ on the same listener
	// (keep it on localhost). Default false.
	Pprof bool `yaml:"pprof"`
}

// ErrConfig wraps every configuration error.
var ErrConfig = errors.New("invalidator: bad config")

// Load reads and validates a config file. Unknown fields are errors,
// so a misspelt key never silently does nothing. ${NAME} anywhere in the
// file is replaced by the environment variable NAME (an unset one is an
// error), so that secrets (a DSN's password, a NATS password) can live in
// the unit's EnvironmentFile instead of the file.
func Load(path string) (*Config, *keys.Set, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrConfig, err)
	}
	return Parse(data)
}

var envRef = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)\}`)

// expandEnv replaces ${NAME} with the environment variable's value.
func expandEnv(data []byte) ([]byte, error) {
	var missing []string
	out := envRef.ReplaceAllFunc(data, func(ref []byte) []byte {
		name := string(ref[2 : len(ref)-1])
		v, ok := os.LookupEnv(name)
		if !ok {
			missing = append(missing, name)
		}
		return []byte(v)
	})
	if len(missing) > 0 {
		return nil, fmt.Errorf("%w: environment variables not set: %s", ErrConfig, strings.Join(missing, ", "))
	}
	return out, nil
}

// Parse expands ${NAME} references, then parses, defaults and
// validates a config.
func Parse(data []byte) (*Config, *keys.Set, error) {
	data, err := expandEnv(data)
	if err != nil {
		return nil, nil, err
	}
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
	if c.NATS.Replicas == 0 {
		c.NATS.Replicas = 1
	}
	if c.NATS.DurableDCs == 0 && len(c.NATS.Datacenters) > 0 {
		c.NATS.DurableDCs = min(2, len(c.NATS.Datacenters))
	}
	if c.Increments.Stream == "" {
		c.Increments.Stream = "COUNTERS"
	}
	if c.Increments.Placement == "" {
		c.Increments.Placement = c.NATS.Placement
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
	if c.NATS.Creds != "" && c.NATS.NKey != "" {
		bad("nats: creds and nkey are exclusive")
	}
	if (c.NATS.TLS.Cert == "") != (c.NATS.TLS.Key == "") {
		bad("nats.tls: cert and key go together")
	}
	if r := c.NATS.Replicas; r != 1 && r != 3 && r != 5 {
		bad("nats.replicas %d: want 1, 3 or 5 (JetStream's quorum needs an odd number)", r)
	}
	if c.NATS.URL == "" && (c.NATS.Replicas > 1 || len(c.NATS.Datacenters) > 0) {
		bad("nats: replicas above 1 and datacenters need nats.url (a NATS cluster); the embedded server is a single node")
	}
	if dcs := c.NATS.Datacenters; len(dcs) > 0 {
		if c.NATS.Placement != "" && c.NATS.Placement != c.DC {
			bad("nats.placement %q: with datacenters each DC's stream is in its own cluster (%s); remove placement", c.NATS.Placement, c.DC)
		}
		seen := map[string]bool{}
		for _, d := range dcs {
			if !streamNameRE.MatchString(d) || seen[d] {
				bad("nats.datacenters: %q is empty, repeated, or not letters, digits, - and _", d)
			}
			seen[d] = true
		}
		if !seen[c.DC] {
			bad("nats.datacenters %v does not list this dc (%s)", dcs, c.DC)
		}
		if c.NATS.DurableDCs < 1 || c.NATS.DurableDCs > len(dcs) {
			bad("nats.durable_dcs %d: want 1 to %d (the datacenters listed)", c.NATS.DurableDCs, len(dcs))
		}
	} else if c.NATS.DurableDCs != 0 || c.NATS.CopyTimeout != 0 {
		bad("nats.durable_dcs and nats.copy_timeout need nats.datacenters")
	}
	if c.NATS.CopyTimeout < 0 {
		bad("nats.copy_timeout must not be negative")
	}
	if c.MemoryLimit < 0 {
		bad("memory_limit %d: must not be negative", c.MemoryLimit)
	}
	if c.OnSlotLoss != "" && c.OnSlotLoss != "exit" && c.OnSlotLoss != "flush" {
		bad("on_slot_loss %q: want exit or flush", c.OnSlotLoss)
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
		if p.AckWait != 0 && p.AckWait <= 10*time.Second {
			bad("purge.ack_wait %s: must be above 10s (the purger's progress signal)", p.AckWait)
		}
		if p.Timeout < 0 || p.GateMaxWait < 0 || p.StaleTTL < 0 || p.Concurrency < 0 || p.RecordAfter < 0 || p.MaxBacklogBytes < 0 || p.MaxBytes < 0 {
			bad("purge: durations, sizes and concurrency must not be negative")
		}
	}
	if len(c.Counters) > 0 {
		set, err := counters.Compile(c.Counters)
		if err != nil {
			errs = append(errs, fmt.Errorf("counters: %w", err))
		}
		c.CounterSet = set
		if !c.Tail {
			bad("counters: need tail: true (the batcher runs with the tail role)")
		}
		if c.Messages.Prefix == "" {
			bad("counters: need messages.prefix: every flush invalidates the counters' keys with a message under that prefix")
		}
		if c.Messages.Prefix == counters.RepairPrefix {
			bad("messages.prefix %q is reserved for counter repairs", c.Messages.Prefix)
		}
		bc := batcher.Config{MaxPending: c.Batcher.MaxPending, Interval: c.Batcher.Interval}
		if err := bc.Validate(); err != nil {
			bad("batcher: %v", err)
		}
		pc := counterstore.Config{DSN: "postgres://x@localhost/x", Table: c.Batcher.Table, CheckpointTable: c.Batcher.CheckpointTable}
		if err := pc.Validate(); err != nil {
			bad("batcher: %v", err)
		}
		if !streamNameRE.MatchString(c.Increments.Stream) || c.Increments.Stream == c.NATS.Stream {
			bad("increments.stream %q: want letters, digits, - and _, not the invalidation stream", c.Increments.Stream)
		}
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

var streamNameRE = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// redact hides a DSN's password in an error from url.Parse, which quotes
// the whole URL.
func redact(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return fmt.Errorf("%s: %v", ue.Op, ue.Err)
	}
	return err
}
