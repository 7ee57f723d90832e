package lease

import (
	"fmt"
	"time"
)

// What the proxy does with flush_all (Config.FlushAll).
const (
	// FlushRefuse answers flush_all with SERVER_ERROR: one client cannot
	// empty the whole pool (and send every key to the database at once).
	FlushRefuse = "refuse"
	// FlushForward sends flush_all to every server of the pool.
	FlushForward = "forward"
)

// What the proxy does with a set of a key for which it holds no lease
// record (LeaseConfig.ForeignSet). See the package documentation.
const (
	// ForeignCheck looks up the lease record the winning proxy wrote to
	// memcached and, when there is one, stores only if the lease still
	// holds (ms C<cas>). With no record the set is stored as usual.
	ForeignCheck = "check"
	// ForeignPlain stores the set as usual: fastest, but a fill that went
	// to another proxy than its get is not checked against invalidations.
	ForeignPlain = "plain"
	// ForeignRefuse answers NOT_STORED to any set or add with no lease
	// record on this proxy: safe for fills, but plain writes are refused.
	ForeignRefuse = "refuse"
)

// Config configures a Server.
type Config struct {
	// MaxConns is the most client connections served at once. One more is
	// answered "SERVER_ERROR too many open connections" and closed.
	MaxConns int
	// MaxValueBytes is the largest data block of a storage command. A
	// larger one is answered "SERVER_ERROR object too large for cache" and
	// its data discarded.
	MaxValueBytes int
	// MaxLineBytes is the longest command line, in bytes, other than a
	// retrieval (get, gets, gat, gats). A longer line is answered
	// "CLIENT_ERROR line too long"; when no newline came within the read
	// buffer (at least 4 KiB) the connection is closed, as it cannot be
	// resynchronised.
	MaxLineBytes int
	// MaxGetLineBytes is the longest retrieval line (many keys), in bytes.
	MaxGetLineBytes int
	// IdleTimeout closes a connection that sends nothing for this long,
	// and one that stops in the middle of a data block (with "CLIENT_ERROR
	// bad data chunk"). The deadline is renewed lazily, so the actual
	// idle time before closing is between IdleTimeout/2 and IdleTimeout.
	// 0: never.
	IdleTimeout time.Duration
	// WriteTimeout closes a connection whose client does not read its
	// replies: a write to it that cannot go out within this time fails,
	// and the connection is closed (counted in WriteTimeouts). The
	// deadline is renewed lazily, so a write may block between
	// WriteTimeout/2 and WriteTimeout. 0: never.
	WriteTimeout time.Duration
	// ReplyBytes bounds the bytes of values that the multi-key retrievals
	// of all connections hold at once: before a batch of keys (at most
	// MultiGetParallel) is read, MaxValueBytes per key read is reserved
	// from it, and released once the batch is written to the client; a
	// retrieval that finds it spent waits. One connection holds at most
	// MultiGetParallel x MaxValueBytes. A single-key get holds at most one
	// value per connection and reserves nothing.
	ReplyBytes int64
	// FlushAll is FlushRefuse or FlushForward.
	FlushAll string
	// Version is what "version" answers.
	Version string
	// MultiGetParallel bounds the keys of one multi-key get that are
	// fetched at once: a longer get is read and answered in batches of
	// this many keys, each written to the client before the next is read.
	MultiGetParallel int
	// Lease configures leases.
	Lease LeaseConfig
}

// LeaseConfig configures leases (see the package documentation).
type LeaseConfig struct {
	// TTL is how long a winner may take to fill, rounded up to whole
	// seconds (memcached's unit) and at least 1s: after it, another
	// reader takes the lease over (and its fill is refused). It is also
	// how long this proxy keeps a lease's local record (MaxRecords).
	// 0: leases off; gets are plain reads.
	TTL time.Duration
	// Wait is how long a reader that lost the lease waits for the
	// winner's value before it gets a miss. 0: no waiting.
	Wait time.Duration
	// Stale serves a stale item (marked with md I) to readers while one
	// refill is in flight. Off: they wait as on a miss.
	Stale bool
	// PollMin and PollMax bound the interval at which one poller per key
	// and proxy looks for the winner's value: PollMin first, doubling up
	// to PollMax.
	PollMin time.Duration
	PollMax time.Duration
	// MaxRecords bounds the lease records this proxy keeps (key to lease
	// CAS). Beyond it the oldest is dropped; its fill is then checked as
	// a foreign set.
	MaxRecords int
	// ForeignSet is ForeignCheck, ForeignPlain or ForeignRefuse.
	ForeignSet string
	// Memory is how long a lease is remembered after it is handed out, on
	// the connection that got it and in its record in memcached: a fill
	// that arrives later than this after its miss is no longer known as
	// a fill and is stored as a plain write. Within it, a fill that began
	// before an invalidation of its key is refused however late it comes
	// (see the package documentation). Rounded up to whole seconds; less
	// than TTL counts as TTL. It should be much longer than the slowest
	// query.
	Memory time.Duration
	// RecordPrefix prefixes the key of the lease record written to
	// memcached for ForeignCheck: "<prefix><key>#<n>" (or
	// "<prefix>sha256:<hex>#<n>" for long keys), n chosen so that the
	// record is on the key's server.
	RecordPrefix string
}

// DefaultConfig returns the defaults: 4096 connections, 1 MiB values,
// 2 KiB lines (256 KiB for retrievals), 10 minutes idle, 30 seconds to
// take a reply, 256 MiB of multi-get replies in flight, flush_all
// refused, 32 keys of a multi-get at once, and leases of 2s with a 250ms
// wait, stale serving on, polling from 5ms to 50ms, leases remembered
// for a minute, 100000 records and foreign sets checked.
func DefaultConfig() Config {
	return Config{
		MaxConns:         4096,
		MaxValueBytes:    1 << 20,
		MaxLineBytes:     2048,
		MaxGetLineBytes:  256 << 10,
		IdleTimeout:      10 * time.Minute,
		WriteTimeout:     30 * time.Second,
		ReplyBytes:       256 << 20,
		FlushAll:         FlushRefuse,
		Version:          "1.6.18-leaseproxy",
		MultiGetParallel: 32,
		Lease: LeaseConfig{
			TTL:          2 * time.Second,
			Wait:         250 * time.Millisecond,
			Stale:        true,
			PollMin:      5 * time.Millisecond,
			PollMax:      50 * time.Millisecond,
			Memory:       time.Minute,
			MaxRecords:   100000,
			ForeignSet:   ForeignCheck,
			RecordPrefix: "_lease:",
		},
	}
}

// Validate checks the fields and their relations.
func (c Config) Validate() error {
	switch {
	case c.MaxConns < 1:
		return fmt.Errorf("%w: MaxConns (%d) must be at least 1", ErrConfig, c.MaxConns)
	case c.MaxValueBytes < 1 || c.MaxValueBytes > 1<<30:
		return fmt.Errorf("%w: MaxValueBytes (%d) must be between 1 and 1 GiB", ErrConfig, c.MaxValueBytes)
	case c.MaxLineBytes < 256:
		return fmt.Errorf("%w: MaxLineBytes (%d) must be at least 256 (a 250-byte key must fit)", ErrConfig, c.MaxLineBytes)
	case c.MaxGetLineBytes < c.MaxLineBytes:
		return fmt.Errorf("%w: MaxGetLineBytes (%d) cannot be less than MaxLineBytes (%d)", ErrConfig, c.MaxGetLineBytes, c.MaxLineBytes)
	case c.IdleTimeout < 0:
		return fmt.Errorf("%w: IdleTimeout (%s) cannot be negative", ErrConfig, c.IdleTimeout)
	case c.FlushAll != FlushRefuse && c.FlushAll != FlushForward:
		return fmt.Errorf("%w: FlushAll %q (want %q or %q)", ErrConfig, c.FlushAll, FlushRefuse, FlushForward)
	case !validKey([]byte(c.Version)) || !validToken([]byte(c.Version)):
		return fmt.Errorf("%w: Version %q must be 1 to 250 printable bytes without spaces", ErrConfig, c.Version)
	case c.WriteTimeout < 0:
		return fmt.Errorf("%w: WriteTimeout (%s) cannot be negative", ErrConfig, c.WriteTimeout)
	case c.ReplyBytes < int64(c.MaxValueBytes):
		return fmt.Errorf("%w: ReplyBytes (%d) cannot be less than MaxValueBytes (%d)", ErrConfig, c.ReplyBytes, c.MaxValueBytes)
	case c.MultiGetParallel < 1:
		return fmt.Errorf("%w: MultiGetParallel (%d) must be at least 1", ErrConfig, c.MultiGetParallel)
	}
	return c.Lease.Validate()
}

// Validate checks the lease fields and their relations.
func (c LeaseConfig) Validate() error {
	if c.TTL == 0 {
		return nil // leases off: the rest is unused
	}
	switch {
	case c.TTL < time.Second:
		return fmt.Errorf("%w: Lease.TTL (%s) must be 0 (off) or at least 1s: memcached counts whole seconds", ErrConfig, c.TTL)
	case c.TTL > 30*24*time.Hour:
		return fmt.Errorf("%w: Lease.TTL (%s) cannot exceed 30 days", ErrConfig, c.TTL)
	case c.Wait < 0:
		return fmt.Errorf("%w: Lease.Wait (%s) cannot be negative", ErrConfig, c.Wait)
	case c.PollMin <= 0:
		return fmt.Errorf("%w: Lease.PollMin (%s) must be positive", ErrConfig, c.PollMin)
	case c.PollMax < c.PollMin:
		return fmt.Errorf("%w: Lease.PollMax (%s) cannot be less than Lease.PollMin (%s)", ErrConfig, c.PollMax, c.PollMin)
	case c.Memory < 0:
		return fmt.Errorf("%w: Lease.Memory (%s) cannot be negative", ErrConfig, c.Memory)
	case c.Memory > 30*24*time.Hour:
		return fmt.Errorf("%w: Lease.Memory (%s) cannot exceed 30 days", ErrConfig, c.Memory)
	case c.MaxRecords < 1:
		return fmt.Errorf("%w: Lease.MaxRecords (%d) must be at least 1", ErrConfig, c.MaxRecords)
	case c.ForeignSet != ForeignCheck && c.ForeignSet != ForeignPlain && c.ForeignSet != ForeignRefuse:
		return fmt.Errorf("%w: Lease.ForeignSet %q (want %q, %q or %q)", ErrConfig, c.ForeignSet, ForeignCheck, ForeignPlain, ForeignRefuse)
	case c.ForeignSet == ForeignCheck && (c.RecordPrefix == "" || len(c.RecordPrefix) > 64 || !validKey([]byte(c.RecordPrefix))):
		return fmt.Errorf("%w: Lease.RecordPrefix %q must be 1 to 64 bytes without spaces or control characters", ErrConfig, c.RecordPrefix)
	}
	return nil
}

// memory is Memory, at least TTL.
func (c LeaseConfig) memory() time.Duration { return max(c.Memory, c.TTL) }

// memorySeconds is memory() in whole seconds, rounded up.
func (c LeaseConfig) memorySeconds() int64 {
	return int64((c.memory() + time.Second - 1) / time.Second)
}

// ttlSeconds is the lease TTL in whole seconds, rounded up.
func (c LeaseConfig) ttlSeconds() int64 {
	return int64((c.TTL + time.Second - 1) / time.Second)
}
