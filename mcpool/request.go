package mcpool

import (
	"bytes"
	"encoding/base64"
	"fmt"
	"strconv"
	"time"

	"github.com/pgcache/pgcache/mckey"
)

// MaxKeyLen is memcached's key length limit (mckey.MaxLen).
const MaxKeyLen = mckey.MaxLen

// maxFlagLen bounds one flag token; memcached's opaque limit is 32 bytes
// and base64 keys are not flags, so this is generous.
const maxFlagLen = 64

// SetOptions are the flags of a meta set (ms). Zero values send nothing.
type SetOptions struct {
	// Mode is the M flag: 'S' set (the default, also 0), 'E' add, 'A'
	// append, 'P' prepend, 'R' replace.
	Mode byte
	// CAS is the C flag: store only if the item's CAS equals it. 0: no
	// compare.
	CAS uint64
	// TTL is the T flag, rounded up to whole seconds. 0: never expires.
	// Negative: expires at once. Over 30 days it is sent as an absolute
	// Unix time, as memcached reads such values.
	TTL time.Duration
	// ClientFlags is the F flag, the opaque 32-bit client flags.
	ClientFlags uint32
	// Invalidate is the I flag: with CAS, a CAS older than the item's is
	// accepted and the item is stored marked stale.
	Invalidate bool
	// ReturnCAS is the c flag: return the new CAS in Response.CAS.
	ReturnCAS bool
	// Flags are sent as they are after the others (e.g. "k", "O42", "b").
	Flags []string
}

// DeleteOptions are the flags of a meta delete (md).
type DeleteOptions struct {
	// Invalidate is the I flag: mark the item stale and bump its CAS
	// instead of removing it. Later mg see X (and one of them W).
	Invalidate bool
	// TTL is the T flag, only with Invalidate: the stale item's new TTL,
	// rounded up to whole seconds. 0: unchanged.
	TTL time.Duration
	// CAS is the C flag: act only if the item's CAS equals it. 0: no compare.
	CAS uint64
	// Quiet is the q flag: memcached sends no HD; the Response is then
	// synthesized with Quiet set.
	Quiet bool
	// Flags are sent as they are after the others.
	Flags []string
}

// ArithmeticOptions are the flags of a meta arithmetic (ma). The v flag is
// always sent, so a successful response is VA with the new value (see
// Response.Uint64).
type ArithmeticOptions struct {
	// Decrement selects MD (decrement, stops at 0); else increment.
	Decrement bool
	// Delta is the D flag. 0 sends none, which memcached takes as 1.
	Delta uint64
	// Create is the N flag: on a miss, create the item with Initial and
	// CreateTTL (0: never expires) instead of answering NF.
	Create    bool
	CreateTTL time.Duration
	// Initial is the J flag: the value of an item Create makes.
	Initial uint64
	// TTL is the T flag: update the TTL on success. 0: unchanged.
	TTL time.Duration
	// CAS is the C flag. 0: no compare.
	CAS uint64
	// Flags are sent as they are after the others (e.g. "t", "c").
	Flags []string
}

// request kinds, for the implied status of a quiet request.
const (
	kindGet byte = 'g'
	kindSet byte = 's'
	kindDel byte = 'd'
	kindAri byte = 'a'
	kindNop byte = 'n'
	kindDbg byte = 'e'
	// kindChain is many quiet requests ended by one mn (buildDeleteChain).
	kindChain byte = 'Q'
)

// checkKey reports whether key is a key memcached stores (mckey.Check:
// 1 to MaxKeyLen bytes without space, CR, LF or NUL). Other control bytes
// are allowed, as memcached allows them (see appendKey for how they are
// sent).
func checkKey(key string) error {
	if err := mckey.Check(key); err != nil {
		return fmt.Errorf("%w: %q: %w", ErrBadKey, key, err)
	}
	return nil
}

// printable reports whether a token has no space or control byte, the
// meta protocol's rule for a key sent as written (a caller's base64 key).
func printable(key string) bool {
	for i := 0; i < len(key); i++ {
		if c := key[i]; c <= ' ' || c == 0x7f {
			return false
		}
	}
	return true
}

// base64Len is the length of the standard base64 encoding of n bytes.
func base64Len(n int) int { return (n + 2) / 3 * 4 }

// appendKey appends key as a meta-protocol key token and reports whether
// it is base64, in which case the request must carry the b flag. A key
// with a control byte (tab, 0x01-0x1f, 0x7f) is sent in base64, as the
// protocol asks, when its encoding fits in MaxKeyLen (keys of up to 186
// bytes); a longer one is sent as written, which memcached 1.6.18 accepts
// as it does in the text protocol. Either way memcached stores the same
// item a text-protocol client names with these bytes.
func appendKey(b []byte, key string) ([]byte, bool) {
	if !mckey.NeedsBase64(key) || base64Len(len(key)) > MaxKeyLen {
		return append(b, key...), false
	}
	const enc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
	i := 0
	for ; i+3 <= len(key); i += 3 {
		v := uint(key[i])<<16 | uint(key[i+1])<<8 | uint(key[i+2])
		b = append(b, enc[v>>18&63], enc[v>>12&63], enc[v>>6&63], enc[v&63])
	}
	switch len(key) - i {
	case 1:
		v := uint(key[i]) << 16
		b = append(b, enc[v>>18&63], enc[v>>12&63], '=', '=')
	case 2:
		v := uint(key[i])<<16 | uint(key[i+1])<<8
		b = append(b, enc[v>>18&63], enc[v>>12&63], enc[v>>6&63], '=')
	}
	return b, true
}

// hasB reports whether flags hold the b flag: the caller's key is base64
// already.
func hasB(flags []string) bool {
	for _, f := range flags {
		if f == "b" {
			return true
		}
	}
	return false
}

// placementKey returns the bytes a key is placed by: the key itself, or
// for a key the caller sent in base64 (b flag), the decoded bytes, so that
// an item lands on the same server whichever way its key is written.
func placementKey(key string, encoded bool) string {
	if !encoded {
		return key
	}
	raw, err := base64.StdEncoding.DecodeString(key)
	if err != nil || len(raw) == 0 {
		return key // memcached will refuse it; placement does not matter
	}
	return string(raw)
}

func checkFlag(f string) error {
	if len(f) == 0 || len(f) > maxFlagLen {
		return fmt.Errorf("%w: flag %q: want 1 to %d bytes", ErrBadRequest, f, maxFlagLen)
	}
	if c := f[0]; !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z') {
		return fmt.Errorf("%w: flag %q does not start with a letter", ErrBadRequest, f)
	}
	for i := 1; i < len(f); i++ {
		if c := f[i]; c <= ' ' || c == 0x7f {
			return fmt.Errorf("%w: flag %q has a space or control character", ErrBadRequest, f)
		}
	}
	return nil
}

// ttlSeconds converts d to memcached's exptime: whole seconds rounded up,
// -1 for a negative d, and an absolute Unix time beyond 30 days.
func ttlSeconds(d time.Duration) int64 {
	if d < 0 {
		return -1
	}
	s := int64((d + time.Second - 1) / time.Second)
	if s > 30*24*3600 {
		return time.Now().Unix() + s
	}
	return s
}

// builder appends one request line.
type builder struct {
	b     []byte
	quiet bool
	b64   bool // the key went in base64: the b flag is due
	err   error
}

// cmd appends the command and the key. encoded is set when the caller's
// flags hold b: the key is base64 already and is sent as written.
func (w *builder) cmd(cmd, key string, encoded bool) {
	w.b = append(w.b, cmd...)
	w.b = append(w.b, ' ')
	if encoded {
		if len(key) == 0 || len(key) > MaxKeyLen || !printable(key) {
			w.err = fmt.Errorf("%w: base64 key %q", ErrBadKey, key)
			return
		}
		w.b = append(w.b, key...)
		return
	}
	if err := checkKey(key); err != nil {
		w.err = err
		return
	}
	w.b, w.b64 = appendKey(w.b, key)
}

// flagB appends the b flag if cmd sent the key in base64. It comes after
// the command's positional tokens (the data length of ms).
func (w *builder) flagB() {
	if w.b64 {
		w.b = append(w.b, ' ', 'b')
	}
}

func (w *builder) num(f byte, n int64) {
	w.b = append(w.b, ' ', f)
	w.b = strconv.AppendInt(w.b, n, 10)
}

func (w *builder) unum(f byte, n uint64) {
	w.b = append(w.b, ' ', f)
	w.b = strconv.AppendUint(w.b, n, 10)
}

func (w *builder) bare(f byte) {
	if f == 'q' {
		w.quiet = true
	}
	w.b = append(w.b, ' ', f)
}

func (w *builder) flags(fs []string) {
	for _, f := range fs {
		if err := checkFlag(f); err != nil {
			w.err = err
			return
		}
		if f == "q" {
			w.quiet = true
		}
		w.b = append(w.b, ' ')
		w.b = append(w.b, f...)
	}
}

func (w *builder) end() { w.b = append(w.b, '\r', '\n') }

func buildGet(key string, flags []string) *request {
	r := newRequest(8 + len(key) + 4*len(flags))
	w := builder{b: r.buf}
	w.cmd("mg", key, hasB(flags))
	w.flagB()
	w.flags(flags)
	w.end()
	return r.finish(kindGet, w)
}

func buildSet(key string, value []byte, opt SetOptions, maxValue int) *request {
	if len(value) > maxValue {
		return &request{err: fmt.Errorf("%w: value of %d bytes exceeds %d", ErrBadRequest, len(value), maxValue)}
	}
	r := newRequest(48 + len(key) + len(value))
	w := builder{b: r.buf}
	w.cmd("ms", key, hasB(opt.Flags))
	w.b = append(w.b, ' ')
	w.b = strconv.AppendInt(w.b, int64(len(value)), 10)
	w.flagB()
	switch opt.Mode {
	case 0, 'S':
	case 'E', 'A', 'P', 'R':
		w.b = append(w.b, ' ', 'M', opt.Mode)
	default:
		r.err = fmt.Errorf("%w: ms mode %q (want S, E, A, P or R)", ErrBadRequest, opt.Mode)
		return r
	}
	if opt.CAS != 0 {
		w.unum('C', opt.CAS)
	}
	if opt.TTL != 0 {
		w.num('T', ttlSeconds(opt.TTL))
	}
	if opt.ClientFlags != 0 {
		w.unum('F', uint64(opt.ClientFlags))
	}
	if opt.Invalidate {
		w.bare('I')
	}
	if opt.ReturnCAS {
		w.bare('c')
	}
	w.flags(opt.Flags)
	w.end()
	w.b = append(w.b, value...)
	w.end()
	return r.finish(kindSet, w)
}

func buildDelete(key string, opt DeleteOptions) *request {
	r := newRequest(32 + len(key))
	w := builder{b: r.buf}
	w.cmd("md", key, hasB(opt.Flags))
	w.flagB()
	if opt.Invalidate {
		w.bare('I')
		if opt.TTL != 0 {
			w.num('T', ttlSeconds(opt.TTL))
		}
	}
	if opt.CAS != 0 {
		w.unum('C', opt.CAS)
	}
	if opt.Quiet {
		w.bare('q')
	}
	w.flags(opt.Flags)
	w.end()
	return r.finish(kindDel, w)
}

// buildDeleteChain builds one request of quiet deletes of keys, each
// "md <key> [I [T<n>]] q O<i>" with i its index in keys, ended by one mn:
// memcached answers only a delete that fails (NF is quiet too), and the
// mn, so a chain of n deletes costs one answer line when all succeed.
// Keys that cannot be sent are left out and reported in bad (index and
// error); a nil request means none could be sent.
func buildDeleteChain(keys []string, opt DeleteOptions) (r *request, bad []chainFail) {
	size := 8
	for _, k := range keys {
		size += len(k) + 24
	}
	r = newRequest(0)
	if size > cap(r.buf) {
		if b, ok := chainBufs.Get().(*[]byte); ok && cap(*b) >= size {
			r.buf = (*b)[:0]
		} else {
			r.buf = make([]byte, 0, size)
		}
	}
	w := builder{b: r.buf}
	n := 0
	for i, k := range keys {
		mark := len(w.b)
		w.b64, w.err = false, nil
		w.cmd("md", k, false)
		if w.err != nil {
			bad = append(bad, chainFail{idx: i, err: w.err})
			w.b = w.b[:mark]
			continue
		}
		w.flagB()
		if opt.Invalidate {
			w.bare('I')
			if opt.TTL != 0 {
				w.num('T', ttlSeconds(opt.TTL))
			}
		}
		w.bare('q')
		w.num('O', int64(i))
		w.end()
		n++
	}
	if n == 0 {
		r.buf = w.b[:0]
		r.release()
		return nil, bad
	}
	w.b = append(w.b, noopRequest...)
	r.kind, r.buf, r.chain = kindChain, w.b, len(keys)
	return r, bad
}

func buildArithmetic(key string, opt ArithmeticOptions) *request {
	r := newRequest(64 + len(key))
	w := builder{b: r.buf}
	w.cmd("ma", key, hasB(opt.Flags))
	w.flagB()
	w.bare('v')
	if opt.Decrement {
		w.b = append(w.b, " MD"...)
	}
	if opt.Delta != 0 {
		w.unum('D', opt.Delta)
	}
	if opt.Create {
		w.num('N', ttlSeconds(opt.CreateTTL))
		if opt.Initial != 0 {
			w.unum('J', opt.Initial)
		}
	}
	if opt.TTL != 0 {
		w.num('T', ttlSeconds(opt.TTL))
	}
	if opt.CAS != 0 {
		w.unum('C', opt.CAS)
	}
	w.flags(opt.Flags)
	w.end()
	return r.finish(kindAri, w)
}

var noopRequest = []byte("mn\r\n")

// buildRaw checks a meta command line a caller forwards as-is. raw is
// one line, with or without its CRLF; value is the data block of an ms
// (without CRLF) and must be empty for the other commands.
func buildRaw(raw, value []byte, maxValue int) (*request, string) {
	line := bytes.TrimSuffix(bytes.TrimSuffix(raw, []byte("\n")), []byte("\r"))
	bad := func(format string, args ...any) *request {
		return &request{err: fmt.Errorf("%w: "+format, append([]any{ErrBadRequest}, args...)...)}
	}
	if len(line) == 0 {
		return bad("empty request"), ""
	}
	if len(line) > maxLine {
		return bad("request line of %d bytes", len(line)), ""
	}
	toks := bytes.Split(line, []byte(" "))
	cmd := string(toks[0])
	var kind byte
	switch cmd {
	case "mg":
		kind = kindGet
	case "ms":
		kind = kindSet
	case "md":
		kind = kindDel
	case "ma":
		kind = kindAri
	case "mn":
		kind = kindNop
	case "me":
		kind = kindDbg
	default:
		return bad("command %q is not a meta command", truncate(toks[0])), ""
	}
	if kind == kindNop {
		if len(toks) != 1 || len(value) != 0 {
			return bad("mn takes no arguments"), ""
		}
		return &request{kind: kindNop, buf: noopRequest}, ""
	}
	if len(toks) < 2 {
		return bad("%s without key", cmd), ""
	}
	key := string(toks[1])
	if err := checkKey(key); err != nil {
		return &request{err: err}, ""
	}
	flags := toks[2:]
	if kind == kindSet {
		if len(flags) == 0 {
			return bad("ms without data length"), ""
		}
		n, ok := parseDecimal(flags[0])
		if !ok || n != int64(len(value)) {
			return bad("ms data length %q does not match the %d-byte value", truncate(flags[0]), len(value)), ""
		}
		if len(value) > maxValue {
			return bad("value of %d bytes exceeds %d", len(value), maxValue), ""
		}
		flags = flags[1:]
	} else if len(value) != 0 {
		return bad("%s takes no value", cmd), ""
	}
	quiet, encoded := false, false
	for _, f := range flags {
		if err := checkFlag(string(f)); err != nil {
			return &request{err: err}, ""
		}
		if len(f) == 1 && f[0] == 'q' {
			quiet = true
		}
		if len(f) == 1 && f[0] == 'b' {
			encoded = true
		}
	}
	buf := make([]byte, 0, len(line)+len(value)+4)
	buf = append(buf, line...)
	buf = append(buf, '\r', '\n')
	if kind == kindSet {
		buf = append(buf, value...)
		buf = append(buf, '\r', '\n')
	}
	if quiet {
		buf = append(buf, noopRequest...)
	}
	return &request{kind: kind, buf: buf, quiet: quiet}, placementKey(key, encoded)
}
