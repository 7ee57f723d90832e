package purge_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/pgcache/pgcache/purge"
	"github.com/pgcache/pgcache/testenv"
)

// TestGateTimeline: a batch published after a promotion carries the new
// timeline, and the gate passes it only once the replica follows that
// timeline: before the failover a replica on timeline 1 keeps it waiting
// (ErrTimelineTimeout after MaxWait); after it, the repointed replica and
// the promoted one both pass.
func TestGateTimeline(t *testing.T) {
	env := testenv.New(t, testenv.Options{MemcachedPerDC: -1, NoNATS: true})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	gates := map[string]*purge.Gate{}
	for _, dc := range env.DCs {
		g, err := purge.NewGate(purge.GateConfig{DSN: dc.Replica.DSN(""), MaxWait: 500 * time.Millisecond}, zaptest.NewLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		gates[dc.Name] = g
	}
	if err := gates["dc2"].WaitTimeline(ctx, 1); err != nil {
		t.Fatalf("timeline 1 before the failover: %v; want nil", err)
	}
	if err := gates["dc2"].WaitTimeline(ctx, 2); !errors.Is(err, purge.ErrTimelineTimeout) {
		t.Fatalf("timeline 2 before the failover: got %v; want ErrTimelineTimeout", err)
	}
	fo, err := env.Failover(ctx, testenv.FailoverOptions{Target: env.DCs[0].Replica})
	if err != nil {
		t.Fatal(err)
	}
	// dc2's gate gives up at once for MaxWait after its timeout (the
	// batches behind a timeout do not each wait it in turn), then passes.
	for _, dc := range []string{"dc1", "dc2"} {
		testenv.Eventually(t, 30*time.Second, dc+" on the new timeline", func() bool {
			return gates[dc].WaitTimeline(ctx, fo.Timeline) == nil
		})
	}
}
