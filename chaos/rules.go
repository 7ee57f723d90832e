package chaos

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
)

// Errors of the checker's configuration and rules.
var (
	ErrConfig  = errors.New("chaos: bad config")
	ErrPattern = errors.New("chaos: bad key pattern")
)

// Compare modes of a Rule.
const (
	// CompareEqual: a cached value is fresh when it equals the database's.
	CompareEqual = "equal"
	// CompareVersion: both are integers and a cached value is fresh when
	// it is not lower than the database's (a version that only grows).
	CompareVersion = "version"
)

// Rule renders the database row behind a family of cache keys to the
// value the cache should hold. Key is a pattern such as "item:{id}"; each
// {name} matches one or more bytes, and the matched texts are passed to
// SQL as $1, $2, ... in the order they appear (as text: cast them in the
// query when the column is not text, "WHERE id = $1::bigint"). SQL returns
// one row with one column; no row means the key should not be cached.
type Rule struct {
	Key     string `yaml:"key"`
	SQL     string `yaml:"sql"`
	Compare string `yaml:"compare"` // equal (default) | version
}

// rule is a compiled Rule.
type rule struct {
	Rule
	re *regexp.Regexp
}

// compileRules checks and compiles rules.
func compileRules(rs []Rule) ([]*rule, error) {
	if len(rs) == 0 {
		return nil, fmt.Errorf("%w: no rules", ErrConfig)
	}
	out := make([]*rule, 0, len(rs))
	for i, r := range rs {
		re, err := compilePattern(r.Key)
		if err != nil {
			return nil, fmt.Errorf("rule %d: %w", i, err)
		}
		if strings.TrimSpace(r.SQL) == "" {
			return nil, fmt.Errorf("%w: rule %d (%s): sql is empty", ErrConfig, i, r.Key)
		}
		switch r.Compare {
		case "":
			r.Compare = CompareEqual
		case CompareEqual, CompareVersion:
		default:
			return nil, fmt.Errorf("%w: rule %d (%s): compare %q: want equal or version", ErrConfig, i, r.Key, r.Compare)
		}
		out = append(out, &rule{Rule: r, re: re})
	}
	return out, nil
}

// compilePattern turns "item:{id}" into an anchored regular expression
// with one group per placeholder. It never panics.
func compilePattern(p string) (*regexp.Regexp, error) {
	if p == "" {
		return nil, fmt.Errorf("%w: empty", ErrPattern)
	}
	var b strings.Builder
	b.WriteString("^")
	holes := 0
	for rest := p; rest != ""; {
		open := strings.IndexByte(rest, '{')
		closeAt := strings.IndexByte(rest, '}')
		if open < 0 {
			if closeAt >= 0 {
				return nil, fmt.Errorf("%w: %q: } without {", ErrPattern, p)
			}
			b.WriteString(regexp.QuoteMeta(rest))
			break
		}
		if closeAt >= 0 && closeAt < open {
			return nil, fmt.Errorf("%w: %q: } without {", ErrPattern, p)
		}
		b.WriteString(regexp.QuoteMeta(rest[:open]))
		rest = rest[open+1:]
		end := strings.IndexByte(rest, '}')
		if end < 0 {
			return nil, fmt.Errorf("%w: %q: { without }", ErrPattern, p)
		}
		name := rest[:end]
		if name == "" || strings.ContainsAny(name, "{ ") {
			return nil, fmt.Errorf("%w: %q: bad placeholder {%s}", ErrPattern, p, name)
		}
		b.WriteString("(.+?)")
		holes++
		rest = rest[end+1:]
	}
	b.WriteString("$")
	if holes == 0 {
		return nil, fmt.Errorf("%w: %q has no {placeholder}", ErrPattern, p)
	}
	return regexp.Compile(b.String())
}

// match returns the rule for key and the placeholder values, or nil.
func matchRule(rules []*rule, key string) (*rule, []any) {
	for _, r := range rules {
		m := r.re.FindStringSubmatch(key)
		if m == nil {
			continue
		}
		args := make([]any, len(m)-1)
		for i, s := range m[1:] {
			args[i] = s
		}
		return r, args
	}
	return nil, nil
}

// querier is the database the checker reads.
type querier interface {
	queryRow(ctx context.Context, sql string, args []any, dst ...any) error
}

// expected runs the rule's query: the value the cache should hold, and
// false when there is no row.
func (r *rule) expected(ctx context.Context, db querier, args []any) (string, bool, error) {
	var v any
	err := db.queryRow(ctx, r.SQL, args, &v)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("query for %s: %w", r.Key, err)
	}
	switch x := v.(type) {
	case nil:
		return "", false, nil
	case []byte:
		return string(x), true, nil
	case string:
		return x, true, nil
	default:
		return fmt.Sprint(x), true, nil
	}
}

// fresh says whether a cached value is as new as the database's.
func (r *rule) fresh(cached, db string) bool {
	if r.Compare == CompareVersion {
		c, err1 := strconv.ParseInt(strings.TrimSpace(cached), 10, 64)
		d, err2 := strconv.ParseInt(strings.TrimSpace(db), 10, 64)
		if err1 == nil && err2 == nil {
			return c >= d
		}
	}
	return cached == db
}
