package chaos

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// Verdict is "PASS" or "FAIL".
func (r Result) Verdict() string {
	if r.Pass {
		return "PASS"
	}
	return "FAIL"
}

// ConvergeString is the convergence column.
func (r Result) ConvergeString() string {
	if r.ConvergeErr != nil {
		return "not converged"
	}
	return r.Converge.Round(10 * time.Millisecond).String()
}

// WriteTable writes the results as a Markdown table.
func WriteTable(out io.Writer, results []Result) {
	fmt.Fprintln(out, "| scenario | reads (hits/fills/refused) | writes | faults | stale keys after quiesce | lost invalidations | counter drift | checker | worst staleness window | converge after fault | time | verdict |")
	fmt.Fprintln(out, "|---|---|---|---|---|---|---|---|---|---|---|---|")
	for _, r := range results {
		s := r.Stats
		fmt.Fprintf(out, "| %s | %d (%d/%d/%d) | %d | %d | %s | %d | %s | %s | %s | %s | %s | **%s** |\n",
			r.Scenario, s.Reads, s.Hits, s.Fills, s.FillsRefused, s.Writes(), r.Faults, r.StaleVerdict(), r.Lost,
			r.DriftString(), r.Check.NinesString(), r.Check.WorstString(), r.ConvergeString(),
			r.Took.Round(time.Second), r.Verdict())
	}
}

// WriteDetails writes each scenario's fault, workload breakdown, notes
// and failure reasons.
func WriteDetails(out io.Writer, results []Result) {
	for _, r := range results {
		s := r.Stats
		fmt.Fprintf(out, "\n### %s: %s\n\n", r.Scenario, r.Verdict())
		fmt.Fprintf(out, "- fault: %s (%d injected)\n", r.Fault, r.Faults)
		if len(r.Events) > 0 {
			fmt.Fprintf(out, "- fault events: %s\n", strings.Join(r.Events, ", "))
		}
		for _, m := range r.Measures {
			fmt.Fprintf(out, "- measured: %s\n", m)
		}
		fmt.Fprintf(out, "- writes: %d updates, %d inserts, %d deletes, %d likes, %d unlikes; %d write errors (retried)\n",
			s.Updates, s.Inserts, s.Deletes, s.Likes, s.Unlikes, s.WriteErrors)
		fmt.Fprintf(out, "- reads: %d (%d hits, %d fills, %d fills refused by a lease, %d misses of deleted rows, %d slow fills dropped, %d errors)\n",
			s.Reads, s.Hits, s.Fills, s.FillsRefused, s.NoRow, s.SlowFills, s.ReadErrors)
		c := r.Check
		fmt.Fprintf(out, "- checker: %d batches, %d keys read; %s; stale by DC %v; worst %s; %d skipped, %d read errors\n",
			c.Batches, c.Keys, c.NinesString(), c.StaleByDC, c.WorstString(), c.Skipped, c.Errors)
		fmt.Fprintf(out, "- lost: %d never in the stream, %d written keys left stale", r.LostStream, r.LostApplied)
		if r.CoveredByFlush > 0 {
			fmt.Fprintf(out, " (and %d keys not in the stream but written before a flush of every pool announced on it)", r.CoveredByFlush)
		}
		if r.LostInFailover > 0 {
			fmt.Fprintf(out, " (and %d keys whose every write the failover lost: committed on the old primary past the switch, so no invalidation was owed)", r.LostInFailover)
		}
		if len(r.LostKeys) > 0 {
			fmt.Fprintf(out, " (e.g. %s)", strings.Join(r.LostKeys, " "))
		}
		fmt.Fprintln(out)
		if r.Exits > 0 {
			fmt.Fprintf(out, "- daemon exits not caused by a fault (restarted after 1 s, as systemd would): %d: %s\n", r.Exits, r.ExitNote)
		}
		for i, k := range r.Stale {
			if i == 10 {
				fmt.Fprintf(out, "- ... %d stale keys in all\n", len(r.Stale))
				break
			}
			fmt.Fprintf(out, "- stale: %s\n", k)
		}
		for _, why := range r.Reasons {
			fmt.Fprintf(out, "- FAIL: %s\n", why)
		}
	}
}

// WriteReport writes CHAOS.md: a header, the table and the details.
func WriteReport(path, header string, results []Result) error {
	var b strings.Builder
	b.WriteString(header)
	WriteTable(&b, results)
	b.WriteString("\n## Details\n")
	WriteDetails(&b, results)
	return os.WriteFile(path, []byte(b.String()), 0o644)
}

// AllPass reports whether every result passed.
func AllPass(results []Result) bool {
	for _, r := range results {
		if !r.Pass {
			return false
		}
	}
	return len(results) > 0
}
