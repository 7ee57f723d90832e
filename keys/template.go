package keys

import "strings"

// part is one piece of a compiled template: literal text, or a column.
type part struct {
	lit string // literal text, when col < 0
	col int    // index into the table's column list, or -1 for a literal
}

// template is a compiled key template.
type template struct {
	src    string // as written in the rule
	parts  []part
	litLen int    // total bytes of literal text
	static string // the key itself when the template has no placeholder
}

// parseTemplate splits src into literal and column parts. Column names are
// returned in order of appearance (with repeats); the caller maps them to
// indexes. It checks syntax only; key validity is checked by the caller.
func parseTemplate(src string) (lits []string, names []string, err error) {
	// lits[i] precedes names[i]; lits has one more element than names.
	var lit strings.Builder
	for i := 0; i < len(src); {
		c := src[i]
		switch c {
		case '{':
			if i+1 < len(src) && src[i+1] == '{' {
				lit.WriteByte('{')
				i += 2
				continue
			}
			end := strings.IndexAny(src[i+1:], "{}")
			if end < 0 || src[i+1+end] == '{' {
				return nil, nil, ErrTemplateUnbalanced
			}
			name := src[i+1 : i+1+end]
			if name == "" {
				return nil, nil, ErrTemplateEmptyColumn
			}
			for j := 0; j < len(name); j++ {
				switch b := name[j]; {
				case b <= ' ' || b == 0x7f, b == ':', b == '|', b == '!', b == '%':
					return nil, nil, ErrTemplateSyntax
				}
			}
			lits = append(lits, lit.String())
			lit.Reset()
			names = append(names, name)
			i += end + 2
		case '}':
			if i+1 < len(src) && src[i+1] == '}' {
				lit.WriteByte('}')
				i += 2
				continue
			}
			return nil, nil, ErrTemplateUnbalanced
		default:
			lit.WriteByte(c)
			i++
		}
	}
	lits = append(lits, lit.String())
	return lits, names, nil
}
