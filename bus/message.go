// Package bus carries invalidations between datacenters over NATS
// JetStream: it connects, creates the streams (invalidations, counter
// increments), publishes batches of keys asynchronously with bounded
// in-flight, a dedup id and a size under the server's max payload, does
// each transaction's acknowledgement once its keys are durable, keeps the
// tail's pipeline state in a key-value bucket, and gives each datacenter
// a durable consumer. It knows nothing of Postgres or memcached:
// positions are plain uint64 LSNs and keys are strings.
package bus

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"strings"
	"time"
)

// Version is the message format this package writes.
const Version = 1

// ErrBadMessage reports a stream message that cannot be decoded. The
// consumer terminates such a message (it would never decode) and counts it.
var ErrBadMessage = errors.New("bus: bad message")

// Batch is one invalidation message, format version 1, JSON-encoded:
//
//	{"v":1,"origin":"dc1","commit_lsn":23462344,"end_lsn":23462400,
//	 "commit_time":"2026-11-21T01:02:03.456789Z","txs":3,"part":0,"final":true,
//	 "keys":["post:42","user_posts:7"]}
//
// A batch groups the keys of one or more whole transactions, in WAL order,
// or one part of a transaction too large for one message (part counts
// from 0; final marks the last part). CommitLSN is the highest commit LSN in
// the batch: a replica that has replayed past it (replay LSN > CommitLSN)
// shows every transaction of the batch. EndLSN is the end of the last
// transaction's commit record, or 0 in a non-final part. CommitTime is the
// earliest commit time in the batch, so commit-to-purge latency is never
// understated. Readers ignore fields they do not know; a message with a
// higher major version is rejected with ErrBadMessage.
type Batch struct {
	V          int       `json:"v"`
	Origin     string    `json:"origin"`
	CommitLSN  uint64    `json:"commit_lsn"`
	EndLSN     uint64    `json:"end_lsn,omitempty"`
	CommitTime time.Time `json:"commit_time"`
	Txs        int       `json:"txs"`
	Part       int       `json:"part,omitempty"`
	Final      bool      `json:"final"`
	// Flush announces that every datacenter must flush its whole pool,
	// once (the slot was lost: the changes in between cannot be decoded).
	// Such a batch has no keys; CommitLSN is where the new slot starts.
	Flush bool `json:"flush,omitempty"`
	// Timeline is the primary's timeline the batch was published on,
	// when known: a replica must follow it (or a later one) before the
	// batch passes its gate. 0: unknown.
	Timeline uint32   `json:"timeline,omitempty"`
	Keys     []string `json:"keys"`
}

// Encode returns the wire form of b. '<', '>' and '&' are not escaped,
// so a key's encoded size is its length plus JSON's escapes of quotes,
// backslashes and control bytes (see KeyBytes).
func (b *Batch) Encode() ([]byte, error) {
	b.V = Version
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(b); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

// KeyBytes is the number of bytes key takes in an encoded Batch, with
// its quotes and the comma before it. Keys are valid UTF-8 (keys
// refuses the others), so no byte is replaced.
func KeyBytes(key string) int {
	n := 3
	for i := 0; i < len(key); i++ {
		switch c := key[i]; {
		case c == '"' || c == '\\' || c == '\n' || c == '\r' || c == '\t':
			n += 2
		case c < 0x20:
			n += 6
		default:
			n++
		}
	}
	// U+2028 and U+2029 are escaped as \u2028 and \u2029 (3 bytes -> 6).
	n += 3 * (strings.Count(key, "\u2028") + strings.Count(key, "\u2029"))
	return n
}

// batchOverhead bounds the bytes of an encoded Batch other than its keys.
const batchOverhead = 512

// Decode parses a message. Every failure wraps ErrBadMessage.
func Decode(data []byte) (*Batch, error) {
	var b Batch
	if err := json.Unmarshal(data, &b); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadMessage, err)
	}
	if b.V < 1 || b.V > Version {
		return nil, fmt.Errorf("%w: version %d (this build reads 1..%d)", ErrBadMessage, b.V, Version)
	}
	if b.CommitLSN == 0 {
		return nil, fmt.Errorf("%w: no commit_lsn", ErrBadMessage)
	}
	return &b, nil
}

// MsgID is the JetStream dedup id of a batch. It covers the WAL position,
// the part and a hash of the keys, so a batch republished after a restart
// within the stream's duplicate window is stored once, while two batches
// with different keys never share an id (a shared id would drop one).
func (b *Batch) MsgID() string {
	h := fnv.New64a()
	for _, k := range b.Keys {
		h.Write([]byte(k))
		h.Write([]byte{0})
	}
	if b.Flush {
		// No origin: two tail processes that both see the slot lost
		// announce the flush of the same new slot, stored once.
		return fmt.Sprintf("flush-%X", b.CommitLSN)
	}
	return fmt.Sprintf("%s-%X-%X-%d-%x", b.Origin, b.CommitLSN, b.EndLSN, b.Part, h.Sum64())
}
