package lease

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

func TestParseCommand(t *testing.T) {
	const maxValue = 1 << 20
	tests := []struct {
		line string
		want Command
	}{
		{"get a\r\n", Command{Op: OpGet, Keys: []string{"a"}}},
		{"get a b  c\r\n", Command{Op: OpGet, Keys: []string{"a", "b", "c"}}},
		{"gets a\n", Command{Op: OpGets, Keys: []string{"a"}}},
		{"gat 10 a b\r\n", Command{Op: OpGat, Exptime: 10, Keys: []string{"a", "b"}}},
		{"gats -1 a\r\n", Command{Op: OpGats, Exptime: -1, Keys: []string{"a"}}},
		{"set k 5 100 3\r\n", Command{Op: OpSet, Keys: []string{"k"}, Flags: 5, Exptime: 100, Bytes: 3}},
		{"set k 4294967295 0 0 noreply\r\n", Command{Op: OpSet, Keys: []string{"k"}, Flags: 4294967295, NoReply: true}},
		{"add k 0 -1 1\r\n", Command{Op: OpAdd, Keys: []string{"k"}, Exptime: -1, Bytes: 1}},
		{"replace k 0 0 1\r\n", Command{Op: OpReplace, Keys: []string{"k"}, Bytes: 1}},
		{"append k 0 0 1\r\n", Command{Op: OpAppend, Keys: []string{"k"}, Bytes: 1}},
		{"prepend k 0 0 1\r\n", Command{Op: OpPrepend, Keys: []string{"k"}, Bytes: 1}},
		{"cas k 1 2 3 18446744073709551615\r\n", Command{Op: OpCas, Keys: []string{"k"}, Flags: 1, Exptime: 2, Bytes: 3, CAS: 1<<64 - 1}},
		{"delete k\r\n", Command{Op: OpDelete, Keys: []string{"k"}}},
		{"delete k 0 noreply\r\n", Command{Op: OpDelete, Keys: []string{"k"}, NoReply: true}},
		{"incr k 18446744073709551615\r\n", Command{Op: OpIncr, Keys: []string{"k"}, Delta: 1<<64 - 1}},
		{"decr k 0 noreply\r\n", Command{Op: OpDecr, Keys: []string{"k"}, NoReply: true}},
		{"touch k 10\r\n", Command{Op: OpTouch, Keys: []string{"k"}, Exptime: 10}},
		{"version\r\n", Command{Op: OpVersion}},
		{"version foo\r\n", Command{Op: OpVersion}},
		{"stats\r\n", Command{Op: OpStats}},
		{"stats items\r\n", Command{Op: OpStats, Args: []string{"items"}}},
		{"flush_all\r\n", Command{Op: OpFlushAll}},
		{"flush_all 10 noreply\r\n", Command{Op: OpFlushAll, Exptime: 10, NoReply: true}},
		{"verbosity 1\r\n", Command{Op: OpVerbosity}},
		{"verbosity noreply\r\n", Command{Op: OpVerbosity, NoReply: true}},
		{"quit\r\n", Command{Op: OpQuit}},
		{"mg k v  c\r\n", Command{Op: OpMetaGet, Keys: []string{"k"}, Line: []byte("mg k v c")}},
		{"ms k 3 T0\r\n", Command{Op: OpMetaSet, Keys: []string{"k"}, Bytes: 3, Line: []byte("ms k 3 T0")}},
		{"md k q\r\n", Command{Op: OpMetaDelete, Keys: []string{"k"}, Line: []byte("md k q")}},
		{"ma k D2\r\n", Command{Op: OpMetaArith, Keys: []string{"k"}, Line: []byte("ma k D2")}},
		{"me k\r\n", Command{Op: OpMetaDebug, Keys: []string{"k"}, Line: []byte("me k")}},
		{"mn\r\n", Command{Op: OpMetaNoop}},
		{"get \x10\x10k\tx\r\n", Command{Op: OpGet, Keys: []string{"\x10\x10k\tx"}}},
		{"get " + strings.Repeat("k", 250) + "\r\n", Command{Op: OpGet, Keys: []string{strings.Repeat("k", 250)}}},
	}
	for _, tt := range tests {
		t.Run(tt.line, func(t *testing.T) {
			got, err := ParseCommand([]byte(tt.line), maxValue)
			if err != nil {
				t.Fatalf("ParseCommand(%q): got error %v; want %+v", tt.line, err, tt.want)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("ParseCommand(%q): got %+v; want %+v", tt.line, got, tt.want)
			}
		})
	}
}

func TestParseCommandErrors(t *testing.T) {
	const maxValue = 100
	tests := []struct {
		line    string
		err     error
		reply   string
		swallow int
		close   bool
	}{
		{"", ErrUnknownCommand, "ERROR", 0, false},
		{"\r\n", ErrUnknownCommand, "ERROR", 0, false},
		{"bogus\r\n", ErrUnknownCommand, "ERROR", 0, false},
		{"GET k\r\n", ErrUnknownCommand, "ERROR", 0, false},
		{"\x80\x00\x00\x00", ErrBinaryProtocol, replyBinary, 0, true},
		{"get\r\n", ErrUnknownCommand, "ERROR", 0, false},
		{"get " + strings.Repeat("k", 251) + "\r\n", ErrBadKey, replyBadFormat, 0, false},
		{"get a\x00b\r\n", ErrBadKey, replyBadFormat, 0, false},
		{"get a\rb\r\n", ErrBadKey, replyBadFormat, 0, false},
		{"gat x k\r\n", ErrBadCommand, replyBadExptime, 0, false},
		{"gat 10\r\n", ErrUnknownCommand, "ERROR", 0, false},
		{"set k 0 0\r\n", ErrUnknownCommand, "ERROR", 0, false},
		{"set k 0 0 1 2 3\r\n", ErrUnknownCommand, "ERROR", 0, false},
		{"set k 0 0 -1\r\n", ErrBadCommand, replyBadFormat, 0, false},
		{"set k 0 0 x\r\n", ErrBadCommand, replyBadFormat, 0, false},
		{"set k 0 0 99999999999\r\n", ErrBadCommand, replyBadFormat, 0, false},
		{"set k x 0 5\r\n", ErrBadCommand, replyBadFormat, 7, false},
		{"set k -1 0 5\r\n", ErrBadCommand, replyBadFormat, 7, false},
		{"set k 4294967296 0 5\r\n", ErrBadCommand, replyBadFormat, 7, false},
		{"set k 0 x 5\r\n", ErrBadCommand, replyBadFormat, 7, false},
		{"set " + strings.Repeat("k", 251) + " 0 0 5\r\n", ErrBadKey, replyBadFormat, 7, false},
		{"set k 0 0 101\r\n", ErrValueTooLarge, replyTooLarge, 103, false},
		{"set k 0 0 2000000000\r\n", ErrValueTooLarge, replyTooLarge, 0, true},
		{"cas k 0 0 1\r\n", ErrUnknownCommand, "ERROR", 0, false},
		{"cas k 0 0 1 -5\r\n", ErrBadCommand, replyBadFormat, 3, false},
		{"delete\r\n", ErrBadCommand, replyBadDelete, 0, false},
		{"delete k 5\r\n", ErrBadCommand, replyBadDelete, 0, false},
		{"incr k\r\n", ErrUnknownCommand, "ERROR", 0, false},
		{"incr k -1\r\n", ErrBadCommand, replyBadDelta, 0, false},
		{"incr k 18446744073709551616\r\n", ErrBadCommand, replyBadDelta, 0, false},
		{"touch k x\r\n", ErrBadCommand, replyBadExptime, 0, false},
		{"flush_all x\r\n", ErrBadCommand, replyBadExptime, 0, false},
		{"flush_all 1 2\r\n", ErrUnknownCommand, "ERROR", 0, false},
		{"verbosity\r\n", ErrUnknownCommand, "ERROR", 0, false},
		{"verbosity 1 2 3\r\n", ErrUnknownCommand, "ERROR", 0, false},
		{"mg\r\n", ErrBadCommand, replyBadFormat, 0, false},
		{"mn x\r\n", ErrBadCommand, replyBadFormat, 0, false},
		{"ms k\r\n", ErrBadCommand, replyBadFormat, 0, false},
		{"ms k x\r\n", ErrBadCommand, replyBadChunk, 0, false},
		{"ms k 101\r\n", ErrValueTooLarge, replyTooLarge, 103, false},
		{"mg k v\x01\r\n", ErrBadCommand, replyBadFormat, 0, false},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%q", tt.line), func(t *testing.T) {
			_, err := ParseCommand([]byte(tt.line), maxValue)
			var pe *ProtocolError
			if !errors.As(err, &pe) {
				t.Fatalf("got error %v; want a *ProtocolError", err)
			}
			if !errors.Is(err, tt.err) {
				t.Errorf("got error %v; want %v", err, tt.err)
			}
			if pe.Reply != tt.reply || pe.Swallow != tt.swallow || pe.Close != tt.close {
				t.Errorf("got reply %q, swallow %d, close %v; want %q, %d, %v",
					pe.Reply, pe.Swallow, pe.Close, tt.reply, tt.swallow, tt.close)
			}
		})
	}
}

// FuzzParseCommand checks that the parser never panics and that what it
// accepts or refuses is self-consistent. The corpus is in
// testdata/fuzz/FuzzParseCommand.
func FuzzParseCommand(f *testing.F) {
	for _, s := range []string{
		"get a b c\r\n", "gets a\r\n", "gat 10 a\r\n", "set k 0 0 5\r\n", "cas k 0 0 1 5 noreply\r\n",
		"delete k 0 noreply\r\n", "incr k 1\r\n", "touch k -1\r\n", "flush_all 0\r\n", "verbosity 1 noreply\r\n",
		"mg k v c N2\r\n", "ms k 2 C5 T0\r\n", "md k I T10\r\n", "mn\r\n", "\x80\x01", "set k 0 0 -1\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		cmd, err := ParseCommand(line, 1<<20)
		if err != nil {
			var pe *ProtocolError
			if !errors.As(err, &pe) {
				t.Fatalf("got error %T %v; want *ProtocolError", err, err)
			}
			if pe.Reply == "" || strings.ContainsAny(pe.Reply, "\r\n") {
				t.Fatalf("bad reply %q", pe.Reply)
			}
			if pe.Swallow < 0 || pe.Swallow > maxSwallow {
				t.Fatalf("swallow %d out of range", pe.Swallow)
			}
			return
		}
		if cmd.Op == 0 {
			t.Fatal("accepted a line with no command")
		}
		for _, k := range cmd.Keys {
			if !validKey([]byte(k)) {
				t.Fatalf("accepted invalid key %q", k)
			}
		}
		if cmd.Op.IsRetrieval() && len(cmd.Keys) == 0 {
			t.Fatal("retrieval without keys")
		}
		if cmd.Bytes < 0 || cmd.Bytes > 1<<20 {
			t.Fatalf("data length %d out of range", cmd.Bytes)
		}
		if cmd.Op.IsMeta() && cmd.Op != OpMetaNoop {
			// The forwarded line reparses to the same command.
			again, err := ParseCommand(cmd.Line, 1<<20)
			if err != nil || !reflect.DeepEqual(again, cmd) {
				t.Fatalf("meta line %q reparses to %+v, %v; want %+v", cmd.Line, again, err, cmd)
			}
		}
	})
}
