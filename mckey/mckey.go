// Package mckey says which byte strings memcached accepts as a key. It is
// the one definition that the rules (rendered keys), the pool (keys sent
// over the meta protocol) and the proxy (keys read from clients) share,
// so that a key one of them accepts is never refused by another. It
// leaves encoding on the wire to mcpool.
package mckey

import (
	"errors"
	"fmt"
)

// MaxLen is memcached's key length limit in bytes.
const MaxLen = 250

// Errors returned by Check; each wraps ErrInvalid.
var (
	ErrInvalid = errors.New("mckey: invalid key")
	ErrEmpty   = fmt.Errorf("%w: empty", ErrInvalid)
	ErrTooLong = fmt.Errorf("%w: longer than %d bytes", ErrInvalid, MaxLen)
	ErrBadByte = fmt.Errorf("%w: space, CR, LF or NUL", ErrInvalid)
)

// Check reports whether key is a key memcached 1.6 accepts: 1 to 250
// bytes, none of them a space (the tokenizer splits on it), CR, LF (they
// end the line) or NUL. Other control bytes and bytes >= 0x80 are
// accepted, as memcached accepts them; mcpool sends keys holding control
// bytes in base64 (see NeedsBase64).
func Check(key string) error {
	if len(key) == 0 {
		return ErrEmpty
	}
	if len(key) > MaxLen {
		return fmt.Errorf("%w: %d bytes", ErrTooLong, len(key))
	}
	if i := BadByte(key); i >= 0 {
		return fmt.Errorf("%w: byte 0x%02x at offset %d", ErrBadByte, key[i], i)
	}
	return nil
}

// Valid is Check for a byte slice, without the error: the hot path of a
// protocol parser.
func Valid(key []byte) bool {
	if len(key) == 0 || len(key) > MaxLen {
		return false
	}
	for _, c := range key {
		if c == ' ' || c == '\r' || c == '\n' || c == 0 {
			return false
		}
	}
	return true
}

// BadByte returns the offset of the first byte of key that memcached does
// not accept in a key (space, CR, LF, NUL), or -1.
func BadByte(key string) int {
	for i := 0; i < len(key); i++ {
		if c := key[i]; c == ' ' || c == '\r' || c == '\n' || c == 0 {
			return i
		}
	}
	return -1
}

// NeedsBase64 reports whether key holds a control byte (0x01-0x1f other
// than CR and LF, or 0x7f). memcached accepts such keys in the text
// protocol, but the meta protocol's flags would be ambiguous next to
// them, so they travel base64-encoded with the b flag.
func NeedsBase64(key string) bool {
	for i := 0; i < len(key); i++ {
		if c := key[i]; c < ' ' || c == 0x7f {
			return true
		}
	}
	return false
}

// Reason names a key error for a metric label: "empty", "too_long" or
// "invalid_char", or "" when err is not one of Check's.
func Reason(err error) string {
	switch {
	case errors.Is(err, ErrEmpty):
		return "empty"
	case errors.Is(err, ErrTooLong):
		return "too_long"
	case errors.Is(err, ErrBadByte):
		return "invalid_char"
	}
	return ""
}
