package counters

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/pgcache/pgcache/keys"
	"github.com/pgcache/pgcache/row"
)

func mustCompile(t testing.TB, rules ...Rule) *Set {
	t.Helper()
	s, err := Compile(rules)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func likes() Rule {
	return Rule{Name: "post_likes", Table: "public.likes", GroupBy: []string{"post_id"}, Key: "post:{post_id}:likes"}
}

func col(name, v string) row.Column { return row.Column{Name: name, Value: row.Value{Text: v}} }

func TestCompileErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		rules []Rule
		want  error
	}{
		{"bad name", []Rule{{Name: "Post Likes", Table: "likes", GroupBy: []string{"post_id"}, Key: "p:{post_id}"}}, ErrRuleName},
		{"duplicate name", []Rule{likes(), likes()}, ErrRuleDuplicate},
		{"duplicate key", []Rule{likes(), {Name: "other", Table: "likes", GroupBy: []string{"post_id"}, Key: "post:{post_id}:likes"}}, ErrRuleDuplicate},
		{"bad table", []Rule{{Name: "x", Table: "a.b.c", GroupBy: []string{"id"}, Key: "x:{id}"}}, ErrRuleTable},
		{"no group_by", []Rule{{Name: "x", Table: "t", Key: "x"}}, ErrRuleGroupBy},
		{"repeated group column", []Rule{{Name: "x", Table: "t", GroupBy: []string{"a", "a"}, Key: "x:{a}"}}, ErrRuleGroupBy},
		{"no key", []Rule{{Name: "x", Table: "t", GroupBy: []string{"a"}}}, ErrRuleKey},
		{"key misses a group column", []Rule{{Name: "x", Table: "t", GroupBy: []string{"a", "b"}, Key: "x:{a}"}}, ErrRuleKey},
		{"key uses another column", []Rule{{Name: "x", Table: "t", GroupBy: []string{"a"}, Key: "x:{a}:{b}"}}, ErrRuleKey},
		{"key unbalanced", []Rule{{Name: "x", Table: "t", GroupBy: []string{"a"}, Key: "x:{a"}}, ErrRuleKey},
		{"key with a space", []Rule{{Name: "x", Table: "t", GroupBy: []string{"a"}, Key: "x {a}"}}, ErrRuleKey},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Compile(tc.rules)
			if !errors.Is(err, tc.want) {
				t.Errorf("got %v; want %v", err, tc.want)
			}
		})
	}
}

func TestCompile(t *testing.T) {
	s := mustCompile(t, likes(),
		Rule{Name: "post_views", GroupBy: []string{"post_id"}, Key: "post:{post_id}:views"},
		Rule{Name: "pair", Table: "likes", GroupBy: []string{"post_id", "kind"}, Key: "pair:{kind}:{post_id}"})
	if got, want := s.Tables(), []string{"public.likes"}; !reflect.DeepEqual(got, want) {
		t.Errorf("Tables: got %v; want %v", got, want)
	}
	if got, want := s.Columns("public.likes"), []string{"post_id", "kind"}; !reflect.DeepEqual(got, want) {
		t.Errorf("Columns: got %v; want %v", got, want)
	}
	if got, want := s.Names(), []string{"pair", "post_likes", "post_views"}; !reflect.DeepEqual(got, want) {
		t.Errorf("Names: got %v; want %v", got, want)
	}
	if s.Counter("pair").Table != "public.likes" {
		t.Errorf("bare table name not qualified: got %q", s.Counter("pair").Table)
	}
}

func TestDeltas(t *testing.T) {
	s := mustCompile(t, likes(), Rule{Name: "pair", Table: "likes", GroupBy: []string{"post_id", "kind"}, Key: "pair:{kind}:{post_id}"})
	d := func(counter, group, key string, n int64) Delta {
		return Delta{Counter: counter, Group: group, Key: key, N: n}
	}
	for _, tc := range []struct {
		name       string
		ch         row.Change
		want       []Delta
		wantResets []string
		wantErrs   []error
	}{
		{"insert", row.Change{Table: "public.likes", Op: row.Insert, New: []row.Column{col("id", "1"), col("post_id", "42"), col("kind", "up")}},
			[]Delta{d("post_likes", `["42"]`, "post:42:likes", 1), d("pair", `["42","up"]`, "pair:up:42", 1)}, nil, nil},
		{"delete", row.Change{Table: "public.likes", Op: row.Delete, Old: []row.Column{col("id", "1"), col("post_id", "42"), col("kind", "up")}},
			[]Delta{d("post_likes", `["42"]`, "post:42:likes", -1), d("pair", `["42","up"]`, "pair:up:42", -1)}, nil, nil},
		{"delete without the group in the old row", row.Change{Table: "public.likes", Op: row.Delete, Old: []row.Column{col("id", "1")}},
			nil, nil, []error{ErrOldValueMissing, ErrOldValueMissing}},
		{"update moving the row", row.Change{Table: "public.likes", Op: row.Update,
			Old: []row.Column{col("id", "1"), col("post_id", "42"), col("kind", "up")},
			New: []row.Column{col("id", "1"), col("post_id", "43"), col("kind", "up")}},
			[]Delta{d("post_likes", `["42"]`, "post:42:likes", -1), d("post_likes", `["43"]`, "post:43:likes", 1),
				d("pair", `["42","up"]`, "pair:up:42", -1), d("pair", `["43","up"]`, "pair:up:43", 1)}, nil, nil},
		{"update within the group", row.Change{Table: "public.likes", Op: row.Update,
			Old: []row.Column{col("id", "1"), col("post_id", "42"), col("kind", "up")},
			New: []row.Column{col("id", "1"), col("post_id", "42"), col("kind", "up")}}, nil, nil, nil},
		{"update without old row", row.Change{Table: "public.likes", Op: row.Update,
			New: []row.Column{col("id", "1"), col("post_id", "42"), col("kind", "up")}}, nil, nil, nil},
		{"update with identity old row only", row.Change{Table: "public.likes", Op: row.Update,
			Old: []row.Column{col("post_id", "42")},
			New: []row.Column{col("id", "1"), col("post_id", "44"), col("kind", "up")}},
			[]Delta{d("post_likes", `["42"]`, "post:42:likes", -1), d("post_likes", `["44"]`, "post:44:likes", 1),
				d("pair", `["42","up"]`, "pair:up:42", -1), d("pair", `["44","up"]`, "pair:up:44", 1)}, nil, nil},
		{"update to NULL group", row.Change{Table: "public.likes", Op: row.Update,
			Old: []row.Column{col("id", "1"), col("post_id", "42"), col("kind", "up")},
			New: []row.Column{col("id", "1"), {Name: "post_id", Value: row.Value{Null: true}}, col("kind", "up")}},
			[]Delta{d("post_likes", `["42"]`, "post:42:likes", -1), d("pair", `["42","up"]`, "pair:up:42", -1)}, nil, nil},
		{"insert NULL group", row.Change{Table: "public.likes", Op: row.Insert,
			New: []row.Column{col("id", "1"), {Name: "post_id", Value: row.Value{Null: true}}, col("kind", "up")}}, nil, nil, nil},
		{"unchanged toast takes old", row.Change{Table: "public.likes", Op: row.Update,
			Old: []row.Column{col("id", "1"), col("post_id", "42"), col("kind", "up")},
			New: []row.Column{col("id", "1"), col("post_id", "43"), {Name: "kind", Value: row.Value{Unchanged: true}}}},
			[]Delta{d("post_likes", `["42"]`, "post:42:likes", -1), d("post_likes", `["43"]`, "post:43:likes", 1),
				d("pair", `["42","up"]`, "pair:up:42", -1), d("pair", `["43","up"]`, "pair:up:43", 1)}, nil, nil},
		{"unchanged toast without old", row.Change{Table: "public.likes", Op: row.Insert,
			New: []row.Column{col("id", "1"), col("post_id", "43"), {Name: "kind", Value: row.Value{Unchanged: true}}}},
			[]Delta{d("post_likes", `["43"]`, "post:43:likes", 1)}, nil, []error{ErrUnchangedToast}},
		{"missing column", row.Change{Table: "public.likes", Op: row.Insert, New: []row.Column{col("id", "1")}},
			nil, nil, []error{ErrColumnMissing, ErrColumnMissing}},
		{"value renders a bad key", row.Change{Table: "public.likes", Op: row.Insert, New: []row.Column{col("post_id", "4 2"), col("kind", "up")}},
			nil, nil, []error{ErrKey, ErrKey}},
		{"truncate", row.Change{Table: "public.likes", Op: row.Truncate}, nil, []string{"post_likes", "pair"}, nil},
		{"other table", row.Change{Table: "public.posts", Op: row.Insert, New: []row.Column{col("post_id", "1")}}, nil, nil, nil},
		{"bad op", row.Change{Table: "public.likes", Op: 0}, nil, nil, []error{ErrUnknownOp, ErrUnknownOp}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, resets, errs := s.Deltas(nil, tc.ch)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("deltas: got %v; want %v", got, tc.want)
			}
			if !reflect.DeepEqual(resets, tc.wantResets) {
				t.Errorf("resets: got %v; want %v", resets, tc.wantResets)
			}
			if len(errs) != len(tc.wantErrs) {
				t.Fatalf("errors: got %v; want %v", errs, tc.wantErrs)
			}
			for i := range errs {
				if !errors.Is(errs[i], tc.wantErrs[i]) {
					t.Errorf("error %d: got %v; want %v", i, errs[i], tc.wantErrs[i])
				}
			}
		})
	}
}

func TestParseIncrement(t *testing.T) {
	s := mustCompile(t, likes(),
		Rule{Name: "post_views", GroupBy: []string{"post_id"}, Key: "post:{post_id}:views"},
		Rule{Name: "pair_views", GroupBy: []string{"a", "b"}, Key: "pv:{a}:{b}"})
	for _, tc := range []struct {
		in   string
		want Delta
		err  error
	}{
		{`{"counter":"post_views","key":{"post_id":42},"delta":3}`, Delta{"post_views", `["42"]`, "post:42:views", 3}, nil},
		{`{"counter":"post_views","key":{"post_id":"42"}}`, Delta{"post_views", `["42"]`, "post:42:views", 1}, nil},
		{`{"counter":"post_views","key":{"post_id":"42"},"delta":-2}`, Delta{"post_views", `["42"]`, "post:42:views", -2}, nil},
		{`{"counter":"pair_views","key":{"b":true,"a":"x"}}`, Delta{"pair_views", `["x","t"]`, "pv:x:t", 1}, nil},
		{`{"counter":"post_likes","key":{"post_id":42}}`, Delta{}, ErrNotIncrementable},
		{`{"counter":"nope","key":{"post_id":42}}`, Delta{}, ErrUnknownCounter},
		{`{"counter":"post_views","key":{"post_id":1.5}}`, Delta{}, ErrBadIncrement},
		{`{"counter":"post_views","key":{"post_id":null}}`, Delta{}, ErrBadIncrement},
		{`{"counter":"post_views","key":{"other":1}}`, Delta{}, ErrBadIncrement},
		{`{"counter":"post_views","key":{"post_id":1,"x":2}}`, Delta{}, ErrBadIncrement},
		{`{"counter":"post_views","key":{"post_id":1},"delta":1.5}`, Delta{}, ErrBadIncrement},
		{`{"counter":"post_views","key":{"post_id":1},"extra":1}`, Delta{}, ErrBadIncrement},
		{`{"counter":"post_views","key":{"post_id":1}} {}`, Delta{}, ErrBadIncrement},
		{`{"counter":"post_views","key":{"post_id":"a b"}}`, Delta{}, ErrKey},
		{`not json`, Delta{}, ErrBadIncrement},
		{``, Delta{}, ErrBadIncrement},
		{`{"counter":"post_views","key":{"post_id":1},"delta":-9223372036854775808}`, Delta{}, ErrBadIncrement},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := s.ParseIncrement([]byte(tc.in))
			if !errors.Is(err, tc.err) || (tc.err != nil) != (err != nil) {
				t.Fatalf("error: got %v; want %v", err, tc.err)
			}
			if got != tc.want {
				t.Errorf("got %+v; want %+v", got, tc.want)
			}
		})
	}
	big := `{"counter":"post_views","key":{"post_id":"` + strings.Repeat("x", MaxIncrementSize) + `"}}`
	if _, err := s.ParseIncrement([]byte(big)); !errors.Is(err, ErrBadIncrement) {
		t.Errorf("oversized: got %v; want %v", err, ErrBadIncrement)
	}
}

func TestParseRepair(t *testing.T) {
	s := mustCompile(t, likes())
	r := Repair{Counter: "post_likes", All: true, Groups: []RepairGroup{{Group: []string{"42"}, N: 7}}}
	resets, sets, err := s.ParseRepair(r.Encode())
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"post_likes"}; !reflect.DeepEqual(resets, want) {
		t.Errorf("resets: got %v; want %v", resets, want)
	}
	if want := []Delta{{"post_likes", `["42"]`, "post:42:likes", 7}}; !reflect.DeepEqual(sets, want) {
		t.Errorf("sets: got %v; want %v", sets, want)
	}
	for _, tc := range []struct {
		in   string
		want error
	}{
		{`{`, ErrBadRepair},
		{`{"counter":"x","groups":[]}`, ErrUnknownCounter},
		{`{"counter":"post_likes","groups":[{"group":["1","2"],"n":1}]}`, ErrKey},
	} {
		if _, _, err := s.ParseRepair([]byte(tc.in)); !errors.Is(err, tc.want) {
			t.Errorf("%s: got %v; want %v", tc.in, err, tc.want)
		}
	}
}

func TestGroupRoundTrip(t *testing.T) {
	for _, vals := range [][]string{{"42"}, {"a,b", "c\"d"}, {""}, {"ü", "\x01"}} {
		got, err := ParseGroup(Group(vals))
		if err != nil || !reflect.DeepEqual(got, vals) {
			t.Errorf("ParseGroup(Group(%q)): got %q, %v; want %q", vals, got, err, vals)
		}
	}
}

func FuzzParseIncrement(f *testing.F) {
	for _, s := range []string{
		`{"counter":"post_views","key":{"post_id":42},"delta":3}`,
		`{"counter":"pair_views","key":{"b":true,"a":"x"}}`,
		`{"counter":"post_views","key":{"post_id":"a b"}}`,
		`{"counter":"post_likes","key":{"post_id":1}}`,
		`[]`, `null`, `{"key":{"post_id":{}}}`,
	} {
		f.Add([]byte(s))
	}
	s := mustCompile(f, likes(),
		Rule{Name: "post_views", GroupBy: []string{"post_id"}, Key: "post:{post_id}:views"},
		Rule{Name: "pair_views", GroupBy: []string{"a", "b"}, Key: "pv:{a}:{b}"})
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := s.ParseIncrement(data)
		if err != nil {
			return
		}
		if verr := keys.Validate(d.Key); verr != nil {
			t.Errorf("accepted increment renders an invalid key %q: %v", d.Key, verr)
		}
		if _, err := ParseGroup(d.Group); err != nil {
			t.Errorf("group %q does not parse: %v", d.Group, err)
		}
		if _, _, err := s.ParseRepair(data); err != nil && !errors.Is(err, ErrBadRepair) && !errors.Is(err, ErrUnknownCounter) && !errors.Is(err, ErrKey) {
			t.Errorf("ParseRepair: unexpected error class: %v", err)
		}
	})
}

// FuzzDeltas checks that any change of a source table yields valid keys,
// balanced deltas for an UPDATE, and never panics.
func FuzzDeltas(f *testing.F) {
	f.Add(uint8(1), "42", "43", false, false, true)
	f.Add(uint8(2), "42", "42", true, false, false)
	f.Add(uint8(3), "a b", "x", false, true, true)
	f.Add(uint8(4), "", "", false, false, false)
	s := mustCompile(f, likes(), Rule{Name: "pair", Table: "likes", GroupBy: []string{"post_id", "kind"}, Key: "pair:{kind}:{post_id}"})
	f.Fuzz(func(t *testing.T, op uint8, oldV, newV string, oldNull, newToast, withOld bool) {
		ch := row.Change{Table: "public.likes", Op: row.Op(op % 6)}
		ch.New = []row.Column{{Name: "post_id", Value: row.Value{Text: newV, Unchanged: newToast}}, col("kind", "k")}
		if withOld {
			ch.Old = []row.Column{{Name: "post_id", Value: row.Value{Text: oldV, Null: oldNull}}}
		}
		ds, _, errs := s.Deltas(nil, ch)
		sum := int64(0)
		for _, d := range ds {
			if err := keys.Validate(d.Key); err != nil {
				t.Errorf("invalid key %q: %v", d.Key, err)
			}
			sum += d.N
		}
		if ch.Op == row.Update && len(errs) == 0 && !oldNull && sum != 0 {
			t.Errorf("update deltas do not balance: %v", ds)
		}
	})
}

func ExampleSet_Deltas() {
	set, err := Compile([]Rule{{Name: "post_likes", Table: "public.likes", GroupBy: []string{"post_id"}, Key: "post:{post_id}:likes"}})
	if err != nil {
		panic(err)
	}
	// A like moves from post 42 to post 43.
	ds, _, errs := set.Deltas(nil, row.Change{
		Table: "public.likes",
		Op:    row.Update,
		Old:   []row.Column{{Name: "id", Value: row.Value{Text: "1"}}, {Name: "post_id", Value: row.Value{Text: "42"}}},
		New:   []row.Column{{Name: "id", Value: row.Value{Text: "1"}}, {Name: "post_id", Value: row.Value{Text: "43"}}},
	})
	for _, d := range ds {
		fmt.Println(d.Counter, d.Group, d.Key, d.N)
	}
	fmt.Println(errs)
	// Output:
	// post_likes ["42"] post:42:likes -1
	// post_likes ["43"] post:43:likes 1
	// []
}

func ExampleSet_ParseIncrement() {
	set, err := Compile([]Rule{{Name: "post_views", GroupBy: []string{"post_id"}, Key: "post:{post_id}:views"}})
	if err != nil {
		panic(err)
	}
	d, err := set.ParseIncrement([]byte(`{"counter": "post_views", "key": {"post_id": 42}, "delta": 1}`))
	fmt.Println(d.Counter, d.Group, d.Key, d.N, err)
	// Output: post_views ["42"] post:42:views 1 <nil>
}
