package mcpool

import (
	"bufio"
	"errors"
	"slices"
	"strings"
	"testing"
)

// TestDeleteChainAnswers: DeleteMulti sends a server's keys as one chain
// of quiet deletes with their index as opaque and one mn; an answer maps
// to its key by that opaque, and an answer naming no key fails them all.
func TestDeleteChainAnswers(t *testing.T) {
	for _, tc := range []struct {
		name   string
		answer string
		want   []bool // key i failed
	}{
		{"all applied", "MN\r\n", []bool{false, false, false}},
		{"absent is applied", "NF O1\r\nMN\r\n", []bool{false, false, false}},
		{"one refused", "EX O2\r\nMN\r\n", []bool{false, false, true}},
		{"error line", "SERVER_ERROR out of memory\r\nMN\r\n", []bool{true, true, true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			addr, conns := fakeServer(t)
			pool := newTestPool(t, []string{addr}, func(c *Config) { c.ConnsPerServer = 1 })
			srv := <-conns
			t.Cleanup(func() { srv.Close() })
			done := make(chan []error, 1)
			go func() { done <- pool.DeleteMulti(testCtx(t), []string{"a", "b", "c\tx"}) }()
			br := bufio.NewReader(srv)
			wantLines := []string{"md a q O0", "md b q O1", "md Ywl4 b q O2", "mn"}
			for _, want := range wantLines {
				if got := readLineT(t, br); got != want {
					t.Fatalf("server read %q; want %q", got, want)
				}
			}
			if _, err := srv.Write([]byte(tc.answer)); err != nil {
				t.Fatal(err)
			}
			errs := <-done
			for i, err := range errs {
				if (err != nil) != tc.want[i] {
					t.Errorf("key %d: got error %v; want failed=%v", i, err, tc.want[i])
				}
			}
		})
	}
}

// TestDeleteChainBadKey: a key that cannot be sent fails alone, with
// ErrBadKey, and the others go in the chain.
func TestDeleteChainBadKey(t *testing.T) {
	r, bad := buildDeleteChain([]string{"ok", "has space", ""}, DeleteOptions{})
	defer r.release()
	if len(bad) != 2 || bad[0].idx != 1 || bad[1].idx != 2 || !errors.Is(bad[0].err, ErrBadKey) {
		t.Fatalf("bad = %+v; want keys 1 and 2 with ErrBadKey", bad)
	}
	if got, want := string(r.buf), "md ok q O0\r\nmn\r\n"; got != want {
		t.Errorf("chain %q; want %q", got, want)
	}
}

// TestChainKeepsOnlyFailures: the reader keeps a chain's failures only.
// A delete of an absent key answers NF even in quiet mode (memcached
// 1.6), and a transaction's keys are often not cached: keeping those
// answers cost memory per key (4 MB of a 1M-row transaction's purge).
// More answers than requests is a protocol error.
func TestChainKeepsOnlyFailures(t *testing.T) {
	for _, tc := range []struct {
		name   string
		answer string
		fails  []int // indexes kept, in order
		err    bool
	}{
		{"absent keys", "NF O0\r\nNF O1\r\nNF O2\r\nMN\r\n", nil, false},
		{"one refused among absent", "NF O0\r\nEX O1\r\nNF O2\r\nMN\r\n", []int{1}, false},
		{"error line", "SERVER_ERROR busy\r\nMN\r\n", []int{-1}, false},
		{"too many answers", "NF O0\r\nNF O0\r\nNF O0\r\nNF O0\r\nNF O0\r\nMN\r\n", nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &Conn{cfg: DefaultConnConfig(), br: bufio.NewReader(strings.NewReader(tc.answer))}
			r := &request{chain: 3}
			resp, err := readResponse(c.br, c.cfg.MaxValueSize)
			_, err = c.readChain(r, resp, err)
			if (err != nil) != tc.err {
				t.Fatalf("got error %v; want error=%v", err, tc.err)
			}
			if tc.err {
				return
			}
			var got []int
			for _, f := range r.fails {
				got = append(got, f.idx)
			}
			if !slices.Equal(got, tc.fails) {
				t.Errorf("got kept answers %v; want %v", got, tc.fails)
			}
		})
	}
}
