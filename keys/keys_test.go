package keys

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/pgcache/pgcache/row"
)

// row builds columns from name/value pairs. A value "<null>" is NULL and
// "<toast>" is an unchanged TOAST value.
func mkrow(kv ...string) []row.Column {
	cols := make([]row.Column, 0, len(kv)/2)
	for i := 0; i+1 < len(kv); i += 2 {
		v := row.Value{Text: kv[i+1]}
		switch kv[i+1] {
		case "<null>":
			v = row.Value{Null: true}
		case "<toast>":
			v = row.Value{Unchanged: true}
		}
		cols = append(cols, row.Column{Name: kv[i], Value: v})
	}
	return cols
}

func mustCompile(t testing.TB, rules ...Rule) *Set {
	t.Helper()
	s, err := Compile(rules)
	if err != nil {
		t.Fatalf("Compile: %v", err)
	}
	return s
}

var postsRule = Rule{Table: "posts", Keys: []string{"post:{id}", "user_posts:{author_id}"}}

func TestKeys(t *testing.T) {
	toastRule := Rule{Table: "public.docs", Keys: []string{"doc:{id}", "doc_by_slug:{slug}"}}
	staticRule := Rule{Table: "public.tags", Keys: []string{"all_tags", "tag:{name}"}}
	tests := []struct {
		name  string
		rules []Rule
		c     row.Change
		want  []string
		errs  []error // sentinels, in order
	}{
		{
			name:  "insert",
			rules: []Rule{postsRule},
			c:     row.Change{Table: "public.posts", Op: row.Insert, New: mkrow("id", "1", "author_id", "7", "body", "hi")},
			want:  []string{"post:1", "user_posts:7"},
		},
		{
			name:  "delete full old row",
			rules: []Rule{postsRule},
			c:     row.Change{Table: "public.posts", Op: row.Delete, Old: mkrow("id", "1", "author_id", "7", "body", "hi")},
			want:  []string{"post:1", "user_posts:7"},
		},
		{
			name:  "delete identity-only old row",
			rules: []Rule{postsRule},
			c:     row.Change{Table: "public.posts", Op: row.Delete, Old: mkrow("id", "1")},
			want:  []string{"post:1"},
			errs:  []error{ErrOldValueMissing},
		},
		{
			name:  "delete without old row",
			rules: []Rule{postsRule},
			c:     row.Change{Table: "public.posts", Op: row.Delete},
			errs:  []error{ErrOldValueMissing, ErrOldValueMissing},
		},
		{
			name:  "update same key values dedups",
			rules: []Rule{postsRule},
			c: row.Change{Table: "public.posts", Op: row.Update,
				Old: mkrow("id", "1", "author_id", "7", "body", "a"),
				New: mkrow("id", "1", "author_id", "7", "body", "b")},
			want: []string{"post:1", "user_posts:7"},
		},
		{
			name:  "update moving a key",
			rules: []Rule{postsRule},
			c: row.Change{Table: "public.posts", Op: row.Update,
				Old: mkrow("id", "1", "author_id", "7"),
				New: mkrow("id", "1", "author_id", "8")},
			want: []string{"post:1", "user_posts:8", "user_posts:7"},
		},
		{
			name:  "update without old row takes old from new",
			rules: []Rule{postsRule},
			c: row.Change{Table: "public.posts", Op: row.Update,
				New: mkrow("id", "1", "author_id", "8")},
			want: []string{"post:1", "user_posts:8"},
		},
		{
			name:  "update identity change with key-only old row",
			rules: []Rule{postsRule},
			c: row.Change{Table: "public.posts", Op: row.Update,
				Old: mkrow("id", "1"),
				New: mkrow("id", "2", "author_id", "8")},
			want: []string{"post:2", "post:1", "user_posts:8"},
		},
		{
			name:  "insert null skips key",
			rules: []Rule{postsRule},
			c:     row.Change{Table: "public.posts", Op: row.Insert, New: mkrow("id", "1", "author_id", "<null>")},
			want:  []string{"post:1"},
		},
		{
			name:  "update from null to value",
			rules: []Rule{postsRule},
			c: row.Change{Table: "public.posts", Op: row.Update,
				Old: mkrow("id", "1", "author_id", "<null>"),
				New: mkrow("id", "1", "author_id", "3")},
			want: []string{"post:1", "user_posts:3"},
		},
		{
			name:  "update to null",
			rules: []Rule{postsRule},
			c: row.Change{Table: "public.posts", Op: row.Update,
				Old: mkrow("id", "1", "author_id", "3"),
				New: mkrow("id", "1", "author_id", "<null>")},
			want: []string{"post:1", "user_posts:3"},
		},
		{
			name:  "delete null",
			rules: []Rule{postsRule},
			c:     row.Change{Table: "public.posts", Op: row.Delete, Old: mkrow("id", "1", "author_id", "<null>")},
			want:  []string{"post:1"},
		},
		{
			name:  "toast unchanged taken from old",
			rules: []Rule{toastRule},
			c: row.Change{Table: "public.docs", Op: row.Update,
				Old: mkrow("id", "1", "slug", "intro"),
				New: mkrow("id", "1", "slug", "<toast>")},
			want: []string{"doc:1", "doc_by_slug:intro"},
		},
		{
			name:  "toast unchanged and no old row",
			rules: []Rule{toastRule},
			c: row.Change{Table: "public.docs", Op: row.Update,
				New: mkrow("id", "1", "slug", "<toast>")},
			want: []string{"doc:1"},
			errs: []error{ErrUnchangedToast},
		},
		{
			name:  "toast unchanged and old row lacks it",
			rules: []Rule{toastRule},
			c: row.Change{Table: "public.docs", Op: row.Update,
				Old: mkrow("id", "0"),
				New: mkrow("id", "1", "slug", "<toast>")},
			want: []string{"doc:1", "doc:0"},
			errs: []error{ErrUnchangedToast},
		},
		{
			name:  "toast old value null",
			rules: []Rule{toastRule},
			c: row.Change{Table: "public.docs", Op: row.Update,
				Old: mkrow("id", "1", "slug", "<null>"),
				New: mkrow("id", "1", "slug", "<toast>")},
			want: []string{"doc:1"},
		},
		{
			name:  "insert missing column",
			rules: []Rule{postsRule},
			c:     row.Change{Table: "public.posts", Op: row.Insert, New: mkrow("id", "1")},
			want:  []string{"post:1"},
			errs:  []error{ErrColumnMissing},
		},
		{
			name:  "value with space",
			rules: []Rule{postsRule},
			c:     row.Change{Table: "public.posts", Op: row.Insert, New: mkrow("id", "1 2", "author_id", "7")},
			want:  []string{"user_posts:7"},
			errs:  []error{ErrKeyInvalidChar},
		},
		{
			name:  "value with control byte",
			rules: []Rule{postsRule},
			c:     row.Change{Table: "public.posts", Op: row.Insert, New: mkrow("id", "1\x00", "author_id", "a\nb")},
			errs:  []error{ErrKeyInvalidChar, ErrKeyInvalidChar},
		},
		{
			name:  "value not UTF-8",
			rules: []Rule{postsRule},
			c:     row.Change{Table: "public.posts", Op: row.Insert, New: mkrow("id", "1", "author_id", "caf\xe9")},
			want:  []string{"post:1"},
			errs:  []error{ErrKeyInvalidUTF8},
		},
		{
			name:  "update new value invalid, old still purged",
			rules: []Rule{postsRule},
			c: row.Change{Table: "public.posts", Op: row.Update,
				Old: mkrow("id", "1", "author_id", "7"),
				New: mkrow("id", "1", "author_id", "bad value")},
			want: []string{"post:1", "user_posts:7"},
			errs: []error{ErrKeyInvalidChar},
		},
		{
			name:  "key too long",
			rules: []Rule{postsRule},
			c:     row.Change{Table: "public.posts", Op: row.Insert, New: mkrow("id", strings.Repeat("x", 246), "author_id", "7")},
			want:  []string{"user_posts:7"},
			errs:  []error{ErrKeyTooLong},
		},
		{
			name:  "key exactly 250 bytes",
			rules: []Rule{postsRule},
			c:     row.Change{Table: "public.posts", Op: row.Insert, New: mkrow("id", strings.Repeat("x", 245), "author_id", "7")},
			want:  []string{"post:" + strings.Repeat("x", 245), "user_posts:7"},
		},
		{
			name:  "empty key",
			rules: []Rule{{Table: "t", Keys: []string{"{id}"}}},
			c:     row.Change{Table: "public.t", Op: row.Insert, New: mkrow("id", "")},
			errs:  []error{ErrKeyEmpty},
		},
		{
			name:  "non-ascii value is a valid key",
			rules: []Rule{{Table: "t", Keys: []string{"k:{id}"}}},
			c:     row.Change{Table: "public.t", Op: row.Insert, New: mkrow("id", "héllo")},
			want:  []string{"k:héllo"},
		},
		{
			name:  "no rule for table",
			rules: []Rule{postsRule},
			c:     row.Change{Table: "public.other", Op: row.Insert, New: mkrow("id", "1")},
		},
		{
			name:  "schema matters",
			rules: []Rule{postsRule},
			c:     row.Change{Table: "blog.posts", Op: row.Insert, New: mkrow("id", "1")},
		},
		{
			name:  "templates rendering the same key",
			rules: []Rule{{Table: "t", Keys: []string{"k:{a}", "k:{b}"}}},
			c:     row.Change{Table: "public.t", Op: row.Insert, New: mkrow("a", "1", "b", "1")},
			want:  []string{"k:1"},
		},
		{
			name:  "several columns and escapes",
			rules: []Rule{{Table: "s.t", Keys: []string{"{{{a}}}:{b}-{a}"}}},
			c:     row.Change{Table: "s.t", Op: row.Insert, New: mkrow("b", "x", "a", "1")},
			want:  []string{"{1}:x-1"},
		},
		{
			name:  "static key",
			rules: []Rule{staticRule},
			c:     row.Change{Table: "public.tags", Op: row.Insert, New: mkrow("name", "go")},
			want:  []string{"all_tags", "tag:go"},
		},
		{
			name:  "truncate",
			rules: []Rule{postsRule},
			c:     row.Change{Table: "public.posts", Op: row.Truncate},
			errs:  []error{ErrTruncate},
		},
		{
			name:  "truncate emits static templates",
			rules: []Rule{staticRule},
			c:     row.Change{Table: "public.tags", Op: row.Truncate},
			want:  []string{"all_tags"},
			errs:  []error{ErrTruncate},
		},
		{
			name:  "truncate with truncate keys",
			rules: []Rule{{Table: "posts", Keys: []string{"post:{id}", "posts_all"}, TruncateKeys: []string{"posts_version", "posts_all"}}},
			c:     row.Change{Table: "public.posts", Op: row.Truncate},
			want:  []string{"posts_all", "posts_version"},
		},
		{
			name:  "truncate of all-static table is covered",
			rules: []Rule{{Table: "settings", Keys: []string{"settings"}}},
			c:     row.Change{Table: "public.settings", Op: row.Truncate},
			want:  []string{"settings"},
		},
		{
			name:  "truncate of table without rule",
			rules: []Rule{postsRule},
			c:     row.Change{Table: "public.other", Op: row.Truncate},
		},
		{
			name:  "unknown op",
			rules: []Rule{postsRule},
			c:     row.Change{Table: "public.posts", New: mkrow("id", "1")},
			errs:  []error{ErrUnknownOp},
		},
		{
			name:  "merged rules for one table",
			rules: []Rule{postsRule, {Table: "public.posts", Keys: []string{"post:{id}", "slug:{slug}"}}},
			c:     row.Change{Table: "public.posts", Op: row.Insert, New: mkrow("id", "1", "author_id", "2", "slug", "s")},
			want:  []string{"post:1", "user_posts:2", "slug:s"},
		},
		{
			name:  "many columns",
			rules: []Rule{{Table: "w", Keys: []string{"{a}{b}{c}{d}{e}{f}{g}{h}{i}{j}"}}},
			c: row.Change{Table: "public.w", Op: row.Update,
				Old: mkrow("a", "0"),
				New: mkrow("a", "1", "b", "2", "c", "3", "d", "4", "e", "5", "f", "6", "g", "7", "h", "8", "i", "9", "j", "0")},
			want: []string{"1234567890", "0234567890"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := mustCompile(t, tt.rules...)
			got, errs := s.Keys(nil, tt.c)
			if !slices.Equal(got, tt.want) {
				t.Errorf("keys: got %q; want %q", got, tt.want)
			}
			if len(errs) != len(tt.errs) {
				t.Fatalf("errors: got %v; want %v", errs, tt.errs)
			}
			for i, err := range errs {
				if !errors.Is(err, tt.errs[i]) {
					t.Errorf("error %d: got %v; want %v", i, err, tt.errs[i])
				}
				var ke *Error
				if !errors.As(err, &ke) || ke.Table != tt.c.Table {
					t.Errorf("error %d: got %#v; want *Error with table %q", i, err, tt.c.Table)
				}
			}
			for _, k := range got {
				if err := Validate(k); err != nil {
					t.Errorf("key %q: %v", k, err)
				}
			}
		})
	}
}

func TestKeysAppendsToDst(t *testing.T) {
	s := mustCompile(t, postsRule)
	dst := []string{"post:1", "x"}
	got, errs := s.Keys(dst, row.Change{Table: "public.posts", Op: row.Insert, New: mkrow("id", "1", "author_id", "2")})
	// Dedup is within one change only: post:1 from an earlier change stays
	// and is appended again.
	want := []string{"post:1", "x", "post:1", "user_posts:2"}
	if !slices.Equal(got, want) || errs != nil {
		t.Errorf("got %q, %v; want %q, no errors", got, errs, want)
	}
}

func TestKeysErrorNamesRule(t *testing.T) {
	s := mustCompile(t, postsRule)
	_, errs := s.Keys(nil, row.Change{Table: "public.posts", Op: row.Insert, New: mkrow("id", "1", "author_id", "a b")})
	if len(errs) != 1 {
		t.Fatalf("got %v; want one error", errs)
	}
	var ke *Error
	if !errors.As(errs[0], &ke) {
		t.Fatalf("got %T; want *Error", errs[0])
	}
	if ke.Table != "public.posts" || ke.Template != "user_posts:{author_id}" || ke.Column != "author_id" {
		t.Errorf("got table %q template %q column %q; want public.posts, user_posts:{author_id}, author_id", ke.Table, ke.Template, ke.Column)
	}
	want := `mckey: invalid key: space, CR, LF or NUL: byte 0x20 in column value (table "public.posts", template "user_posts:{author_id}", column "author_id")`
	if got := errs[0].Error(); got != want {
		t.Errorf("got %s; want %s", got, want)
	}
}

func TestNilSet(t *testing.T) {
	var s *Set
	got, errs := s.Keys(nil, row.Change{Table: "public.posts", Op: row.Insert})
	if got != nil || errs != nil || s.Tables() != nil || s.Columns("posts") != nil {
		t.Errorf("nil set: got %v %v; want nothing", got, errs)
	}
}

func TestCompileErrors(t *testing.T) {
	tests := []struct {
		name string
		rule Rule
		want error
	}{
		{"empty table", Rule{Keys: []string{"k"}}, ErrRuleTable},
		{"leading dot", Rule{Table: ".t", Keys: []string{"k"}}, ErrRuleTable},
		{"trailing dot", Rule{Table: "s.", Keys: []string{"k"}}, ErrRuleTable},
		{"two dots", Rule{Table: "db.s.t", Keys: []string{"k"}}, ErrRuleTable},
		{"quoted table", Rule{Table: `"Posts"`, Keys: []string{"k"}}, ErrRuleTable},
		{"space in table", Rule{Table: "my posts", Keys: []string{"k"}}, ErrRuleTable},
		{"no keys", Rule{Table: "t"}, ErrRuleNoKeys},
		{"only truncate keys", Rule{Table: "t", TruncateKeys: []string{"v"}}, ErrRuleNoKeys},
		{"unclosed brace", Rule{Table: "t", Keys: []string{"post:{id"}}, ErrTemplateUnbalanced},
		{"lone closing brace", Rule{Table: "t", Keys: []string{"post:id}"}}, ErrTemplateUnbalanced},
		{"nested brace", Rule{Table: "t", Keys: []string{"post:{a{b}}"}}, ErrTemplateUnbalanced},
		{"trailing open brace", Rule{Table: "t", Keys: []string{"post:{"}}, ErrTemplateUnbalanced},
		{"empty column", Rule{Table: "t", Keys: []string{"post:{}"}}, ErrTemplateEmptyColumn},
		{"modifier colon", Rule{Table: "t", Keys: []string{"post:{id:x}"}}, ErrTemplateSyntax},
		{"modifier pipe", Rule{Table: "t", Keys: []string{"post:{id|lower}"}}, ErrTemplateSyntax},
		{"modifier percent", Rule{Table: "t", Keys: []string{"post:{%d}"}}, ErrTemplateSyntax},
		{"space in column", Rule{Table: "t", Keys: []string{"post:{ id }"}}, ErrTemplateSyntax},
		{"empty template", Rule{Table: "t", Keys: []string{""}}, ErrKeyEmpty},
		{"space in literal", Rule{Table: "t", Keys: []string{"post {id}"}}, ErrKeyInvalidChar},
		{"space in static key", Rule{Table: "t", Keys: []string{"all posts"}}, ErrKeyInvalidChar},
		{"NUL in literal", Rule{Table: "t", Keys: []string{"{id}\x00"}}, ErrKeyInvalidChar},
		{"long literal", Rule{Table: "t", Keys: []string{strings.Repeat("p", 251) + "{id}"}}, ErrKeyTooLong},
		{"long static key", Rule{Table: "t", Keys: []string{strings.Repeat("p", 251)}}, ErrKeyTooLong},
		{"placeholder in truncate key", Rule{Table: "t", Keys: []string{"k"}, TruncateKeys: []string{"v:{id}"}}, ErrTruncateKeyColumn},
		{"bad truncate key", Rule{Table: "t", Keys: []string{"k"}, TruncateKeys: []string{"a b"}}, ErrKeyInvalidChar},
		{"empty truncate key", Rule{Table: "t", Keys: []string{"k"}, TruncateKeys: []string{""}}, ErrKeyEmpty},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := Compile([]Rule{tt.rule})
			if !errors.Is(err, tt.want) {
				t.Fatalf("got %v; want %v", err, tt.want)
			}
			if s != nil {
				t.Errorf("got set %v; want nil on error", s)
			}
			var ke *Error
			if !errors.As(err, &ke) {
				t.Errorf("got %T; want an *Error in the chain", err)
			}
		})
	}
}

func TestCompileReportsAllErrors(t *testing.T) {
	_, err := Compile([]Rule{
		{Table: "a", Keys: []string{"x:{", "ok:{id}", "y:{}"}},
		{Table: "", Keys: []string{"k"}},
	})
	for _, want := range []error{ErrTemplateUnbalanced, ErrTemplateEmptyColumn, ErrRuleTable} {
		if !errors.Is(err, want) {
			t.Errorf("got %v; want it to include %v", err, want)
		}
	}
	want := "keys: unbalanced braces in template (table \"public.a\", template \"x:{\")\n" +
		"keys: empty column name in template (table \"public.a\", template \"y:{}\")\n" +
		"keys: invalid table name in rule"
	if err == nil || err.Error() != want {
		t.Errorf("got %v; want %s", err, want)
	}
}

func TestCompileValidTemplates(t *testing.T) {
	for _, src := range []string{
		"post:{id}",
		"{id}",
		"{{literal}}",
		"{{{id}}}",
		"a:{x}:{y}:{x}",
		"ключ:{id}",
		strings.Repeat("p", 250),
		strings.Repeat("p", 250) + "{id}",
		"{Mixed_Case$1}",
		"{schéma}",
	} {
		if _, err := Compile([]Rule{{Table: "t", Keys: []string{src}}}); err != nil {
			t.Errorf("%q: got %v; want no error", src, err)
		}
	}
}

func TestTablesAndColumns(t *testing.T) {
	s := mustCompile(t,
		postsRule,
		Rule{Table: "blog.comments", Keys: []string{"c:{id}", "pc:{post_id}:{id}", "comments"}},
		Rule{Table: "public.posts", Keys: []string{"slug:{slug}:{author_id}"}},
	)
	if got, want := s.Tables(), []string{"blog.comments", "public.posts"}; !slices.Equal(got, want) {
		t.Errorf("Tables: got %q; want %q", got, want)
	}
	tests := []struct {
		table string
		want  []string
	}{
		{"posts", []string{"id", "author_id", "slug"}},
		{"public.posts", []string{"id", "author_id", "slug"}},
		{"blog.comments", []string{"id", "post_id"}},
		{"comments", nil},
		{"", nil},
	}
	for _, tt := range tests {
		if got := s.Columns(tt.table); !slices.Equal(got, tt.want) {
			t.Errorf("Columns(%q): got %q; want %q", tt.table, got, tt.want)
		}
	}
	// The returned slices are copies.
	s.Tables()[0] = "x"
	s.Columns("posts")[0] = "x"
	if s.Tables()[0] != "blog.comments" || s.Columns("posts")[0] != "id" {
		t.Errorf("Tables/Columns returned shared slices")
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		key  string
		want error
	}{
		{"a", nil},
		{"post:1", nil},
		{strings.Repeat("k", 250), nil},
		{"héllo", nil},
		{"\x80\xff", ErrKeyInvalidUTF8}, // would change on the JSON stream
		{"caf\xc3\xa9", nil},
		{"", ErrKeyEmpty},
		{strings.Repeat("k", 251), ErrKeyTooLong},
		{"a b", ErrKeyInvalidChar},
		{"a\tb", nil}, // memcached accepts control bytes; mcpool sends them in base64
		{"a\r\n", ErrKeyInvalidChar},
		{"\x00", ErrKeyInvalidChar},
		{"a\x1f", nil},
		{"a\x7f", nil},
	}
	for _, tt := range tests {
		err := Validate(tt.key)
		if !errors.Is(err, tt.want) || (tt.want == nil) != (err == nil) {
			t.Errorf("Validate(%q): got %v; want %v", tt.key, err, tt.want)
		}
	}
}

func TestOpString(t *testing.T) {
	for op, want := range map[row.Op]string{row.Insert: "INSERT", row.Update: "UPDATE", row.Delete: "DELETE", row.Truncate: "TRUNCATE", 0: "Op(0)", 9: "Op(9)"} {
		if got := op.String(); got != want {
			t.Errorf("row.Op(%d).String(): got %q; want %q", uint8(op), got, want)
		}
	}
}

// TestKeysAllocs checks that Keys allocates only the keys it appends.
func TestKeysAllocs(t *testing.T) {
	s := mustCompile(t, postsRule)
	c := row.Change{Table: "public.posts", Op: row.Update,
		Old: mkrow("id", "1", "author_id", "7"),
		New: mkrow("id", "1", "author_id", "8", "body", "x")}
	dst := make([]string, 0, 8)
	allocs := testing.AllocsPerRun(100, func() {
		dst, _ = s.Keys(dst[:0], c)
	})
	if len(dst) != 3 {
		t.Fatalf("got %q; want 3 keys", dst)
	}
	if allocs > 3 {
		t.Errorf("got %v allocs per call; want <= 3 (one per key)", allocs)
	}
	same := row.Change{Table: "public.posts", Op: row.Update, New: mkrow("id", "1", "author_id", "8")}
	allocs = testing.AllocsPerRun(100, func() {
		dst, _ = s.Keys(dst[:0], same)
	})
	if allocs > 2 {
		t.Errorf("update with old==new: got %v allocs per call; want <= 2", allocs)
	}
	other := row.Change{Table: "public.other", Op: row.Insert, New: mkrow("id", "1")}
	allocs = testing.AllocsPerRun(100, func() {
		dst, _ = s.Keys(dst[:0], other)
	})
	if allocs != 0 {
		t.Errorf("table without rule: got %v allocs per call; want 0", allocs)
	}
}

func BenchmarkKeys(b *testing.B) {
	s, err := Compile([]Rule{
		postsRule,
		{Table: "public.comments", Keys: []string{"comment:{id}", "post_comments:{post_id}"}},
		{Table: "public.users", Keys: []string{"user:{id}", "user_by_email:{email}", "users_all"}},
	})
	if err != nil {
		b.Fatal(err)
	}
	wide := mkrow("id", "123456", "author_id", "42", "title", "hello", "body", "<toast>",
		"created_at", "2024-01-01", "updated_at", "2024-01-02", "views", "10", "likes", "3")
	moved := slices.Clone(wide)
	moved[1].Value.Text = "43"
	cases := []struct {
		name string
		c    row.Change
	}{
		{"insert", row.Change{Table: "public.comments", Op: row.Insert, New: mkrow("id", "9", "post_id", "123456", "body", "x")}},
		{"update-same", row.Change{Table: "public.posts", Op: row.Update, New: wide}},
		{"update-moved", row.Change{Table: "public.posts", Op: row.Update, Old: wide, New: moved}},
		{"delete", row.Change{Table: "public.users", Op: row.Delete, Old: mkrow("id", "5", "email", "a@b.c")}},
		{"no-rule", row.Change{Table: "public.audit", Op: row.Insert, New: wide}},
	}
	for _, bc := range cases {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			dst := make([]string, 0, 16)
			for b.Loop() {
				var errs []error
				dst, errs = s.Keys(dst[:0], bc.c)
				if errs != nil {
					b.Fatal(errs)
				}
			}
		})
	}
}
