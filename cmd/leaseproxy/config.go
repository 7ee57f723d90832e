package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"gopkg.in/yaml.v3"

	"github.com/pgcache/pgcache/lease"
	"github.com/pgcache/pgcache/mcpool"
)

// fileConfig is leaseproxy.yaml. Absent fields keep the packages'
// defaults (lease.DefaultConfig, mcpool.DefaultConfig).
type fileConfig struct {
	Listen  string   `yaml:"listen"`
	Servers []string `yaml:"servers"`
	Hash    string   `yaml:"hash"`
	Lease   struct {
		TTL          time.Duration `yaml:"ttl"`
		Wait         time.Duration `yaml:"wait"`
		Stale        bool          `yaml:"stale"`
		PollMin      time.Duration `yaml:"poll_min"`
		PollMax      time.Duration `yaml:"poll_max"`
		Memory       time.Duration `yaml:"memory"`
		MaxRecords   int           `yaml:"max_records"`
		ForeignSet   string        `yaml:"foreign_set"`
		RecordPrefix string        `yaml:"record_prefix"`
	} `yaml:"lease"`
	Limits struct {
		MaxConns        int           `yaml:"max_conns"`
		MaxValueBytes   int           `yaml:"max_value_bytes"`
		MaxLineBytes    int           `yaml:"max_line_bytes"`
		MaxGetLineBytes int           `yaml:"max_get_line_bytes"`
		IdleTimeout     time.Duration `yaml:"idle_timeout"`
		WriteTimeout    time.Duration `yaml:"write_timeout"`
		ReplyBytes      int64         `yaml:"reply_bytes"`
		MultiGetBatch   int           `yaml:"multiget_batch"`
	} `yaml:"limits"`
	FlushAll string `yaml:"flush_all"`
	Version  string `yaml:"version"`
	Pool     struct {
		ConnsPerServer  int           `yaml:"conns_per_server"`
		Timeout         time.Duration `yaml:"timeout"`
		DialTimeout     time.Duration `yaml:"dial_timeout"`
		BreakerFailures int           `yaml:"breaker_failures"`
		BreakerOpenFor  time.Duration `yaml:"breaker_open_for"`
	} `yaml:"pool"`
	HTTP struct {
		Listen string `yaml:"listen"`
		Pprof  bool   `yaml:"pprof"`
	} `yaml:"http"`
	DrainTimeout time.Duration `yaml:"drain_timeout"`
	// Procs is GOMAXPROCS: the cores the proxy's goroutines run on at
	// once. 0 keeps Go's default, every core the process may use. The
	// default is 1, like nutcracker's single thread: it spends the least
	// CPU per request (no cross-core wake-ups: 8.5-9.1us/op against
	// 9.8-11.4 for procs 0) and, on a shared 2-core host with a herd on
	// one key costing the proxy O(1) memcached reads (lease's single
	// flight), it met the three targets best together: 1 fill at every
	// herd size up to 10,000 in every run (as procs 0), the same
	// throughput (0.89-0.93x nutcracker against 0.88-0.94x), and a p99
	// of 1.11-1.25x nutcracker's against 1.29-1.60x (scripts/bench/
	// leaseproxy.sh, 3 runs each). Its herd margin is smaller (clients'
	// p99 at N = 10,000 195-245ms against 165-190ms; lease.wait, 250ms,
	// counts from each read's arrival at the proxy): a host with spare
	// cores and larger herds may prefer 0.
	Procs int `yaml:"procs"`
	// GCPercent is the Go garbage collector's target (GOGC). The default,
	// 400, lets the heap grow to five times what is live between
	// collections (the proxy's live heap is small: connection buffers and
	// lease records), so collections run a quarter as often. On this
	// project's 2-core machine it moved the proxy's p99 from 0.96-1.34x
	// nutcracker's to 1.03-1.18x (3 runs each, scripts/bench/
	// leaseproxy.sh). 0 keeps Go's default (100); the GOGC environment
	// variable, when set, wins.
	GCPercent int `yaml:"gc_percent"`
	// MemoryLimit is Go's soft memory limit (GOMEMLIMIT) in bytes: the
	// collector works harder as the heap nears it. The default, 640 MiB,
	// sits under the systemd unit's MemoryHigh (768M) and MemoryMax (1G),
	// and above what the limits can hold (limits.reply_bytes, 256 MiB, of
	// multi-get replies, plus about 20 KiB of buffers per connection and
	// one value per connection sending or reading one). 0: none; the
	// GOMEMLIMIT environment variable, when set, wins.
	MemoryLimit int64 `yaml:"memory_limit"`
	Log         struct {
		Level  string `yaml:"level"`
		Format string `yaml:"format"`
	} `yaml:"log"`
}

// defaults fills a fileConfig with the packages' defaults, so that the
// file only overrides what it names.
func defaults() fileConfig {
	lc, pc := lease.DefaultConfig(), mcpool.DefaultConfig()
	var fc fileConfig
	fc.Listen = "127.0.0.1:11311"
	fc.Hash = pc.Hash
	fc.Lease.TTL, fc.Lease.Wait, fc.Lease.Stale = lc.Lease.TTL, lc.Lease.Wait, lc.Lease.Stale
	fc.Lease.PollMin, fc.Lease.PollMax = lc.Lease.PollMin, lc.Lease.PollMax
	fc.Lease.MaxRecords, fc.Lease.ForeignSet, fc.Lease.RecordPrefix = lc.Lease.MaxRecords, lc.Lease.ForeignSet, lc.Lease.RecordPrefix
	fc.Lease.Memory = lc.Lease.Memory
	fc.Limits.MaxConns, fc.Limits.MaxValueBytes = lc.MaxConns, lc.MaxValueBytes
	fc.Limits.MaxLineBytes, fc.Limits.MaxGetLineBytes, fc.Limits.IdleTimeout = lc.MaxLineBytes, lc.MaxGetLineBytes, lc.IdleTimeout
	fc.FlushAll, fc.Version = lc.FlushAll, lc.Version
	fc.Pool.Timeout, fc.Pool.DialTimeout = pc.Timeout, pc.DialTimeout
	// One connection per server batches the most requests per write and
	// read, which is what the proxy's throughput depends on (see
	// BENCHMARKS.md); mcpool's default of 2 suits the purger.
	fc.Pool.ConnsPerServer = 1
	fc.Pool.BreakerFailures, fc.Pool.BreakerOpenFor = pc.Breaker.Failures, pc.Breaker.OpenFor
	fc.HTTP.Listen = "127.0.0.1:9188"
	fc.DrainTimeout = 10 * time.Second
	fc.Procs = 1 // see fileConfig.Procs
	fc.GCPercent = 400
	fc.MemoryLimit = 640 << 20
	fc.Limits.WriteTimeout, fc.Limits.ReplyBytes, fc.Limits.MultiGetBatch = lc.WriteTimeout, lc.ReplyBytes, lc.MultiGetParallel
	fc.Log.Level, fc.Log.Format = "info", "json"
	return fc
}

// loadConfig reads and checks the file at path. Unknown fields are errors.
func loadConfig(path string) (fileConfig, error) {
	fc := defaults()
	data, err := os.ReadFile(path)
	if err != nil {
		return fc, fmt.Errorf("read config: %w", err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&fc); err != nil {
		return fc, fmt.Errorf("parse config %s: %w", path, err)
	}
	if fc.Listen == "" {
		return fc, errors.New("config: listen is empty")
	}
	if fc.GCPercent < 0 {
		return fc, fmt.Errorf("config: gc_percent (%d) cannot be negative", fc.GCPercent)
	}
	if fc.MemoryLimit < 0 {
		return fc, fmt.Errorf("config: memory_limit (%d) cannot be negative", fc.MemoryLimit)
	}
	if fc.Procs < 0 {
		return fc, fmt.Errorf("config: procs (%d) cannot be negative", fc.Procs)
	}
	if fc.DrainTimeout <= 0 {
		return fc, fmt.Errorf("config: drain_timeout (%s) must be positive", fc.DrainTimeout)
	}
	if err := fc.leaseConfig().Validate(); err != nil {
		return fc, err
	}
	return fc, fc.poolConfig().Validate()
}

func (fc fileConfig) leaseConfig() lease.Config {
	c := lease.DefaultConfig()
	c.MaxConns, c.MaxValueBytes = fc.Limits.MaxConns, fc.Limits.MaxValueBytes
	c.MaxLineBytes, c.MaxGetLineBytes, c.IdleTimeout = fc.Limits.MaxLineBytes, fc.Limits.MaxGetLineBytes, fc.Limits.IdleTimeout
	c.FlushAll, c.Version = fc.FlushAll, fc.Version
	c.WriteTimeout, c.ReplyBytes, c.MultiGetParallel = fc.Limits.WriteTimeout, fc.Limits.ReplyBytes, fc.Limits.MultiGetBatch
	c.Lease = lease.LeaseConfig{
		TTL: fc.Lease.TTL, Wait: fc.Lease.Wait, Stale: fc.Lease.Stale,
		PollMin: fc.Lease.PollMin, PollMax: fc.Lease.PollMax, Memory: fc.Lease.Memory, MaxRecords: fc.Lease.MaxRecords,
		ForeignSet: fc.Lease.ForeignSet, RecordPrefix: fc.Lease.RecordPrefix,
	}
	return c
}

func (fc fileConfig) poolConfig() mcpool.Config {
	c := mcpool.DefaultConfig()
	c.Servers, c.Hash = fc.Servers, fc.Hash
	c.ConnsPerServer, c.Timeout, c.DialTimeout = fc.Pool.ConnsPerServer, fc.Pool.Timeout, fc.Pool.DialTimeout
	c.Breaker.Failures, c.Breaker.OpenFor = fc.Pool.BreakerFailures, fc.Pool.BreakerOpenFor
	c.MaxValueSize = max(c.MaxValueSize, fc.Limits.MaxValueBytes)
	// Keep room for as many requests in flight per server as mcpool's
	// default (2 connections of 1024) with fewer connections: a herd
	// sends thousands at once.
	c.MaxInFlight = max(c.MaxInFlight, 2*mcpool.DefaultConnConfig().MaxInFlight/max(c.ConnsPerServer, 1))
	return c
}

// newLogger builds the zap logger the file asks for.
func (fc fileConfig) newLogger() (*zap.Logger, error) {
	level, err := zapcore.ParseLevel(fc.Log.Level)
	if err != nil {
		return nil, fmt.Errorf("config: log.level: %w", err)
	}
	var zc zap.Config
	switch fc.Log.Format {
	case "json":
		zc = zap.NewProductionConfig()
	case "console":
		zc = zap.NewDevelopmentConfig()
	default:
		return nil, fmt.Errorf("config: log.format %q (want json or console)", fc.Log.Format)
	}
	zc.Level = zap.NewAtomicLevelAt(level)
	return zc.Build()
}
