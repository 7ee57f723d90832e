#!/usr/bin/python3
"""pytest's JUnit XML to make compat's results lines.

Usage: junit2tsv.py SUITE TARGET JUNIT.xml >> RESULTS.tsv
"""

import sys
import xml.etree.ElementTree as ET


def main():
    suite, target, path = sys.argv[1:4]
    n = 0
    for tc in ET.parse(path).iter("testcase"):
        name = tc.get("name")
        verdict, detail = "PASS", ""
        for tag, v in (("failure", "FAIL"), ("error", "ERROR"), ("skipped", "SKIP")):
            el = tc.find(tag)
            if el is not None:
                verdict = v
                # The message's first line names the assertion or error.
                detail = (el.get("message") or el.text or "").strip().splitlines()[0:1]
                detail = detail[0] if detail else ""
                break
        print("%s\t%s\t%s\t%s\t%s" % (suite, name, target, verdict, detail.replace("\t", " ")[:300]))
        n += 1
    if n == 0:
        sys.exit("%s: no test cases in %s" % (suite, path))


if __name__ == "__main__":
    main()
