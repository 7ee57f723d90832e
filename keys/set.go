package keys

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"unicode/utf8"

	"github.com/pgcache/pgcache/row"
)

// Rule maps changes of one table to keys.
type Rule struct {
	// Table is "schema.table", unquoted; a name without a schema means
	// "public.". Names holding more than one dot are rejected.
	Table string `yaml:"table"`
	// Keys are templates such as "post:{id}", rendered for every change of
	// the table (see the package doc for which row values are used).
	Keys []string `yaml:"keys"`
	// TruncateKeys are static keys (no placeholders) deleted when the table
	// is truncated, for example a namespace or version key that the
	// application folds into its row keys, or list keys. Setting them
	// declares that they cover a TRUNCATE, so Keys then returns them
	// without ErrTruncate. Static templates of Keys are always emitted on
	// TRUNCATE too.
	TruncateKeys []string `yaml:"truncate_keys"`
}

// Set is a compiled set of rules. It is immutable and safe for concurrent
// use.
type Set struct {
	tables map[string]*table // by "schema.table"
	names  []string          // sorted keys of tables
}

// table holds the compiled rules of one table.
type table struct {
	name      string
	cols      []string // columns referenced by tpls, in order of first use
	tpls      []template
	truncKeys []string
	// truncOK: a TRUNCATE is fully covered (TruncateKeys set, or every
	// template static), so it is not reported as ErrTruncate.
	truncOK bool
}

// Compile checks and compiles rules. Rules naming the same table are
// merged, and repeated templates are dropped. It reports every problem
// found, joined with errors.Join; each is an *Error wrapping one of
// ErrRuleTable, ErrRuleNoKeys, ErrTemplateUnbalanced,
// ErrTemplateEmptyColumn, ErrTemplateSyntax, ErrTruncateKeyColumn,
// ErrKeyEmpty, ErrKeyTooLong or ErrKeyInvalidChar (for literal text that
// alone makes an invalid key).
func Compile(rules []Rule) (*Set, error) {
	s := &Set{tables: make(map[string]*table)}
	var errs []error
	for _, r := range rules {
		name, ok := normTable(r.Table)
		if !ok {
			errs = append(errs, &Error{Table: r.Table, Err: ErrRuleTable})
			continue
		}
		if len(r.Keys) == 0 {
			errs = append(errs, &Error{Table: name, Err: ErrRuleNoKeys})
			continue
		}
		t := s.tables[name]
		if t == nil {
			t = &table{name: name}
		}
		for _, src := range r.Keys {
			if err := t.addTemplate(src); err != nil {
				errs = append(errs, &Error{Table: name, Template: src, Err: err})
			}
		}
		for _, src := range r.TruncateKeys {
			if err := t.addTruncateKey(src); err != nil {
				errs = append(errs, &Error{Table: name, Template: src, Err: err})
			}
		}
		if len(t.tpls) > 0 && s.tables[name] == nil {
			s.tables[name] = t
			s.names = append(s.names, name)
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	for _, t := range s.tables {
		t.truncOK = len(t.truncKeys) > 0
		if !t.truncOK {
			t.truncOK = true
			for i := range t.tpls {
				if t.tpls[i].static == "" {
					t.truncOK = false
				}
			}
		}
	}
	slices.Sort(s.names)
	return s, nil
}

// normTable returns name as "schema.table".
func normTable(name string) (string, bool) {
	if name == "" || badByte(name) >= 0 || strings.ContainsRune(name, '"') {
		return "", false
	}
	i := strings.IndexByte(name, '.')
	if i < 0 {
		return "public." + name, true
	}
	if i == 0 || i == len(name)-1 || strings.IndexByte(name[i+1:], '.') >= 0 {
		return "", false
	}
	return name, true
}

func (t *table) addTemplate(src string) error {
	for i := range t.tpls {
		if t.tpls[i].src == src {
			return nil
		}
	}
	lits, names, err := parseTemplate(src)
	if err != nil {
		return err
	}
	tp := template{src: src}
	if len(names) == 0 {
		if err := Validate(lits[0]); err != nil {
			return err
		}
		tp.static = lits[0]
		tp.litLen = len(lits[0])
		t.tpls = append(t.tpls, tp)
		return nil
	}
	for _, l := range lits {
		tp.litLen += len(l)
		if i := badByte(l); i >= 0 {
			return fmt.Errorf("%w: byte 0x%02x in literal text", ErrKeyInvalidChar, l[i])
		}
	}
	if tp.litLen > MaxKeyLen {
		return fmt.Errorf("%w: literal text alone is %d bytes", ErrKeyTooLong, tp.litLen)
	}
	for i, name := range names {
		if lits[i] != "" {
			tp.parts = append(tp.parts, part{lit: lits[i], col: -1})
		}
		tp.parts = append(tp.parts, part{col: t.colIndex(name)})
	}
	if l := lits[len(lits)-1]; l != "" {
		tp.parts = append(tp.parts, part{lit: l, col: -1})
	}
	t.tpls = append(t.tpls, tp)
	return nil
}

func (t *table) addTruncateKey(src string) error {
	lits, names, err := parseTemplate(src)
	if err != nil {
		return err
	}
	if len(names) > 0 {
		return ErrTruncateKeyColumn
	}
	if err := Validate(lits[0]); err != nil {
		return err
	}
	if !slices.Contains(t.truncKeys, lits[0]) {
		t.truncKeys = append(t.truncKeys, lits[0])
	}
	return nil
}

// colIndex returns the index of name in t.cols, adding it if new.
func (t *table) colIndex(name string) int {
	if i := slices.Index(t.cols, name); i >= 0 {
		return i
	}
	t.cols = append(t.cols, name)
	return len(t.cols) - 1
}

// Tables returns the tables that have rules, as sorted "schema.table" names.
func (s *Set) Tables() []string {
	if s == nil {
		return nil
	}
	return slices.Clone(s.names)
}

// Columns returns the columns that the templates of table reference, in
// order of first use, or nil if the table has no rule. A name without a
// schema means "public.". `invalidator check` uses it to verify that the
// columns exist and that the replica identity supplies them in the old row
// of an UPDATE or DELETE.
func (s *Set) Columns(table string) []string {
	if s == nil {
		return nil
	}
	name, ok := normTable(table)
	if !ok {
		return nil
	}
	t := s.tables[name]
	if t == nil {
		return nil
	}
	return slices.Clone(t.cols)
}

// Value states after resolving a template column for one row version.
const (
	stOK         uint8 = iota // s is the value
	stNull                    // SQL NULL: the template renders no key
	stBad                     // s has a byte memcached rejects
	stMissing                 // ErrColumnMissing
	stToast                   // ErrUnchangedToast
	stOldMissing              // ErrOldValueMissing
)

type val struct {
	s  string
	st uint8
}

// slot is one template column resolved for a change.
type slot struct {
	old, new val
}

// Keys appends to dst the keys that change c invalidates and returns the
// extended slice, plus one *Error for each template that could not be
// rendered (the other templates still are). Keys emitted by this call are
// distinct, but are not compared with keys already in dst. Changes to
// tables without rules yield no keys and no error. c.Table must be
// "schema.table". See the package doc for the semantics.
//
// Keys allocates only the key strings it appends (plus, when dst grows,
// the slice) and the errors it returns.
func (s *Set) Keys(dst []string, c row.Change) ([]string, []error) {
	if s == nil {
		return dst, nil
	}
	t := s.tables[c.Table]
	if t == nil {
		return dst, nil
	}
	switch c.Op {
	case row.Insert, row.Update, row.Delete:
	case row.Truncate:
		return t.truncate(dst)
	default:
		return dst, []error{&Error{Table: t.name, Err: fmt.Errorf("%w: %v", ErrUnknownOp, c.Op)}}
	}

	var stack [8]slot
	var vals []slot
	if n := len(t.cols); n <= len(stack) {
		vals = stack[:n]
	} else {
		vals = make([]slot, n)
	}
	for i, name := range t.cols {
		vals[i] = resolve(&c, name)
	}

	var errs []error
	start := len(dst)
	var buf [MaxKeyLen]byte
	for i := range t.tpls {
		tp := &t.tpls[i]
		if tp.static != "" {
			dst = appendUnique(dst, start, tp.static)
			continue
		}
		var err, oerr error
		if c.Op != row.Delete {
			dst, err = t.render(dst, start, buf[:0], tp, vals, false)
		}
		if c.Op != row.Insert {
			dst, oerr = t.render(dst, start, buf[:0], tp, vals, true)
		}
		if err == nil {
			err = oerr
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return dst, errs
}

// render renders tp with the old or new values, and appends the key to dst
// unless dst[start:] already holds it. buf is scratch space of capacity
// MaxKeyLen.
func (t *table) render(dst []string, start int, buf []byte, tp *template, vals []slot, old bool) ([]string, error) {
	n := tp.litLen
	var fail *part
	for i := range tp.parts {
		p := &tp.parts[i]
		if p.col < 0 {
			continue
		}
		v := vals[p.col].pick(old)
		switch v.st {
		case stNull:
			return dst, nil
		case stOK:
			n += len(v.s)
		default:
			if fail == nil {
				fail = p
			}
		}
	}
	if fail != nil {
		v := vals[fail.col].pick(old)
		var err error
		switch v.st {
		case stBad:
			if i := badByte(v.s); i >= 0 {
				err = fmt.Errorf("%w: byte 0x%02x in column value", ErrKeyInvalidChar, v.s[i])
			} else {
				err = fmt.Errorf("%w: in column value", ErrKeyInvalidUTF8)
			}
		case stMissing:
			err = ErrColumnMissing
		case stToast:
			err = ErrUnchangedToast
		default:
			err = ErrOldValueMissing
		}
		return dst, &Error{Table: t.name, Template: tp.src, Column: t.cols[fail.col], Err: err}
	}
	if n == 0 {
		return dst, &Error{Table: t.name, Template: tp.src, Err: ErrKeyEmpty}
	}
	if n > MaxKeyLen {
		return dst, &Error{Table: t.name, Template: tp.src, Err: fmt.Errorf("%w: %d bytes", ErrKeyTooLong, n)}
	}
	for i := range tp.parts {
		p := &tp.parts[i]
		if p.col < 0 {
			buf = append(buf, p.lit...)
		} else {
			buf = append(buf, vals[p.col].pick(old).s...)
		}
	}
	for _, k := range dst[start:] {
		if k == string(buf) {
			return dst, nil
		}
	}
	return append(dst, string(buf)), nil
}

func (sl *slot) pick(old bool) val {
	if old {
		return sl.old
	}
	return sl.new
}

// truncate returns the keys and error for a TRUNCATE of t.
func (t *table) truncate(dst []string) ([]string, []error) {
	start := len(dst)
	for i := range t.tpls {
		if k := t.tpls[i].static; k != "" {
			dst = appendUnique(dst, start, k)
		}
	}
	for _, k := range t.truncKeys {
		dst = appendUnique(dst, start, k)
	}
	if t.truncOK {
		return dst, nil
	}
	return dst, []error{&Error{Table: t.name, Err: ErrTruncate}}
}

func appendUnique(dst []string, start int, k string) []string {
	if slices.Contains(dst[start:], k) {
		return dst
	}
	return append(dst, k)
}

// resolve finds the old and new values of column name in c.
func resolve(c *row.Change, name string) slot {
	var sl slot
	ov, oldOK := find(c.Old, name)
	if c.Op != row.Delete {
		nv, ok := find(c.New, name)
		switch {
		case !ok:
			sl.new = val{st: stMissing}
		case nv.Unchanged && oldOK && !ov.Unchanged:
			sl.new = makeVal(ov)
		case nv.Unchanged:
			sl.new = val{st: stToast}
		default:
			sl.new = makeVal(nv)
		}
	}
	if c.Op != row.Insert {
		switch {
		case oldOK && !ov.Unchanged:
			sl.old = makeVal(ov)
		case c.Op == row.Update:
			// Not sent: no identity column changed, so the old value
			// equals the new one (given check's identity guarantee).
			sl.old = sl.new
		case oldOK:
			sl.old = val{st: stToast}
		default:
			sl.old = val{st: stOldMissing}
		}
	}
	return sl
}

func makeVal(v row.Value) val {
	switch {
	case v.Null:
		return val{st: stNull}
	case badByte(v.Text) >= 0 || !utf8.ValidString(v.Text):
		return val{s: v.Text, st: stBad}
	}
	return val{s: v.Text, st: stOK}
}

func find(cols []row.Column, name string) (row.Value, bool) {
	for i := range cols {
		if cols[i].Name == name {
			return cols[i].Value, true
		}
	}
	return row.Value{}, false
}
