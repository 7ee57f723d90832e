package purge_test

import (
	"errors"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/mcpool"
	"github.com/pgcache/pgcache/purge"
)

// TestRoleAckWait: the consumer's ack wait is how long a killed purge
// process's messages wait for another process of the DC. One not above
// the purger's progress interval would have every slow batch redelivered
// while it is still being applied: a config error.
func TestRoleAckWait(t *testing.T) {
	for _, tc := range []struct {
		name    string
		ackWait time.Duration
		ok      bool
	}{
		{"default", 0, true},
		{"above progress", 11 * time.Second, true},
		{"equal to progress", 10 * time.Second, false},
		{"below progress", 5 * time.Second, false},
		{"negative", -time.Second, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := purge.RoleConfig{Purger: purge.DefaultConfig(), Pool: mcpool.DefaultConfig(), Stream: "S", AckWait: tc.ackWait}
			cfg.Purger.DC = "dc1"
			cfg.Pool.Servers = []string{"127.0.0.1:1"}
			r, err := purge.NewRole(cfg, nil, nil, zaptest.NewLogger(t))
			if r != nil {
				r.Close()
			}
			if tc.ok && err != nil {
				t.Fatalf("got error %v; want none", err)
			}
			if !tc.ok && !errors.Is(err, purge.ErrConfig) {
				t.Fatalf("got error %v; want ErrConfig", err)
			}
		})
	}
}
