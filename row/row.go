// Package row is the row model every stage shares: one decoded row change
// (its table, operation, old and new column values, and WAL position) as
// wal produces it and keys and counters read it. It holds data only, and
// leaves decoding to wal and rendering to keys and counters.
package row

import "strconv"

// Op is the kind of row change.
type Op uint8

// The operations pgoutput reports. The zero Op is invalid.
const (
	Insert Op = iota + 1
	Update
	Delete
	Truncate
)

func (o Op) String() string {
	switch o {
	case Insert:
		return "INSERT"
	case Update:
		return "UPDATE"
	case Delete:
		return "DELETE"
	case Truncate:
		return "TRUNCATE"
	}
	return "Op(" + strconv.Itoa(int(o)) + ")"
}

// Value is one column value in pgoutput's text format.
type Value struct {
	Text string // the text form; meaningless when Null or Unchanged
	Null bool   // SQL NULL ('n' in pgoutput)
	// Unchanged is an unchanged TOAST value ('u' in pgoutput): it equals
	// the old value but was not sent.
	Unchanged bool
}

// Column is a named column value.
type Column struct {
	Name  string
	Value Value
}

// Change is one decoded row change (or one truncated table).
type Change struct {
	// Table is "schema.table", unquoted. For a partition of a partitioned
	// table published through its root, it is the root's name.
	Table string
	Op    Op
	// LSN is the position of the change's WAL record (0 when unknown).
	LSN uint64
	// Old is the old row of an UPDATE or DELETE as pgoutput sent it. With
	// REPLICA IDENTITY FULL it holds every column. Otherwise it holds only
	// the replica-identity columns: the converter must leave out the other
	// columns, which pgoutput's 'K' tuple sends as NULL ('n'), since a NULL
	// here means a real NULL and renders no key. Old is nil when not sent,
	// which for an UPDATE means no identity column changed.
	Old []Column
	// New is the new row of an INSERT or UPDATE: every column, with
	// unchanged TOAST values marked Unchanged.
	New []Column
}
