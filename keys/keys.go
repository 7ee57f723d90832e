// Package keys maps a decoded row change, or an explicit invalidation
// message, to the memcached keys it invalidates, using per-table key
// templates such as "post:{id}".
//
// It is pure: no I/O, no logging, no clock. Decoding the WAL is left to wal/,
// publishing the keys to bus/ and deleting them to purge/. Problems with one
// key come back as errors next to the keys that could be rendered, so the
// caller can log and count them and the stream goes on (invariant I6).
//
// # Templates
//
// A template is literal text with column placeholders in braces:
// "user_posts:{author_id}". "{{" and "}}" stand for a literal "{" and "}"
// (so "post:{{{id}}}" renders "post:{42}", handy for hash tags). A
// placeholder names a column exactly as Postgres reports it (case matters,
// no quoting); it may not be empty, contain whitespace or control bytes,
// or use the reserved modifier characters ':', '|', '!' and '%'. A template
// without placeholders is a static key, emitted for every change of its
// table. Compile rejects templates whose literal text alone makes an
// invalid memcached key.
//
// # Which values a change renders
//
//   - INSERT renders each template with the new row.
//   - DELETE renders with the old row (Change.Old).
//   - UPDATE renders each template twice, with the old values and with the
//     new values, so a row whose key column moved invalidates both keys.
//     Identical results are emitted once. When Change.Old is nil or lacks a
//     column, the old value of that column is taken from the new row. That
//     is right only because pgoutput sends the old row of an UPDATE whenever
//     a replica-identity column changed: it holds as long as the replica
//     identity covers every template column, which is what
//     `invalidator check` verifies (REPLICA IDENTITY FULL, or an identity
//     index holding the columns). With a weaker identity, an UPDATE that
//     moves a non-identity key column invalidates only the new key, and a
//     DELETE cannot render the template (ErrOldValueMissing).
//   - A new value that is an unchanged TOAST value (Value.Unchanged) takes
//     the old value when Change.Old has it; otherwise the key cannot be
//     rendered and ErrUnchangedToast is returned for that template.
//   - A NULL value renders no key for that template and that row version,
//     and is not an error: a cached object keyed by a NULL column does not
//     exist.
//   - TRUNCATE cannot be mapped to rows. Static templates of the table and
//     the rule's TruncateKeys are emitted; unless TruncateKeys is set, or
//     every template of the table is static, ErrTruncate is returned as
//     well, and operators must flush the affected keys themselves (or let
//     their TTL expire). See Rule.TruncateKeys.
//   - A change to a table without a rule yields no keys and no error.
//
// Each template yields at most one error per change; the other templates
// of the change still render. Keys never panics.
//
// # Messages
//
// ParseMessage reads the content of an explicit invalidation sent with
// SELECT pg_logical_emit_message(true, 'invalidate', 'k1 k2 ...').
package keys

import (
	"errors"
	"fmt"
	"strconv"
	"unicode/utf8"

	"github.com/pgcache/pgcache/mckey"
)

// MaxKeyLen is the longest key memcached accepts, in bytes.
const MaxKeyLen = mckey.MaxLen

// Errors about keys, from Validate, Keys and ParseMessage. Keys and
// ParseMessage wrap them in *Error; test with errors.Is.
var (
	// They are mckey's errors: keys accepts exactly the keys memcached
	// (and so mcpool and leaseproxy) accept.
	ErrKeyEmpty       = mckey.ErrEmpty
	ErrKeyTooLong     = mckey.ErrTooLong
	ErrKeyInvalidChar = mckey.ErrBadByte
	// ErrKeyInvalidUTF8: the key is not valid UTF-8. memcached would take
	// it, but the invalidation stream carries keys as JSON text, where
	// invalid bytes would become U+FFFD: a different key. It is refused
	// instead, named and counted.
	ErrKeyInvalidUTF8 = errors.New("keys: key is not valid UTF-8")
)

// Errors from Keys for a change that cannot be (fully) mapped to keys. They
// come wrapped in *Error with the table and template.
var (
	// ErrUnchangedToast: a new value was an unchanged TOAST value and the
	// old row did not carry it either (REPLICA IDENTITY FULL fixes that).
	ErrUnchangedToast = errors.New("keys: unchanged TOAST value not sent and not in the old row")
	// ErrColumnMissing: the new row has no such column (the rule names a
	// column that does not exist, or the publication's column list omits it).
	ErrColumnMissing = errors.New("keys: column not in the row")
	// ErrOldValueMissing: a DELETE's old row does not carry the column,
	// because the table's replica identity does not include it.
	ErrOldValueMissing = errors.New("keys: column not in the old row (replica identity does not include it)")
	// ErrTruncate: a TRUNCATE of a table with per-row templates; its keys
	// cannot be derived and must be flushed by other means.
	ErrTruncate = errors.New("keys: table truncated, per-row keys cannot be derived")
	// ErrUnknownOp: Change.Op is not one of Insert, Update, Delete, Truncate.
	ErrUnknownOp = errors.New("keys: unknown operation")
)

// Errors from Compile, wrapped in *Error with the table and template.
var (
	ErrTemplateUnbalanced  = errors.New("keys: unbalanced braces in template")
	ErrTemplateEmptyColumn = errors.New("keys: empty column name in template")
	ErrTemplateSyntax      = errors.New("keys: unsupported syntax in template placeholder")
	ErrTruncateKeyColumn   = errors.New("keys: truncate key has a placeholder; truncate keys must be static")
	ErrRuleTable           = errors.New("keys: invalid table name in rule")
	ErrRuleNoKeys          = errors.New("keys: rule has no keys")
)

// Error is a problem with one template, one rendered key or one message key.
// Err is one of the package's sentinel errors.
type Error struct {
	Table    string // "schema.table"; empty for message keys
	Template string // the template or truncate key involved; empty if none
	Column   string // the column involved; empty if none
	Key      string // the offending message key; empty for templates
	Err      error
}

func (e *Error) Error() string {
	b := make([]byte, 0, 64)
	if e.Err != nil {
		b = append(b, e.Err.Error()...)
	} else {
		b = append(b, "keys: error"...)
	}
	sep := " ("
	add := func(name, v string) {
		b = append(b, sep...)
		b = append(b, name...)
		b = append(b, ' ')
		b = strconv.AppendQuote(b, v)
		sep = ", "
	}
	if e.Table != "" {
		add("table", e.Table)
	}
	if e.Template != "" {
		add("template", e.Template)
	}
	if e.Column != "" {
		add("column", e.Column)
	}
	if e.Key != "" {
		k := e.Key
		if len(k) > 64 {
			k = k[:64] + "..."
		}
		add("key", k)
	}
	if sep == ", " {
		b = append(b, ')')
	}
	return string(b)
}

func (e *Error) Unwrap() error { return e.Err }

// Validate reports whether key is a valid memcached key (mckey.Check):
// 1 to 250 bytes, none of them a space, CR, LF or NUL. Other control
// bytes and bytes >= 0x80 are allowed, as memcached allows them.
// It must also be valid UTF-8 (ErrKeyInvalidUTF8), to travel on the
// stream unchanged.
func Validate(key string) error {
	if err := mckey.Check(key); err != nil {
		return err
	}
	if !utf8.ValidString(key) {
		return fmt.Errorf("%w: %q", ErrKeyInvalidUTF8, key)
	}
	return nil
}

// badByte returns the index of the first byte of s that memcached does not
// accept in a key, or -1.
func badByte(s string) int { return mckey.BadByte(s) }
