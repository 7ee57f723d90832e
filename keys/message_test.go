package keys

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
)

func TestParseMessage(t *testing.T) {
	long := strings.Repeat("k", 251)
	tests := []struct {
		name string
		in   string
		want []string
		errs []error
	}{
		{"empty", "", nil, nil},
		{"only whitespace", " \t\n\r\v\f ", nil, nil},
		{"one key", "post:1", []string{"post:1"}, nil},
		{"spaces", "k1 k2  k3", []string{"k1", "k2", "k3"}, nil},
		{"tabs and newlines", "\tk1\nk2\r\nk3\n", []string{"k1", "k2", "k3"}, nil},
		{"duplicates", "k1 k2 k1 k2 k3", []string{"k1", "k2", "k3"}, nil},
		{"too long", "k1 " + long + " k2", []string{"k1", "k2"}, []error{ErrKeyTooLong}},
		{"exactly 250", strings.Repeat("k", 250), []string{strings.Repeat("k", 250)}, nil},
		{"NUL byte", "k1 a\x00b k2 c\x00", []string{"k1", "k2"}, []error{ErrKeyInvalidChar, ErrKeyInvalidChar}},
		{"control byte", "k1 c\x7f", []string{"k1", "c\x7f"}, nil}, // memcached accepts it
		{"invalid UTF-8", "k1 caf\xe9 k2", []string{"k1", "k2"}, []error{ErrKeyInvalidUTF8}},
		{"non-ascii", "ключ:1 a\u00a0b", []string{"ключ:1", "a\u00a0b"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, errs := ParseMessage([]byte(tt.in))
			if !slices.Equal(got, tt.want) {
				t.Errorf("keys: got %q; want %q", got, tt.want)
			}
			if len(errs) != len(tt.errs) {
				t.Fatalf("errors: got %v; want %v", errs, tt.errs)
			}
			for i, err := range errs {
				var ke *Error
				if !errors.Is(err, tt.errs[i]) || !errors.As(err, &ke) || ke.Key == "" {
					t.Errorf("error %d: got %v; want *Error with key wrapping %v", i, err, tt.errs[i])
				}
			}
		})
	}
}

func TestParseMessageErrorText(t *testing.T) {
	_, errs := ParseMessage([]byte(strings.Repeat("x", 300)))
	want := `mckey: invalid key: longer than 250 bytes: 300 bytes (key "` + strings.Repeat("x", 64) + `...")`
	if len(errs) != 1 || errs[0].Error() != want {
		t.Errorf("got %v; want %s", errs, want)
	}
}

// TestParseMessageManyDuplicates crosses the threshold where dedup switches
// to a map.
func TestParseMessageManyDuplicates(t *testing.T) {
	var in strings.Builder
	var want []string
	for round := 0; round < 3; round++ {
		for i := 0; i < 3*dedupMapAt; i++ {
			k := fmt.Sprintf("k%d", i)
			in.WriteString(k + " ")
			if round == 0 {
				want = append(want, k)
			}
		}
	}
	got, errs := ParseMessage([]byte(in.String()))
	if !slices.Equal(got, want) || errs != nil {
		t.Errorf("got %d keys %v; want %d distinct keys", len(got), errs, len(want))
	}
}

func TestParseMessageDoesNotAliasInput(t *testing.T) {
	in := []byte("k1 k2")
	got, _ := ParseMessage(in)
	copy(in, "xxxxx")
	if !slices.Equal(got, []string{"k1", "k2"}) {
		t.Errorf("got %q after changing the input; want [k1 k2]", got)
	}
}
