package bus

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"
)

// decodeCases are messages whose decoding decodeInPlace must share with
// Decode: the same batch, or an error both times.
var decodeCases = []string{
	`{"v":1,"origin":"dc1","commit_lsn":10,"end_lsn":20,"commit_time":"2026-11-21T01:02:03.456789Z","txs":2,"final":true,"keys":["post:42","user_posts:7"]}`,
	`{"v":1,"commit_lsn":10,"keys":[]}`,
	`{"v":1,"commit_lsn":10,"keys":null}`,
	`{"v":1,"commit_lsn":10}`,
	`{"v":1,"commit_lsn":10,"keys":[ "a" , "b",""  ,"c" ] , "txs":1}`,
	`{"v":1,"commit_lsn":10,"keys":["q\"uote","back\\slash","tab\tx","nl\nx","\u00e9t\u00e9","été","\u2028","bad\xffutf8","a]b","a,b"]}`,
	`{"v":1,"commit_lsn":10,"keys":["x"],"keys":["y","z"]}`,
	`{"v":1,"commit_lsn":10,"flush":true,"timeline":3}`,
	`{"v":1,"commit_lsn":10,"keys":[1,2]}`,
	`{"v":1,"commit_lsn":10,"keys":["a",null, null,"b"]}`,
	`{"v":1,"commit_lsn":10,"keys":{}}`,
	"{\"v\":1,\"commit_lsn\":10,\"keys\":[\"bad\xffutf8\",\"ctl\x01\"]}",
	`{"v":1,"commit_lsn":10,"keys":"k"}`,
	`{"v":1,"commit_lsn":10,"keys":["unterminated]}`,
	`{"v":2,"commit_lsn":10,"keys":["a"]}`,
	`{"v":1,"keys":["a"]}`,
	`{"v":1,"commit_lsn":10,"keys":["a"]`,
	`not json`,
	``,
}

func sameDecoding(t *testing.T, msg string) {
	t.Helper()
	want, werr := Decode([]byte(msg))
	got, gerr := decodeInPlace([]byte(msg))
	if (werr != nil) != (gerr != nil) {
		t.Fatalf("decodeInPlace(%q) error %v; Decode's %v", msg, gerr, werr)
	}
	if werr != nil {
		if !errors.Is(gerr, ErrBadMessage) {
			t.Fatalf("decodeInPlace(%q) = %v; want ErrBadMessage", msg, gerr)
		}
		return
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("decodeInPlace(%q) = %+v; Decode gives %+v", msg, got, want)
	}
}

func TestDecodeInPlaceMatchesDecode(t *testing.T) {
	for i, msg := range decodeCases {
		t.Run(fmt.Sprint(i), func(t *testing.T) { sameDecoding(t, msg) })
	}
	// And what Encode writes.
	b := &Batch{Origin: "dc1", CommitLSN: 5, EndLSN: 9, CommitTime: time.Unix(1, 0).UTC(), Txs: 1, Final: true,
		Keys: []string{"a", "b\"c", "d\\e", "<&>", "\u2029", "f\x01g", ""}}
	data, err := b.Encode()
	if err != nil {
		t.Fatal(err)
	}
	sameDecoding(t, string(data))
}

func FuzzDecodeInPlace(f *testing.F) {
	for _, msg := range decodeCases {
		f.Add(msg)
	}
	f.Fuzz(func(t *testing.T, msg string) { sameDecoding(t, msg) })
}

// TestDecodeInPlaceAllocs: a batch's keys cost no allocation each. The
// purger holds every batch it works on; with Decode (encoding/json) a
// 1,000-key batch made over 1,000 allocations.
func TestDecodeInPlaceAllocs(t *testing.T) {
	keys := make([]string, 1000)
	for i := range keys {
		keys[i] = fmt.Sprintf("item:%d", 1000000+i)
	}
	data, err := (&Batch{Origin: "dc1", CommitLSN: 5, Keys: keys}).Encode()
	if err != nil {
		t.Fatal(err)
	}
	allocs := testing.AllocsPerRun(20, func() {
		if _, err := decodeInPlace(data); err != nil {
			t.Fatal(err)
		}
	})
	if allocs > 50 {
		t.Errorf("decoding a 1,000-key batch made %.0f allocations; want at most 50", allocs)
	}
	old := testing.AllocsPerRun(5, func() { _, _ = Decode(data) })
	t.Logf("allocations per 1,000-key batch: %.0f in place, %.0f with Decode", allocs, old)
	if got, _ := decodeInPlace(data); strings.Join(got.Keys, " ") != strings.Join(keys, " ") {
		t.Errorf("keys differ after decoding")
	}
}

// BenchmarkDecode: a 1,000-key batch (keys like "item:1000000"), as the
// consumer decoded it before (Decode) and now (decodeInPlace).
func BenchmarkDecode(b *testing.B) {
	keys := make([]string, 1000)
	for i := range keys {
		keys[i] = fmt.Sprintf("item:%d", 1000000+i)
	}
	data, err := (&Batch{Origin: "dc1", CommitLSN: 5, Keys: keys}).Encode()
	if err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name string
		fn   func([]byte) (*Batch, error)
	}{{"Decode", Decode}, {"InPlace", decodeInPlace}} {
		b.Run(c.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(data)))
			for i := 0; i < b.N; i++ {
				if _, err := c.fn(data); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
