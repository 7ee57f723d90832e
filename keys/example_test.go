package keys_test

import (
	"fmt"

	"github.com/pgcache/pgcache/keys"
	"github.com/pgcache/pgcache/row"
)

func ExampleSet_Keys_insert() {
	set, err := keys.Compile([]keys.Rule{
		{Table: "posts", Keys: []string{"post:{id}", "user_posts:{author_id}"}},
	})
	if err != nil {
		panic(err)
	}
	ks, errs := set.Keys(nil, row.Change{
		Table: "public.posts",
		Op:    row.Insert,
		New: []row.Column{
			{Name: "id", Value: row.Value{Text: "42"}},
			{Name: "author_id", Value: row.Value{Text: "7"}},
			{Name: "title", Value: row.Value{Text: "Hello"}},
		},
	})
	fmt.Println(ks, errs)
	// Output: [post:42 user_posts:7] []
}

func ExampleSet_Keys_update() {
	set, err := keys.Compile([]keys.Rule{
		{Table: "public.posts", Keys: []string{"post:{id}", "user_posts:{author_id}"}},
	})
	if err != nil {
		panic(err)
	}
	// The post moves from author 7 to author 8: both authors' lists are
	// invalidated, and post:42 once.
	ks, errs := set.Keys(nil, row.Change{
		Table: "public.posts",
		Op:    row.Update,
		Old: []row.Column{
			{Name: "id", Value: row.Value{Text: "42"}},
			{Name: "author_id", Value: row.Value{Text: "7"}},
		},
		New: []row.Column{
			{Name: "id", Value: row.Value{Text: "42"}},
			{Name: "author_id", Value: row.Value{Text: "8"}},
		},
	})
	fmt.Println(ks, errs)
	// Output: [post:42 user_posts:8 user_posts:7] []
}

func ExampleSet_Keys_truncate() {
	set, err := keys.Compile([]keys.Rule{
		{Table: "posts", Keys: []string{"post:{id}"}},
	})
	if err != nil {
		panic(err)
	}
	ks, errs := set.Keys(nil, row.Change{Table: "public.posts", Op: row.Truncate})
	fmt.Println(ks, errs)
	// Output: [] [keys: table truncated, per-row keys cannot be derived (table "public.posts")]
}

func ExampleParseMessage() {
	// Content of SELECT pg_logical_emit_message(true, 'invalidate', ...).
	ks, errs := keys.ParseMessage([]byte("feed:1 feed:2\nfeed:1\tbad\x00key"))
	fmt.Println(ks)
	fmt.Println(errs)
	// Output:
	// [feed:1 feed:2]
	// [mckey: invalid key: space, CR, LF or NUL: byte 0x00 at offset 3 (key "bad\x00key")]
}

func ExampleCompile_error() {
	_, err := keys.Compile([]keys.Rule{
		{Table: "posts", Keys: []string{"post:{id", "post:{id|lower}"}},
	})
	fmt.Println(err)
	// Output:
	// keys: unbalanced braces in template (table "public.posts", template "post:{id")
	// keys: unsupported syntax in template placeholder (table "public.posts", template "post:{id|lower}")
}
