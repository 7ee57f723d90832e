// Package wal tails a Postgres primary's logical replication slot: it sets
// up the publication and the pgoutput slot, decodes committed transactions
// into row.Change values and logical messages, hands them to a Handler in
// WAL order with an acknowledgement (Ack) each, and is the only code that
// confirms a position to the server. It leaves key rendering to keys,
// transport to bus and cache deletes to purge.
//
// # Positions
//
// The slot's confirmed position (confirmed_flush_lsn) moves to the end of
// a transaction only when every part of its Ack, and of every transaction
// delivered before it, is done: whoever takes a transaction (the
// publisher, the batcher) does its part once its data is durable
// (invariant I1). Two more moves keep an idle or fully filtered database
// from retaining WAL (invariant I5): when no transaction is open and
// every delivered one is acknowledged, Run moves the confirmed position to
// the server's WAL end reported by a keepalive, or past a logical message
// whose prefix is filtered out. Everything before that point has been
// decoded and either acknowledged, or was not published. Drain, the soft
// stop, waits for the outstanding Acks and moves the slot to the last
// confirmed position with SQL.
//
// # Delivery
//
// Only committed transactions are ever delivered: streaming of in-progress
// transactions is not enabled, so the server sends a transaction when it
// has committed. A transaction is delivered as a stream (Begin, Change and
// Message calls, Commit), so a transaction of a million rows is never held
// in memory by this package.
//
// Delivery is at least once. After a lost connection, Run starts again at
// the later of the confirmed position and the end of the last transaction
// whose Commit the Handler accepted, so a transaction that was cut off
// before its Commit is delivered again from its Begin. A new Stream (after
// a restart of the process) starts at the slot's confirmed position, so
// every transaction committed after it is delivered again.
package wal

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// Errors. Run and Setup wrap them with what was being done; test with
// errors.Is, or Retryable.
var (
	// ErrSlotInUse: another process streams from the slot. Run waits as a
	// hot standby and retries; it never returns it.
	ErrSlotInUse = errors.New("wal: replication slot in use by another process")
	// ErrSlotGone: the slot does not exist or was invalidated (its WAL was
	// removed). Run returns it: changes after the slot's last confirmed
	// position may never be delivered, so caches may be stale.
	ErrSlotGone = errors.New("wal: replication slot missing or invalidated")
	// ErrConnLost: the connection to the server failed or was closed. Run
	// reconnects with backoff.
	ErrConnLost = errors.New("wal: connection to postgres lost")
	// ErrDecode: a pgoutput message could not be decoded or broke the
	// protocol's order. An unknown message type is logged, counted and
	// skipped; a malformed row change stops Run, since skipping it would
	// lose an invalidation.
	ErrDecode = errors.New("wal: cannot decode pgoutput message")
	// ErrUnknownRelation: a row change names a relation the server did not
	// describe first. Run reconnects (the server describes every relation
	// again on a new connection); if it happens again at the same position
	// Run returns it.
	ErrUnknownRelation = errors.New("wal: row change for an undescribed relation")
	// ErrNoTable: a configured table does not exist.
	ErrNoTable = errors.New("wal: table does not exist")
	// ErrNoIdentity: a configured table has no replica identity (REPLICA
	// IDENTITY NOTHING, or DEFAULT without a primary key). Publishing it
	// would make every UPDATE and DELETE on it fail on the primary.
	ErrNoIdentity = errors.New("wal: table has no replica identity")
	// ErrRunning: Run was called while another Run of the Stream is active.
	ErrRunning = errors.New("wal: stream already running")
	// ErrRetry: a Handler returns an error wrapping it when it cannot
	// take a transaction now but will later, typically while the primary
	// it writes to restarts. Run closes the connection, reconnects with
	// backoff and delivers the transaction again. A handler that waited
	// on the primary instead would keep the connection open, and the
	// primary cannot finish a shutdown while its walsender waits for this
	// reader: neither would move again.
	ErrRetry = errors.New("wal: handler asks to retry the transaction")
)

// Retryable reports whether err is a condition Run recovers from by itself
// (a lost connection, a slot held by another process, a relation the
// server did not describe on this connection, a handler's ErrRetry).
func Retryable(err error) bool {
	return errors.Is(err, ErrConnLost) || errors.Is(err, ErrSlotInUse) || errors.Is(err, ErrUnknownRelation) ||
		errors.Is(err, ErrRetry)
}

// slotGoneAdvice is what the operator must do after ErrSlotGone.
const slotGoneAdvice = "caches may be stale: changes committed after the slot's last confirmed position " +
	"were not (and will not be) invalidated. To recover: recreate the slot (the invalidator's setup creates " +
	"it, or SELECT pg_create_logical_replication_slot('<slot>', 'pgoutput')), then flush the cached keys " +
	"of every rule table in every datacenter (or flush the memcached pools)"

func slotGone(slot, why string) error {
	return fmt.Errorf("%w: slot %q %s; %s", ErrSlotGone, slot, why,
		strings.Replace(slotGoneAdvice, "<slot>", slot, 1))
}

// Config says which database, slot, publication and tables to tail.
type Config struct {
	// DSN of the primary, as a libpq URL or key=value string.
	// replication=database is added for the replication connection.
	DSN string
	// Slot is the logical replication slot (pgoutput). Lower-case letters,
	// digits and underscores, at most 63. Empty means "cache_invalidator".
	Slot string
	// Publication is the publication the slot streams. Same form as Slot.
	// Empty means "cache_invalidator".
	Publication string
	// Tables are the "schema.table" names (unquoted, as Postgres reports
	// them) whose row changes are wanted. Setup creates the publication
	// for exactly these, or adds the missing ones to an existing
	// publication; tables already in the publication that are not listed
	// are left there (another tool may use them) and logged, and Run
	// drops their changes without calling the Handler. Empty means no
	// filter: Run delivers every change the publication sends.
	Tables []string
	// MessagePrefixes are the pg_logical_emit_message prefixes delivered
	// to Handler.Message (exact match). Other messages are ignored. Empty
	// means no message is delivered.
	MessagePrefixes []string
	// StatusInterval is how often a standby status update (the received
	// and confirmed positions) is sent to the server. Zero means 1s. It
	// must stay well under the server's wal_sender_timeout.
	StatusInterval time.Duration
	// ReconnectMin and ReconnectMax bound the exponential backoff (with
	// jitter) between attempts after a lost connection. Zero means 200ms
	// and 15s.
	ReconnectMin, ReconnectMax time.Duration
	// OnRelation, when set, is called with each relation the server
	// describes for a configured table (its replica identity included),
	// from Run's goroutine: it must not block.
	OnRelation func(Relation)
	// OnTimeline, when set, is called from Run's goroutine when a new
	// session finds the primary on another timeline than the last one (a
	// replica was promoted), before any change of the new session is
	// delivered. An error wrapping ErrRetry makes Run try again later;
	// another stops Run.
	OnTimeline func(context.Context, TimelineSwitch) error
	// Failover creates the slot as a failover slot (PostgreSQL 17 and
	// later; ignored before), and makes an existing slot one, so that
	// standbys with sync_replication_slots keep a copy that survives
	// their promotion. DefaultConfig sets it.
	Failover bool
	// StandbyRetry is how often a hot standby tries to take the slot
	// while another process holds it. Zero means 1s: one refused
	// START_REPLICATION a second costs the primary little and bounds the
	// takeover after the holder dies.
	StandbyRetry time.Duration
}

// Defaults of Config's zero fields.
const (
	DefaultSlot           = "cache_invalidator"
	DefaultPublication    = "cache_invalidator"
	DefaultStatusInterval = time.Second
	DefaultReconnectMin   = 200 * time.Millisecond
	DefaultReconnectMax   = 15 * time.Second
	DefaultStandbyRetry   = time.Second
)

// DefaultConfig returns a Config with every default filled in and the
// message prefix "invalidate". DSN and Tables are left empty.
func DefaultConfig() Config {
	return Config{
		Slot:            DefaultSlot,
		Publication:     DefaultPublication,
		MessagePrefixes: []string{"invalidate"},
		StatusInterval:  DefaultStatusInterval,
		ReconnectMin:    DefaultReconnectMin,
		ReconnectMax:    DefaultReconnectMax,
		StandbyRetry:    DefaultStandbyRetry,
		Failover:        true,
	}
}

// withDefaults fills zero fields.
func (c Config) withDefaults() Config {
	if c.Slot == "" {
		c.Slot = DefaultSlot
	}
	if c.Publication == "" {
		c.Publication = DefaultPublication
	}
	if c.StatusInterval == 0 {
		c.StatusInterval = DefaultStatusInterval
	}
	if c.ReconnectMin == 0 {
		c.ReconnectMin = DefaultReconnectMin
	}
	if c.ReconnectMax == 0 {
		c.ReconnectMax = DefaultReconnectMax
	}
	if c.StandbyRetry == 0 {
		c.StandbyRetry = DefaultStandbyRetry
	}
	return c
}

var nameRE = regexp.MustCompile(`^[a-z_][a-z0-9_]{0,62}$`)

// Validate checks c with its zero fields taken as defaults.
func (c Config) Validate() error {
	c = c.withDefaults()
	if c.DSN == "" {
		return errors.New("wal: config: DSN is empty")
	}
	if _, err := pgconn.ParseConfig(c.DSN); err != nil {
		return fmt.Errorf("wal: config: DSN: %w", err)
	}
	if !nameRE.MatchString(c.Slot) {
		return fmt.Errorf("wal: config: slot name %q: want lower-case letters, digits and underscores, at most 63", c.Slot)
	}
	if !nameRE.MatchString(c.Publication) {
		return fmt.Errorf("wal: config: publication name %q: want lower-case letters, digits and underscores, at most 63", c.Publication)
	}
	seen := make(map[string]bool, len(c.Tables))
	for _, t := range c.Tables {
		if _, _, err := splitTable(t); err != nil {
			return fmt.Errorf("wal: config: %w", err)
		}
		if seen[t] {
			return fmt.Errorf("wal: config: table %q listed twice", t)
		}
		seen[t] = true
	}
	for _, p := range c.MessagePrefixes {
		if p == "" || strings.IndexByte(p, 0) >= 0 {
			return fmt.Errorf("wal: config: message prefix %q: want non-empty text without NUL", p)
		}
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"StatusInterval", c.StatusInterval}, {"ReconnectMin", c.ReconnectMin}, {"ReconnectMax", c.ReconnectMax}, {"StandbyRetry", c.StandbyRetry}} {
		if d.v < 0 {
			return fmt.Errorf("wal: config: %s (%s) is negative", d.name, d.v)
		}
	}
	if c.ReconnectMin > c.ReconnectMax {
		return fmt.Errorf("wal: config: ReconnectMin (%s) cannot be larger than ReconnectMax (%s)", c.ReconnectMin, c.ReconnectMax)
	}
	return nil
}

// splitTable splits "schema.table". Both parts must be non-empty, free of
// control bytes, and the name must hold exactly one dot.
func splitTable(t string) (schema, table string, err error) {
	schema, table, ok := strings.Cut(t, ".")
	if !ok || schema == "" || table == "" || strings.Contains(table, ".") {
		return "", "", fmt.Errorf("table %q: want \"schema.table\"", t)
	}
	for i := 0; i < len(t); i++ {
		if t[i] < 0x20 || t[i] == 0x7f {
			return "", "", fmt.Errorf("table %q: control byte in name", t)
		}
	}
	return schema, table, nil
}
