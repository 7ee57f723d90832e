// Package counters turns row changes into counter deltas: for each
// configured counter (a source table grouped by columns), an INSERT adds 1
// to its row's group, a DELETE subtracts 1, and an UPDATE that moves a row
// to another group moves 1 from the old group to the new one. It also
// parses the two other inputs of a counter: direct increments sent by
// applications over NATS (for counters without a source table, such as
// views), and the repair markers written by `invalidator repair`.
//
// It is pure: no I/O, no logging, no clock. Reading the WAL is left to
// wal/, aggregating and storing the deltas to batcher/.
//
// # Groups and keys
//
// A counter's group is the values of its group_by columns, in pgoutput's
// text format, encoded as a JSON array of strings (Group), for example
// ["42"]. That is the grp column of the counters table. Each group has one
// cache key, rendered from the counter's key template ("post:{post_id}:likes");
// the template must use every group_by column and no other, so that a key
// names exactly one group.
//
// # Which changes count
//
//   - INSERT: +1 to the new row's group.
//   - DELETE: -1 to the old row's group. The old row must carry the group
//     columns: the table's replica identity must include them, which
//     `invalidator check` verifies (otherwise ErrOldValueMissing).
//   - UPDATE: when the old and the new group differ, -1 to the old and +1
//     to the new. pgoutput sends the old row only when a replica-identity
//     column changed, so with an identity that covers the group columns a
//     missing old row means the group did not change. An unchanged TOAST
//     value takes the old value.
//   - A row whose group has a NULL value is in no group: it is not counted
//     (SELECT count(*) ... WHERE col = v never counts it either).
//   - TRUNCATE of a source table resets the counter: every group of the
//     counter is set to zero at that point of the WAL (which is the true
//     count, since the table is empty there), and the keys of every group
//     stored so far are invalidated. Rows inserted later in the same
//     transaction are counted after the reset. This is a recount, not an
//     approximation.
package counters

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/pgcache/pgcache/keys"
	"github.com/pgcache/pgcache/row"
)

// Errors. Compile, Deltas and the parsers wrap them with the counter and
// what was being done; test with errors.Is.
var (
	// ErrRuleName: the counter name is empty or not [a-z0-9_], 1-63 bytes.
	ErrRuleName = errors.New("counters: invalid counter name")
	// ErrRuleDuplicate: two counters have the same name or key template.
	ErrRuleDuplicate = errors.New("counters: duplicate counter")
	// ErrRuleTable: the table is not "schema.table" (a bare name means public).
	ErrRuleTable = errors.New("counters: invalid table name")
	// ErrRuleGroupBy: group_by is empty or repeats or misnames a column.
	ErrRuleGroupBy = errors.New("counters: invalid group_by")
	// ErrRuleKey: the key template does not parse, is not a valid memcached
	// key, or does not use exactly the group_by columns.
	ErrRuleKey = errors.New("counters: invalid key template")
	// ErrColumnMissing: the new row lacks a group column (the rule names a
	// column the table does not have).
	ErrColumnMissing = errors.New("counters: group column not in the row")
	// ErrOldValueMissing: a DELETE's old row lacks a group column: the
	// table's replica identity does not include it.
	ErrOldValueMissing = errors.New("counters: group column not in the old row (replica identity does not include it)")
	// ErrUnchangedToast: an UPDATE's new group value is an unchanged TOAST
	// value that the old row does not carry either.
	ErrUnchangedToast = errors.New("counters: unchanged TOAST group value not sent")
	// ErrKey: the key rendered for a group is not a valid memcached key.
	ErrKey = errors.New("counters: group renders an invalid key")
	// ErrUnknownOp: Change.Op is not INSERT, UPDATE, DELETE or TRUNCATE.
	ErrUnknownOp = errors.New("counters: unknown operation")
	// ErrBadIncrement: a NATS increment message is malformed.
	ErrBadIncrement = errors.New("counters: malformed increment")
	// ErrUnknownCounter: an increment or repair names no configured counter.
	ErrUnknownCounter = errors.New("counters: unknown counter")
	// ErrNotIncrementable: an increment names a counter that has a source
	// table; its count comes from the WAL only, or it would not stay equal
	// to SELECT count(*).
	ErrNotIncrementable = errors.New("counters: counter has a source table and takes no increments")
	// ErrBadRepair: a repair marker is malformed.
	ErrBadRepair = errors.New("counters: malformed repair marker")
)

// Rule is one counter, as written in the config's counters: section.
type Rule struct {
	// Name identifies the counter (the counter column of the counters
	// table, and the subject suffix of its increments).
	Name string `yaml:"name"`
	// Table is the source table, "schema.table" (a bare name means
	// public). Empty: the counter has no source table and is only changed
	// by increments over NATS.
	Table string `yaml:"table"`
	// GroupBy are the columns whose values name a group.
	GroupBy []string `yaml:"group_by"`
	// Key is the cache key template of one group, for example
	// "post:{post_id}:likes"; it must use every group_by column, and no
	// other.
	Key string `yaml:"key"`
}

// Delta is a change to one group of one counter.
type Delta struct {
	Counter string
	Group   string // the group values as a JSON array of strings
	Key     string // the group's cache key
	N       int64
}

// Counter is a compiled rule.
type Counter struct {
	Rule
	keys *keys.Set // renders Key from a fake row of the group columns
	tkey string    // the table name keys.Set knows the template under
}

// Set is a compiled set of counters. It is immutable and safe for
// concurrent use.
type Set struct {
	byName  map[string]*Counter
	byTable map[string][]*Counter
	names   []string
}

var nameRE = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

// Compile checks and compiles rules. Every problem is reported, joined.
func Compile(rules []Rule) (*Set, error) {
	s := &Set{byName: map[string]*Counter{}, byTable: map[string][]*Counter{}}
	var errs []error
	bad := func(r Rule, err error, format string, args ...any) {
		errs = append(errs, fmt.Errorf("counter %q: %w: %s", r.Name, err, fmt.Sprintf(format, args...)))
	}
	keysSeen := map[string]string{}
	for _, r := range rules {
		if !nameRE.MatchString(r.Name) {
			bad(r, ErrRuleName, "want lower-case letters, digits and underscores, 1 to 63")
			continue
		}
		if _, dup := s.byName[r.Name]; dup {
			bad(r, ErrRuleDuplicate, "name used twice")
			continue
		}
		if r.Table != "" {
			t, ok := normTable(r.Table)
			if !ok {
				bad(r, ErrRuleTable, "table %q: want \"schema.table\"", r.Table)
				continue
			}
			r.Table = t
		}
		if len(r.GroupBy) == 0 {
			bad(r, ErrRuleGroupBy, "group_by is empty")
			continue
		}
		okCols := true
		for i, c := range r.GroupBy {
			if c == "" || strings.ContainsAny(c, "{}:|!% \t\r\n") || slices.Contains(r.GroupBy[:i], c) {
				bad(r, ErrRuleGroupBy, "column %q is empty, repeated or unusable in a template", c)
				okCols = false
				break
			}
		}
		if !okCols {
			continue
		}
		if r.Key == "" {
			bad(r, ErrRuleKey, "key is empty")
			continue
		}
		if other, dup := keysSeen[r.Key]; dup {
			bad(r, ErrRuleDuplicate, "key template %q is also counter %q's", r.Key, other)
			continue
		}
		tkey := "counter." + r.Name
		ks, err := keys.Compile([]keys.Rule{{Table: tkey, Keys: []string{r.Key}}})
		if err != nil {
			bad(r, ErrRuleKey, "%v", err)
			continue
		}
		used := ks.Columns(tkey)
		if !sameSet(used, r.GroupBy) {
			bad(r, ErrRuleKey, "template %q uses columns %v; want exactly the group_by columns %v", r.Key, used, r.GroupBy)
			continue
		}
		keysSeen[r.Key] = r.Name
		c := &Counter{Rule: r, keys: ks, tkey: tkey}
		s.byName[r.Name] = c
		s.names = append(s.names, r.Name)
		if r.Table != "" {
			s.byTable[r.Table] = append(s.byTable[r.Table], c)
		}
	}
	slices.Sort(s.names)
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return s, nil
}

func sameSet(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for _, x := range a {
		if !slices.Contains(b, x) {
			return false
		}
	}
	return true
}

// normTable returns "schema.table", adding "public." to a bare name.
func normTable(t string) (string, bool) {
	if t == "" || strings.Count(t, ".") > 1 {
		return "", false
	}
	for i := 0; i < len(t); i++ {
		if t[i] <= ' ' || t[i] == 0x7f || t[i] == '"' {
			return "", false
		}
	}
	if !strings.Contains(t, ".") {
		t = "public." + t
	}
	schema, table, _ := strings.Cut(t, ".")
	if schema == "" || table == "" {
		return "", false
	}
	return t, true
}

// Len is the number of counters.
func (s *Set) Len() int {
	if s == nil {
		return 0
	}
	return len(s.names)
}

// Names are the counter names, sorted.
func (s *Set) Names() []string {
	if s == nil {
		return nil
	}
	return slices.Clone(s.names)
}

// Counter returns the named counter, or nil.
func (s *Set) Counter(name string) *Counter {
	if s == nil {
		return nil
	}
	return s.byName[name]
}

// Tables are the source tables ("schema.table"), sorted.
func (s *Set) Tables() []string {
	if s == nil {
		return nil
	}
	out := make([]string, 0, len(s.byTable))
	for t := range s.byTable {
		out = append(out, t)
	}
	slices.Sort(out)
	return out
}

// Columns are the group columns the counters of table use, in order of
// first use: the columns whose old values the replica identity must send.
func (s *Set) Columns(table string) []string {
	if s == nil {
		return nil
	}
	var out []string
	for _, c := range s.byTable[table] {
		for _, col := range c.GroupBy {
			if !slices.Contains(out, col) {
				out = append(out, col)
			}
		}
	}
	return out
}

// HasTable reports whether table is the source of a counter.
func (s *Set) HasTable(table string) bool {
	if s == nil {
		return false
	}
	return len(s.byTable[table]) > 0
}

// Group encodes group values as the grp column stores them.
func Group(values []string) string {
	b, _ := json.Marshal(values) // strings never fail
	return string(b)
}

// ParseGroup decodes a Group.
func ParseGroup(g string) ([]string, error) {
	var v []string
	if err := json.Unmarshal([]byte(g), &v); err != nil {
		return nil, fmt.Errorf("counters: group %q: %w", g, err)
	}
	return v, nil
}

// Key renders the cache key of the group with these values (in group_by
// order). It fails with ErrKey when the key is not a valid memcached key.
func (c *Counter) Key(values []string) (string, error) {
	if len(values) != len(c.GroupBy) {
		return "", fmt.Errorf("counter %q: %w: got %d group values; want %d", c.Name, ErrKey, len(values), len(c.GroupBy))
	}
	cols := make([]row.Column, len(values))
	for i, v := range values {
		cols[i] = row.Column{Name: c.GroupBy[i], Value: row.Value{Text: v}}
	}
	ks, errs := c.keys.Keys(nil, row.Change{Table: c.tkey, Op: row.Insert, New: cols})
	if len(errs) > 0 || len(ks) != 1 {
		return "", fmt.Errorf("counter %q: %w: %v", c.Name, ErrKey, errors.Join(errs...))
	}
	return ks[0], nil
}

// delta builds the delta of one group.
func (c *Counter) delta(values []string, n int64) (Delta, error) {
	k, err := c.Key(values)
	if err != nil {
		return Delta{}, err
	}
	return Delta{Counter: c.Name, Group: Group(values), Key: k, N: n}, nil
}

// Deltas appends to dst the deltas of one row change, and returns in
// resets the counters a TRUNCATE resets to zero. A change of a table that
// is no counter's source yields nothing. Problems with one counter come
// back as errors (one per counter at most) next to the other counters'
// deltas; Deltas never panics.
func (s *Set) Deltas(dst []Delta, ch row.Change) (out []Delta, resets []string, errs []error) {
	out = dst
	if s == nil {
		return out, nil, nil
	}
	for _, c := range s.byTable[ch.Table] {
		var err error
		switch ch.Op {
		case row.Insert:
			out, err = c.rowDelta(out, ch.New, nil, +1, false)
		case row.Delete:
			out, err = c.rowDelta(out, ch.Old, nil, -1, true)
		case row.Update:
			out, err = c.update(out, ch)
		case row.Truncate:
			resets = append(resets, c.Name)
		default:
			err = fmt.Errorf("counter %q: %w: %v", c.Name, ErrUnknownOp, ch.Op)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return out, resets, errs
}

// groupOf reads the group values from row (falling back to fallback for a
// missing column or an unchanged TOAST value). null reports a NULL value:
// the row is in no group.
func (c *Counter) groupOf(row, fallback []row.Column, old bool) (values []string, null bool, err error) {
	values = make([]string, len(c.GroupBy))
	for i, col := range c.GroupBy {
		v, ok := find(row, col)
		if ok && v.Unchanged {
			ok = false
			if fv, fok := find(fallback, col); fok && !fv.Unchanged {
				v, ok = fv, true
			} else {
				return nil, false, fmt.Errorf("counter %q: %w (column %q)", c.Name, ErrUnchangedToast, col)
			}
		}
		if !ok {
			if fv, fok := find(fallback, col); fok && !fv.Unchanged {
				v, ok = fv, true
			}
		}
		if !ok {
			if old {
				return nil, false, fmt.Errorf("counter %q: %w (column %q)", c.Name, ErrOldValueMissing, col)
			}
			return nil, false, fmt.Errorf("counter %q: %w (column %q)", c.Name, ErrColumnMissing, col)
		}
		if v.Null {
			null = true
		}
		values[i] = v.Text
	}
	return values, null, nil
}

func (c *Counter) rowDelta(dst []Delta, row, fallback []row.Column, n int64, old bool) ([]Delta, error) {
	values, null, err := c.groupOf(row, fallback, old)
	if err != nil || null {
		return dst, err
	}
	d, err := c.delta(values, n)
	if err != nil {
		return dst, err
	}
	return append(dst, d), nil
}

func (c *Counter) update(dst []Delta, ch row.Change) ([]Delta, error) {
	newV, newNull, err := c.groupOf(ch.New, ch.Old, false)
	if err != nil {
		return dst, err
	}
	if ch.Old == nil {
		// No identity column changed, and the identity covers the group
		// columns: the row stayed in its group.
		return dst, nil
	}
	oldV, oldNull, err := c.groupOf(ch.Old, ch.New, true)
	if err != nil {
		return dst, err
	}
	if oldNull == newNull && slices.Equal(oldV, newV) {
		return dst, nil
	}
	if !oldNull {
		d, err := c.delta(oldV, -1)
		if err != nil {
			return dst, err
		}
		dst = append(dst, d)
	}
	if !newNull {
		d, err := c.delta(newV, +1)
		if err != nil {
			return dst, err
		}
		dst = append(dst, d)
	}
	return dst, nil
}

func find(cols []row.Column, name string) (row.Value, bool) {
	for _, c := range cols {
		if c.Name == name {
			return c.Value, true
		}
	}
	return row.Value{}, false
}
