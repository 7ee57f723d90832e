package mcpool

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// Status is the two-letter code that opens a meta response.
type Status uint8

// Meta response codes (protocol.txt, memcached 1.6.18).
const (
	StatusHD Status = iota + 1 // success (stored, deleted, hit without value)
	StatusVA                   // value follows
	StatusEN                   // miss (mg, me)
	StatusNF                   // not found (md, ma, ms with C)
	StatusNS                   // not stored (ms add/replace, ma autovivify)
	StatusEX                   // exists: CAS mismatch
	StatusMN                   // end of a pipeline (mn)
	StatusME                   // meta debug line (me)
)

var statusNames = [...]string{"", "HD", "VA", "EN", "NF", "NS", "EX", "MN", "ME"}

func (s Status) String() string {
	if int(s) < len(statusNames) && s != 0 {
		return statusNames[s]
	}
	return "Status(" + strconv.Itoa(int(s)) + ")"
}

func parseStatus(b []byte) Status {
	if len(b) != 2 {
		return 0
	}
	for i := 1; i < len(statusNames); i++ {
		if statusNames[i][0] == b[0] && statusNames[i][1] == b[1] {
			return Status(i)
		}
	}
	return 0
}

// Response is one meta response. The return flags the server sent are kept
// raw in Flags, in the order sent; the common ones are also decoded into the
// fields below (zero when the flag was not returned).
type Response struct {
	Status Status
	// Value is the data block of a VA response (a fresh slice the caller
	// owns), nil otherwise.
	Value []byte
	// Flags is the raw text after the code (and after the size for VA, and
	// the key for ME), for example "c7 t-1 W". Empty when none.
	Flags string

	Win         bool   // W: this client won the right to recache
	Stale       bool   // X: the item is stale (md I, or ms I with an old CAS)
	Claimed     bool   // Z: a winning flag was already handed to another client
	CAS         uint64 // c
	TTL         int64  // t: remaining seconds, -1 for unlimited
	ClientFlags uint32 // f
	Size        int64  // s
	Key         string // k (base64 when the b flag is also returned); ME: the key
	Opaque      string // O
	Hit         bool   // h1: the item had been fetched before
	LastAccess  int64  // l: seconds since last access

	// Quiet is set when the request carried q and memcached suppressed the
	// response; Status is then the implied one (EN for mg and me, HD for
	// ms, md and ma).
	Quiet bool
}

// Flag returns the token of return flag f and whether it was returned.
// For bare flags such as W the token is "".
func (r *Response) Flag(f byte) (string, bool) {
	if r.Status == StatusME {
		return "", false
	}
	s := r.Flags
	for len(s) > 0 {
		var tok string
		tok, s, _ = strings.Cut(s, " ")
		if len(tok) > 0 && tok[0] == f {
			return tok[1:], true
		}
	}
	return "", false
}

// Uint64 returns the value of a VA response as a number, as ma v returns it.
func (r *Response) Uint64() (uint64, error) {
	if r.Status != StatusVA {
		return 0, fmt.Errorf("%w: no value (status %s)", ErrBadRequest, r.Status)
	}
	n, err := strconv.ParseUint(string(r.Value), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: value %q is not a number", ErrBadRequest, r.Value)
	}
	return n, nil
}

// Append appends r in memcached's wire format ("VA 2 c7\r\nhi\r\n") to b. A
// Quiet response appends nothing, as memcached sent nothing.
func (r *Response) Append(b []byte) []byte {
	if r.Quiet {
		return b
	}
	b = append(b, r.Status.String()...)
	if r.Status == StatusVA {
		b = append(b, ' ')
		b = strconv.AppendInt(b, int64(len(r.Value)), 10)
	}
	if r.Status == StatusME {
		b = append(b, ' ')
		b = append(b, r.Key...)
	}
	if r.Flags != "" {
		b = append(b, ' ')
		b = append(b, r.Flags...)
	}
	b = append(b, "\r\n"...)
	if r.Status == StatusVA {
		b = append(b, r.Value...)
		b = append(b, "\r\n"...)
	}
	return b
}

// maxLine bounds a response line; memcached's are far shorter (a key is at
// most 250 bytes, an opaque 32).
const maxLine = 8 << 10

var errLineTooLong = errors.New("response line too long")

// readResponse reads one response from br. An ERROR, CLIENT_ERROR or
// SERVER_ERROR line is returned as a *ServerError with the stream still in
// step. Anything else that is not a well-formed meta response is an error
// wrapping ErrProtocol, after which the stream cannot be trusted. Values
// larger than maxValue bytes are refused with ErrProtocol before they are
// read. It never panics, whatever br holds.
func readResponse(br *bufio.Reader, maxValue int) (Response, error) {
	line, err := readLine(br)
	if err != nil {
		return Response{}, err
	}
	code, rest, _ := cutSpace(line)
	st := parseStatus(code)
	if st == 0 {
		if se := parseServerError(line); se != nil {
			return Response{}, se
		}
		return Response{}, fmt.Errorf("%w: unexpected line %q", ErrProtocol, truncate(line))
	}
	r := Response{Status: st}
	var size int64 = -1
	switch st {
	case StatusVA:
		var tok []byte
		tok, rest, _ = cutSpace(rest)
		n, ok := parseDecimal(tok)
		if !ok {
			return Response{}, fmt.Errorf("%w: bad value size in %q", ErrProtocol, truncate(line))
		}
		if n > int64(maxValue) {
			return Response{}, fmt.Errorf("%w: value of %d bytes exceeds limit %d", ErrProtocol, n, maxValue)
		}
		size = n
	case StatusME:
		var key []byte
		key, rest, _ = cutSpace(rest)
		if len(key) == 0 {
			return Response{}, fmt.Errorf("%w: ME without key", ErrProtocol)
		}
		r.Key = string(key)
		r.Flags = string(rest)
		return r, nil
	}
	if len(rest) > 0 {
		r.Flags = string(rest)
		if err := r.decodeFlags(); err != nil {
			return Response{}, fmt.Errorf("%w: %v in %q", ErrProtocol, err, truncate(line))
		}
	}
	if size >= 0 {
		buf := make([]byte, size+2)
		if _, err := io.ReadFull(br, buf); err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) {
				err = io.EOF
			}
			return Response{}, fmt.Errorf("read value: %w", err)
		}
		if buf[size] != '\r' || buf[size+1] != '\n' {
			return Response{}, fmt.Errorf("%w: value of %d bytes not followed by CRLF", ErrProtocol, size)
		}
		r.Value = buf[:size:size]
	}
	return r, nil
}

// readLine returns one line without its CRLF. The slice is valid until the
// next read from br.
func readLine(br *bufio.Reader) ([]byte, error) {
	line, err := br.ReadSlice('\n')
	if err != nil {
		if errors.Is(err, bufio.ErrBufferFull) {
			return nil, fmt.Errorf("%w: %v", ErrProtocol, errLineTooLong)
		}
		if errors.Is(err, io.EOF) && len(line) > 0 {
			return nil, io.EOF
		}
		return nil, err
	}
	if len(line) > maxLine {
		return nil, fmt.Errorf("%w: %v", ErrProtocol, errLineTooLong)
	}
	if len(line) < 2 || line[len(line)-2] != '\r' {
		return nil, fmt.Errorf("%w: line %q not ended by CRLF", ErrProtocol, truncate(line))
	}
	return line[:len(line)-2], nil
}

func parseServerError(line []byte) *ServerError {
	kind, msg, _ := cutSpace(line)
	switch string(kind) {
	case "ERROR", "CLIENT_ERROR", "SERVER_ERROR":
		return &ServerError{Kind: string(kind), Msg: string(msg)}
	}
	return nil
}

// decodeFlags fills the typed fields from r.Flags.
func (r *Response) decodeFlags() error {
	s := r.Flags
	for len(s) > 0 {
		var tok string
		tok, s, _ = strings.Cut(s, " ")
		if tok == "" {
			continue
		}
		v := tok[1:]
		var err error
		switch tok[0] {
		case 'W':
			r.Win = true
		case 'X':
			r.Stale = true
		case 'Z':
			r.Claimed = true
		case 'c':
			r.CAS, err = strconv.ParseUint(v, 10, 64)
		case 't':
			r.TTL, err = strconv.ParseInt(v, 10, 64)
		case 'f':
			var n uint64
			n, err = strconv.ParseUint(v, 10, 32)
			r.ClientFlags = uint32(n)
		case 's':
			r.Size, err = strconv.ParseInt(v, 10, 64)
		case 'k':
			r.Key = v
		case 'O':
			r.Opaque = v
		case 'h':
			r.Hit = v == "1"
		case 'l':
			r.LastAccess, err = strconv.ParseInt(v, 10, 64)
		}
		if err != nil {
			return fmt.Errorf("bad return flag %q", tok)
		}
	}
	return nil
}

func cutSpace(b []byte) (before, after []byte, found bool) {
	for i, c := range b {
		if c == ' ' {
			return b[:i], b[i+1:], true
		}
	}
	return b, nil, false
}

func parseDecimal(b []byte) (int64, bool) {
	if len(b) == 0 || len(b) > 18 {
		return 0, false
	}
	var n int64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int64(c-'0')
	}
	return n, true
}

func truncate(b []byte) []byte {
	if len(b) > 64 {
		return b[:64]
	}
	return b
}
