package keys

import (
	"slices"
	"strings"
	"testing"

	"github.com/pgcache/pgcache/row"
)

// refRender renders src by plain substitution, independently of the
// compiled form: "{{" and "}}" are braces, "{name}" is vals[name].
func refRender(src string, vals map[string]string) string {
	var b strings.Builder
	for i := 0; i < len(src); i++ {
		switch {
		case strings.HasPrefix(src[i:], "{{"), strings.HasPrefix(src[i:], "}}"):
			b.WriteByte(src[i])
			i++
		case src[i] == '{':
			end := strings.IndexByte(src[i:], '}')
			b.WriteString(vals[src[i+1:i+end]])
			i += end
		default:
			b.WriteByte(src[i])
		}
	}
	return b.String()
}

func FuzzTemplate(f *testing.F) {
	f.Add("post:{id}", "1", "2", "3", uint8(row.Insert), uint8(0))
	f.Add("user_posts:{author_id}", "7", "8", "", uint8(row.Update), uint8(0))
	f.Add("{{{a}}}:{b}-{a}", "x", "y z", "", uint8(row.Update), uint8(0x12))
	f.Add("{a}{b}{c}", "", "", "", uint8(row.Delete), uint8(0x05))
	f.Add("all", "", "", "", uint8(row.Truncate), uint8(0))
	f.Add("k:{id", "", "", "", uint8(row.Insert), uint8(0))
	f.Add("k:{x|y}", "", "", "", uint8(row.Insert), uint8(0))
	f.Add("k:}", "a", "", "", uint8(row.Insert), uint8(0))
	f.Add("k:{id}", strings.Repeat("v", 250), "\x7f", "é", uint8(row.Update), uint8(0x20))
	f.Fuzz(func(t *testing.T, tmpl, v0, v1, v2 string, op, flags uint8) {
		s, err := Compile([]Rule{{Table: "s.t", Keys: []string{tmpl}}})
		if err != nil {
			if s != nil {
				t.Fatalf("Compile(%q) returned a set and error %v", tmpl, err)
			}
			return
		}
		cols := s.Columns("s.t")
		for _, c := range cols {
			if c == "" || strings.ContainsAny(c, "{}") {
				t.Fatalf("Compile(%q): bad column %q", tmpl, c)
			}
		}
		pool := []string{v0, v1, v2}
		var oldRow, newRow []row.Column
		vals := make(map[string]string)
		plain := true
		for i, name := range cols {
			nv := row.Value{Text: pool[i%3]}
			ov := row.Value{Text: pool[(i+1)%3]}
			switch (flags >> (2 * (i % 4))) & 3 {
			case 1:
				nv = row.Value{Null: true}
				plain = false
			case 2:
				nv = row.Value{Unchanged: true}
				plain = false
			case 3:
				ov = row.Value{Null: true}
			}
			vals[name] = nv.Text
			newRow = append(newRow, row.Column{Name: name, Value: nv})
			if flags&0x80 == 0 || i%2 == 0 {
				oldRow = append(oldRow, row.Column{Name: name, Value: ov})
			}
		}
		c := row.Change{Table: "s.t", Op: row.Op(op % 6), Old: oldRow, New: newRow}
		got, errs := s.Keys(nil, c)
		for _, k := range got {
			if err := Validate(k); err != nil {
				t.Fatalf("template %q change %+v: key %q invalid: %v", tmpl, c, k, err)
			}
		}
		seen := map[string]bool{}
		for _, k := range got {
			if seen[k] {
				t.Fatalf("template %q: duplicate key %q in %q", tmpl, k, got)
			}
			seen[k] = true
		}
		if len(got) > 2 || len(errs) > 1 {
			t.Fatalf("template %q: got %q, %v; want at most 2 keys and 1 error", tmpl, got, errs)
		}
		if c.Op == row.Insert && plain {
			want := refRender(tmpl, vals)
			if Validate(want) == nil {
				if !slices.Equal(got, []string{want}) || errs != nil {
					t.Fatalf("template %q values %v: got %q, %v; want [%q]", tmpl, vals, got, errs, want)
				}
			} else if len(got) != 0 || len(errs) != 1 {
				t.Fatalf("template %q values %v: got %q, %v; want one error for %q", tmpl, vals, got, errs, want)
			}
		}
	})
}

func FuzzParseMessage(f *testing.F) {
	f.Add([]byte("k1 k2 k3"))
	f.Add([]byte("\tk1\n\nk1\r\n"))
	f.Add([]byte("a\x00b c\x7f " + strings.Repeat("x", 251)))
	f.Add([]byte("ключ:1 a\u00a0b"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, content []byte) {
		got, errs := ParseMessage(content)
		tokens := strings.FieldsFunc(string(content), func(r rune) bool {
			return r < 0x80 && isSpace(byte(r))
		})
		var want []string
		bad := 0
		for _, tok := range tokens {
			if Validate(tok) != nil {
				bad++
			} else if !slices.Contains(want, tok) {
				want = append(want, tok)
			}
		}
		if !slices.Equal(got, want) {
			t.Fatalf("ParseMessage(%q): got %q; want %q", content, got, want)
		}
		if len(errs) != bad {
			t.Fatalf("ParseMessage(%q): got %d errors; want %d", content, len(errs), bad)
		}
		for _, k := range got {
			if err := Validate(k); err != nil {
				t.Fatalf("ParseMessage(%q): key %q invalid: %v", content, k, err)
			}
		}
	})
}
