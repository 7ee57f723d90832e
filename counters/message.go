package counters

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"strconv"
)

// IncrementSubjectPrefix is where applications publish direct increments:
// the subject of counter C is "counters.incr.C". The invalidator's
// increments stream captures "counters.incr.>".
const IncrementSubjectPrefix = "counters.incr."

// MaxIncrementSize bounds an increment message, in bytes.
const MaxIncrementSize = 16 << 10

// Increment is a direct increment sent by an application, as JSON:
//
//	{"counter": "post_views", "key": {"post_id": 42}, "delta": 1}
//
// key holds the value of every group_by column (a string, a number or a
// boolean, as Postgres would print it); delta is an integer, 1 when left
// out.
type Increment struct {
	Counter string                     `json:"counter"`
	Key     map[string]json.RawMessage `json:"key"`
	Delta   *int64                     `json:"delta"`
}

// ParseIncrement decodes an increment and resolves it against the
// counters: the counter must exist and have no source table. It returns
// the delta to apply. Errors wrap ErrBadIncrement, ErrUnknownCounter,
// ErrNotIncrementable or ErrKey; ParseIncrement never panics.
func (s *Set) ParseIncrement(data []byte) (Delta, error) {
	if len(data) > MaxIncrementSize {
		return Delta{}, fmt.Errorf("%w: %d bytes, more than %d", ErrBadIncrement, len(data), MaxIncrementSize)
	}
	var inc Increment
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&inc); err != nil {
		return Delta{}, fmt.Errorf("%w: %v", ErrBadIncrement, err)
	}
	if dec.More() {
		return Delta{}, fmt.Errorf("%w: trailing data after the object", ErrBadIncrement)
	}
	c := s.Counter(inc.Counter)
	if c == nil {
		return Delta{}, fmt.Errorf("%w: %q", ErrUnknownCounter, inc.Counter)
	}
	if c.Table != "" {
		return Delta{}, fmt.Errorf("%w: %q counts %s", ErrNotIncrementable, c.Name, c.Table)
	}
	if len(inc.Key) != len(c.GroupBy) {
		return Delta{}, fmt.Errorf("%w: counter %q: key has %d columns; want %v", ErrBadIncrement, c.Name, len(inc.Key), c.GroupBy)
	}
	values := make([]string, len(c.GroupBy))
	for i, col := range c.GroupBy {
		raw, ok := inc.Key[col]
		if !ok {
			return Delta{}, fmt.Errorf("%w: counter %q: key lacks column %q", ErrBadIncrement, c.Name, col)
		}
		v, err := scalarText(raw)
		if err != nil {
			return Delta{}, fmt.Errorf("%w: counter %q: column %q: %v", ErrBadIncrement, c.Name, col, err)
		}
		values[i] = v
	}
	n := int64(1)
	if inc.Delta != nil {
		n = *inc.Delta
	}
	if n == math.MinInt64 {
		return Delta{}, fmt.Errorf("%w: delta out of range", ErrBadIncrement)
	}
	return c.delta(values, n)
}

// scalarText returns a JSON string, number or boolean as Postgres prints
// it in text form.
func scalarText(raw json.RawMessage) (string, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 {
		return "", fmt.Errorf("empty value")
	}
	switch raw[0] {
	case '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return "", err
		}
		return s, nil
	case 't', 'f':
		var b bool
		if err := json.Unmarshal(raw, &b); err != nil {
			return "", err
		}
		if b {
			return "t", nil
		}
		return "f", nil
	case 'n':
		return "", fmt.Errorf("null is in no group")
	case '{', '[':
		return "", fmt.Errorf("want a string, number or boolean")
	}
	var num json.Number
	if err := json.Unmarshal(raw, &num); err != nil {
		return "", err
	}
	if _, err := strconv.ParseInt(num.String(), 10, 64); err != nil {
		return "", fmt.Errorf("number %s: only integers name a group (send other values as strings)", num)
	}
	return num.String(), nil
}

// RepairPrefix is the pg_logical_emit_message prefix of the repair markers
// that `invalidator repair` writes.
const RepairPrefix = "pgcache_counters_repair"

// Repair is a repair marker, written by `invalidator repair` in the
// transaction that counted the source table under a lock, so that its
// position in the WAL is exactly where the count holds:
//
//	{"counter": "post_likes", "all": false, "groups": [{"group": ["42"], "n": 10}]}
//
// With all, every group of the counter not listed is set to zero.
type Repair struct {
	Counter string        `json:"counter"`
	All     bool          `json:"all"`
	Groups  []RepairGroup `json:"groups"`
}

// RepairGroup is the true count of one group.
type RepairGroup struct {
	Group []string `json:"group"`
	N     int64    `json:"n"`
}

// Encode returns the marker's JSON.
func (r Repair) Encode() []byte {
	b, _ := json.Marshal(r) // plain data never fails
	return b
}

// ParseRepair decodes a repair marker and resolves it: the counters to
// reset to zero first (the counter when All), then the absolute values to
// set. Errors wrap ErrBadRepair, ErrUnknownCounter or ErrKey; it never
// panics.
func (s *Set) ParseRepair(data []byte) (resets []string, sets []Delta, err error) {
	var r Repair
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrBadRepair, err)
	}
	c := s.Counter(r.Counter)
	if c == nil {
		return nil, nil, fmt.Errorf("%w: %q", ErrUnknownCounter, r.Counter)
	}
	for _, g := range r.Groups {
		d, err := c.delta(g.Group, g.N)
		if err != nil {
			return nil, nil, err
		}
		sets = append(sets, d)
	}
	if r.All {
		resets = []string{c.Name}
	}
	return resets, sets, nil
}
