package keys

// dedupMapAt is the key count above which ParseMessage dedups with a map
// instead of comparing with every earlier key.
const dedupMapAt = 32

// ParseMessage returns the keys in the content of an explicit invalidation
// message, as sent by
//
//	SELECT pg_logical_emit_message(true, 'invalidate', 'k1 k2 ...');
//
// Keys are separated by runs of ASCII whitespace (space, tab, newline,
// carriage return, vertical tab, form feed). Repeated keys are returned
// once, in order of first appearance. Each key that memcached would reject
// (longer than 250 bytes, or holding another control byte) is left out and
// reported as an *Error wrapping ErrKeyTooLong or ErrKeyInvalidChar; the
// other keys still come out. Empty content yields no keys and no error.
func ParseMessage(content []byte) ([]string, []error) {
	if len(content) == 0 {
		return nil, nil
	}
	s := string(content) // one copy; the keys are substrings of it
	var (
		out  []string
		errs []error
		seen map[string]struct{}
	)
	for i := 0; i < len(s); {
		if isSpace(s[i]) {
			i++
			continue
		}
		j := i
		for j < len(s) && !isSpace(s[j]) {
			j++
		}
		k := s[i:j]
		i = j
		if err := Validate(k); err != nil {
			errs = append(errs, &Error{Key: k, Err: err})
			continue
		}
		if seen == nil && len(out) >= dedupMapAt {
			seen = make(map[string]struct{}, 2*len(out))
			for _, o := range out {
				seen[o] = struct{}{}
			}
		}
		if seen != nil {
			if _, dup := seen[k]; dup {
				continue
			}
			seen[k] = struct{}{}
		} else if contains(out, k) {
			continue
		}
		out = append(out, k)
	}
	return out, errs
}

func contains(list []string, k string) bool {
	for _, o := range list {
		if o == k {
			return true
		}
	}
	return false
}

func isSpace(c byte) bool {
	switch c {
	case ' ', '\t', '\n', '\r', '\v', '\f':
		return true
	}
	return false
}
