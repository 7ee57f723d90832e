package mckey

import (
	"errors"
	"strings"
	"testing"
)

func TestCheck(t *testing.T) {
	tests := []struct {
		key    string
		want   error
		base64 bool
	}{
		{"post:1", nil, false},
		{strings.Repeat("k", 250), nil, false},
		{"caf\xc3\xa9", nil, false},
		{"tab\there", nil, true},
		{"del\x7f", nil, true},
		{"", ErrEmpty, false},
		{strings.Repeat("k", 251), ErrTooLong, false},
		{"a b", ErrBadByte, false},
		{"a\r\nmd b", ErrBadByte, true},
		{"nul\x00", ErrBadByte, true},
	}
	for _, tt := range tests {
		err := Check(tt.key)
		if !errors.Is(err, tt.want) || (tt.want == nil) != (err == nil) {
			t.Errorf("Check(%q) = %v; want %v", tt.key, err, tt.want)
		}
		if err != nil && !errors.Is(err, ErrInvalid) {
			t.Errorf("Check(%q) = %v; want it to wrap ErrInvalid", tt.key, err)
		}
		if got := Valid([]byte(tt.key)); got != (tt.want == nil) {
			t.Errorf("Valid(%q) = %t; want %t", tt.key, got, tt.want == nil)
		}
		if got := NeedsBase64(tt.key); got != tt.base64 {
			t.Errorf("NeedsBase64(%q) = %t; want %t", tt.key, got, tt.base64)
		}
	}
}

func FuzzCheck(f *testing.F) {
	for _, s := range []string{"post:1", "", "a b", "x\x00", "\t"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, key string) {
		err := Check(key)
		if (err == nil) != Valid([]byte(key)) {
			t.Fatalf("Check(%q) = %v but Valid = %t", key, err, Valid([]byte(key)))
		}
		if err == nil && (len(key) == 0 || len(key) > MaxLen || strings.ContainsAny(key, " \r\n\x00")) {
			t.Fatalf("Check(%q) accepted a key memcached refuses", key)
		}
	})
}

func TestReason(t *testing.T) {
	for _, tt := range []struct {
		key  string
		want string
	}{{"", "empty"}, {strings.Repeat("k", 251), "too_long"}, {"a b", "invalid_char"}, {"ok", ""}} {
		if got := Reason(Check(tt.key)); got != tt.want {
			t.Errorf("Reason(Check(%q)) = %q; want %q", tt.key, got, tt.want)
		}
	}
}
