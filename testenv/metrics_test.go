package testenv

import (
	"strings"
	"testing"
)

func TestParseMetrics(t *testing.T) {
	page := `# HELP x_total Things.
# TYPE x_total counter
x_total 3
y{dc="dc1",server="a"} 2
y{dc="dc1",server="b {x}"} 5.5
z 7 1700000000000
bad{unclosed 1
nan_value abc
`
	got, err := parseMetrics(strings.NewReader(page))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]float64{"x_total": 3, "y": 7.5, "z": 7}
	if len(got) != len(want) {
		t.Fatalf("got %v; want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("got %s = %v; want %v", k, got[k], v)
		}
	}
}
