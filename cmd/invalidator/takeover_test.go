package main

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

// TestHotStandbyTakeover runs the tail role in both DCs: dc1 holds the
// slot and dc2 waits. Under a load of single-row transactions dc1 is
// killed with SIGKILL; dc2 must take the slot over, and once dc1 is back
// (as systemd would restart it) every key of every transaction is purged
// in both DCs: the full list.
func TestHotStandbyTakeover(t *testing.T) {
	w := newWorld(t)
	// dc2 becomes a tail-capable standby.
	w.inv["dc2"].kill()
	w.inv["dc2"] = startInvalidator(t, "invalidator-dc2", w.config("dc2", true))

	const n = 4000
	var keys []string
	for i := 1; i <= n; i++ {
		keys = append(keys, fmt.Sprintf("item:%d", i))
	}
	w.exec("INSERT INTO items SELECT g FROM generate_series(1, $1::int) g", n)
	// active_pid is the walsender serving the holder; dc1 started first
	// and proved itself by purging the readiness probe.
	holder := w.slotHolder(0)
	w.set("dc1", keys...)
	w.set("dc2", keys...)

	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for wr := 0; wr < 2; wr++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := wr + 1; i <= n; i += 2 {
				if err := w.env.Primary.Exec(w.ctx, "UPDATE items SET v = v + 1 WHERE id = $1", i); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	time.Sleep(time.Second)
	killed := time.Now()
	w.inv["dc1"].kill()
	// dc1 is dead: a new walsender on the slot serves dc2.
	next := w.slotHolder(holder)
	t.Logf("dc2's standby took the slot %v after dc1 was killed", time.Since(killed).Round(time.Millisecond))
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	// dc2 tails and purges dc2 at once; dc1's purge waits for its restart.
	w.waitGoneIn(2*time.Minute, []string{"dc2"}, keys...)
	w.inv["dc1"].start()
	w.waitGone(2*time.Minute, keys...)
	if got := w.slotHolder(0); got != next {
		t.Fatalf("after dc1's restart the slot is served by walsender %d; want %d, dc2's (dc1 waits as the standby now)", got, next)
	}
}

// slotHolder waits until the slot is active with a walsender other than
// not and returns that walsender's pid.
func (w *world) slotHolder(not int) int {
	w.t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		var pid int
		err := w.env.Primary.QueryRow(w.ctx, "SELECT coalesce(active_pid, 0) FROM pg_replication_slots WHERE slot_name = 'cache_invalidator'", &pid)
		if err == nil && pid != 0 && pid != not {
			return pid
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("no process took the slot within 90s (last active pid %d, err %v)", pid, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
