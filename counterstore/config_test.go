package counterstore

import "testing"

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		c  Config
		ok bool
	}{
		{Config{DSN: "postgres://a@b/c"}, true},
		{Config{}, false},
		{Config{DSN: "postgres://a@b/c", Table: "x; drop"}, false},
		{Config{DSN: "postgres://a@b/c", Table: "app.counters"}, true},
		{Config{DSN: "postgres://a@b/c", Table: "t", CheckpointTable: "t"}, false},
	} {
		if err := tc.c.Validate(); (err == nil) != tc.ok {
			t.Errorf("%+v: got %v; want ok=%v", tc.c, err, tc.ok)
		}
	}
}
