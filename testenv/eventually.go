package testenv

import (
	"testing"
	"time"
)

// Eventually polls cond every 10ms until it holds, and fails the test
// with what was awaited if it does not within d. It is the one wait of
// the tests, the benchmarks and the chaos runs.
func Eventually(tb testing.TB, d time.Duration, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("waited %s for %s; it did not happen", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
