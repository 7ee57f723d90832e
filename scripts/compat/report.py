#!/usr/bin/python3
"""make compat's verdict: reads the suites' results and the allow-list,
prints per suite how many cases passed against memcached direct and
against leaseproxy, and every difference; exits 1 if the proxy fails a
case that direct passes and the allow-list does not name it, or if a suite
produced no results against a target.

Usage: report.py RESULTS.tsv KNOWN_DIFFERENCES.txt REFERENCE PROXY

RESULTS.tsv: suite, case, target, PASS|FAIL|SKIP|ERROR, detail (tab
separated). KNOWN_DIFFERENCES.txt: "suite | case pattern | reason" per
line (fnmatch pattern; # comments); an entry without a reason is an
error.
"""

import fnmatch
import sys


def load_allow(path):
    allow = []
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split("|", 2)]
        if len(parts) != 3 or not all(parts):
            sys.exit("%s:%d: want \"suite | case pattern | reason\", got %r" % (path, n, line))
        allow.append(parts)
    return allow


def main():
    results, allow_path, ref, proxy = sys.argv[1:5]
    allow = load_allow(allow_path)
    used = set()
    # suite -> case -> target -> (outcome, detail); order of first sight.
    suites = {}
    for line in open(results, encoding="utf-8"):
        f = line.rstrip("\n").split("\t")
        if len(f) < 4:
            continue
        suite, case, target, verdict = f[:4]
        detail = f[4] if len(f) > 4 else ""
        suites.setdefault(suite, {}).setdefault(case, {})[target] = (verdict, detail)

    bad = []
    rows = []
    diffs = []
    for suite, cases in suites.items():
        n = len(cases)
        counts = {}
        for t in (ref, proxy):
            counts[t] = sum(1 for c in cases.values() if c.get(t, ("MISSING",))[0] == "PASS")
            if not any(t in c for c in cases.values()):
                bad.append("%s: no results against %s" % (suite, t))
        identical = sum(1 for c in cases.values() if ref in c and proxy in c and c[ref] == c[proxy])
        rows.append((suite, n, counts[ref], counts[proxy], identical))
        for case, by in cases.items():
            r = by.get(ref, ("MISSING", ""))
            p = by.get(proxy, ("MISSING", ""))
            if r == p:
                continue
            allowed = None
            for i, (s, pat, reason) in enumerate(allow):
                if s == suite and fnmatch.fnmatchcase(case, pat):
                    allowed = reason
                    used.add(i)
                    break
            regress = r[0] == "PASS" and p[0] != "PASS"
            if regress and allowed is None:
                tag = "UNEXPECTED"
                bad.append("%s: %s" % (suite, case))
            elif allowed is not None:
                tag = "allowed"
            elif r[0] != "PASS" and p[0] == "PASS":
                tag = "proxy passes, direct fails"
            elif r[0] != "PASS":
                tag = "both fail, differently"
            else:
                tag = "both pass, different result"
            diffs.append((suite, case, tag, r, p, allowed))

    w = max([len(r[0]) for r in rows] + [5])
    print("%-*s  %6s  %-14s  %-14s  %s" % (w, "suite", "cases", "direct passed", "proxy passed", "identical results"))
    for suite, n, rp, pp, ident in rows:
        print("%-*s  %6d  %-14s  %-14s  %d of %d" % (w, suite, n, "%d of %d" % (rp, n), "%d of %d" % (pp, n), ident, n))
    print()
    if diffs:
        print("differences (direct -> proxy):")
        for suite, case, tag, r, p, allowed in diffs:
            print("  [%s] %s: %s" % (tag, suite, case))
            print("      direct: %s %s" % (r[0], r[1][:400]))
            print("      proxy:  %s %s" % (p[0], p[1][:400]))
            if allowed:
                print("      known:  %s" % allowed)
    else:
        print("differences: none")
    for i, (s, pat, reason) in enumerate(allow):
        if i not in used:
            print("allow-list entry not needed in this run: %s | %s" % (s, pat))
    if bad:
        print()
        print("FAIL: the proxy fails what memcached direct passes, not in %s:" % allow_path)
        for b in bad:
            print("  " + b)
        return 1
    print()
    print("PASS: every case memcached direct passes passes through the proxy, or is a known difference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
