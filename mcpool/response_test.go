package mcpool

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
)

func TestReadResponse(t *testing.T) {
	tests := []struct {
		in   string
		want Response
		err  error  // errors.Is target
		kind string // *ServerError kind
	}{
		{in: "HD\r\n", want: Response{Status: StatusHD}},
		{in: "HD c42 kfoo Oab\r\n", want: Response{Status: StatusHD, Flags: "c42 kfoo Oab", CAS: 42, Key: "foo", Opaque: "ab"}},
		{in: "VA 5 c1 t30 W\r\nhello\r\n", want: Response{Status: StatusVA, Value: []byte("hello"), Flags: "c1 t30 W", CAS: 1, TTL: 30, Win: true}},
		{in: "VA 0 c2 Z X\r\n\r\n", want: Response{Status: StatusVA, Value: []byte{}, Flags: "c2 Z X", CAS: 2, Claimed: true, Stale: true}},
		{in: "VA 1 f77 t-1 s1 h1 l3\r\nz\r\n", want: Response{Status: StatusVA, Value: []byte("z"), Flags: "f77 t-1 s1 h1 l3", ClientFlags: 77, TTL: -1, Size: 1, Hit: true, LastAccess: 3}},
		{in: "VA 4\r\na\r\nb\r\n", want: Response{Status: StatusVA, Value: []byte("a\r\nb")}},
		{in: "EN\r\n", want: Response{Status: StatusEN}},
		{in: "EN kfoo O1\r\n", want: Response{Status: StatusEN, Flags: "kfoo O1", Key: "foo", Opaque: "1"}},
		{in: "NF\r\n", want: Response{Status: StatusNF}},
		{in: "NS\r\n", want: Response{Status: StatusNS}},
		{in: "EX\r\n", want: Response{Status: StatusEX}},
		{in: "MN\r\n", want: Response{Status: StatusMN}},
		{in: "ME foo exp=-1 la=2 cas=3 fetch=no cls=1 size=63\r\n", want: Response{Status: StatusME, Key: "foo", Flags: "exp=-1 la=2 cas=3 fetch=no cls=1 size=63"}},
		{in: "ERROR\r\n", kind: "ERROR"},
		{in: "CLIENT_ERROR bad command line format\r\n", kind: "CLIENT_ERROR"},
		{in: "SERVER_ERROR out of memory storing object\r\n", kind: "SERVER_ERROR"},
		{in: "", err: io.EOF},
		{in: "HD", err: io.EOF},
		{in: "HD\n", err: ErrProtocol},
		{in: "XX\r\n", err: ErrProtocol},
		{in: "HDX\r\n", err: ErrProtocol},
		{in: "VA\r\n", err: ErrProtocol},
		{in: "VA -1\r\n", err: ErrProtocol},
		{in: "VA x\r\n", err: ErrProtocol},
		{in: "VA 99999999999999999999\r\n", err: ErrProtocol},
		{in: "VA 2000\r\n", err: ErrProtocol}, // over the test's 1000-byte limit
		{in: "VA 5\r\nhel", err: io.EOF},
		{in: "VA 5\r\nhelloXY", err: ErrProtocol},
		{in: "HD cX\r\n", err: ErrProtocol},
		{in: "HD f4294967296\r\n", err: ErrProtocol},
		{in: "ME\r\n", err: ErrProtocol},
		{in: "VALUE foo 0 1\r\n", err: ErrProtocol},
		{in: "HD " + strings.Repeat("k", maxLine) + "\r\n", err: ErrProtocol},
	}
	for _, tt := range tests {
		name := tt.in
		if len(name) > 40 {
			name = name[:40]
		}
		t.Run(name, func(t *testing.T) {
			got, err := readResponse(bufio.NewReaderSize(strings.NewReader(tt.in), 64<<10), 1000)
			switch {
			case tt.kind != "":
				var se *ServerError
				if !errors.As(err, &se) || se.Kind != tt.kind {
					t.Fatalf("got %+v, %v; want %s", got, err, tt.kind)
				}
			case tt.err != nil:
				if !errors.Is(err, tt.err) {
					t.Fatalf("got %+v, %v; want %v", got, err, tt.err)
				}
			default:
				if err != nil || !reflect.DeepEqual(got, tt.want) {
					t.Fatalf("got %+v, %v; want %+v", got, err, tt.want)
				}
				if out := got.Append(nil); string(out) != tt.in {
					t.Fatalf("Append got %q; want %q", out, tt.in)
				}
			}
		})
	}
}

func TestResponseFlag(t *testing.T) {
	r := Response{Status: StatusHD, Flags: "c7 W Oxyz t-1"}
	for _, tt := range []struct {
		f    byte
		tok  string
		want bool
	}{{'c', "7", true}, {'W', "", true}, {'O', "xyz", true}, {'t', "-1", true}, {'k', "", false}} {
		if tok, ok := r.Flag(tt.f); tok != tt.tok || ok != tt.want {
			t.Errorf("Flag(%c) got %q, %v; want %q, %v", tt.f, tok, ok, tt.tok, tt.want)
		}
	}
}

// FuzzParseResponse feeds arbitrary bytes to the response parser: it must
// not panic, and whatever it accepts must read back the same after Append.
func FuzzParseResponse(f *testing.F) {
	for _, s := range []string{
		"HD\r\n", "VA 5 c1 t30 W\r\nhello\r\n", "EN\r\nMN\r\n", "ME k exp=-1\r\n",
		"CLIENT_ERROR x\r\nHD\r\n", "VA 3 Z X c9\r\nabc\r\nNF\r\n", "VA 1\r\nab", "HD c\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		br := bufio.NewReaderSize(bytes.NewReader(data), 4096)
		for i := 0; i < 64; i++ {
			r, err := readResponse(br, 1<<16)
			var se *ServerError
			if errors.As(err, &se) {
				continue
			}
			if err != nil {
				return
			}
			if r.Status == 0 {
				t.Fatalf("accepted a response without status from %q", data)
			}
			wire := r.Append(nil)
			back, err := readResponse(bufio.NewReader(bytes.NewReader(wire)), 1<<16)
			if err != nil {
				t.Fatalf("re-reading %q (from %q): %v", wire, data, err)
			}
			if !reflect.DeepEqual(back, r) {
				t.Fatalf("round trip of %q: got %+v; want %+v", wire, back, r)
			}
		}
	})
}

// FuzzBuildRaw feeds arbitrary request lines to the passthrough checker:
// it must not panic, and whatever it accepts must be one well-formed meta
// command (plus mn after a quiet one).
func FuzzBuildRaw(f *testing.F) {
	f.Add([]byte("mg foo v c N30"), []byte(nil))
	f.Add([]byte("ms foo 2 T60 q"), []byte("hi"))
	f.Add([]byte("md foo I T30\r\n"), []byte(nil))
	f.Add([]byte("mn"), []byte(nil))
	f.Fuzz(func(t *testing.T, line, value []byte) {
		r, _ := buildRaw(line, value, 1<<16)
		if r.err != nil {
			return
		}
		body := r.buf
		if r.quiet {
			if !bytes.HasSuffix(body, noopRequest) {
				t.Fatalf("quiet request %q does not end with mn", body)
			}
			body = body[:len(body)-len(noopRequest)]
		}
		first, rest, ok := bytes.Cut(body, []byte("\r\n"))
		if !ok || bytes.ContainsAny(first, "\r\n") {
			t.Fatalf("request %q is not one line", body)
		}
		if r.kind == kindSet {
			if !bytes.Equal(rest, append(append([]byte(nil), value...), '\r', '\n')) {
				t.Fatalf("ms data block %q; want %q", rest, value)
			}
		} else if len(rest) != 0 {
			t.Fatalf("request %q has bytes after its line", body)
		}
	})
}
