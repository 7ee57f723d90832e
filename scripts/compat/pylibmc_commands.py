#!/usr/bin/python3
"""Every memcached text command through pylibmc (Debian's python3-pylibmc,
over libmemcached), against memcached direct and leaseproxy in one run.

Usage: pylibmc_commands.py OUT.tsv name=host:port [name=host:port ...]

Each case runs against every target in turn, on keys of its own (a fresh
prefix per target and run), and is checked against what memcached 1.6's
protocol.txt says the command answers. The commands pylibmc does not
expose (version, verbosity, gat, gats, quit, noreply, error lines, meta
commands) are
sent on a raw socket. Writes one line per case and target to OUT.tsv:
suite, case, target, PASS or FAIL, and what the case got (normalised so
that direct and proxy can be compared: no CAS numbers, no pids).
"""

import socket
import sys
import time
import uuid

import pylibmc


class Skip(Exception):
    pass


def raw(addr, payload, until=(b"\r\n",), timeout=3.0):
    """Sends payload on a fresh connection and reads until the reply ends
    with one of until (or the peer closes); returns the bytes read."""
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=timeout)
    try:
        s.sendall(payload)
        buf = b""
        while not any(buf.endswith(u) for u in until):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        return buf
    finally:
        s.close()


def outcome(fn):
    """Runs fn and returns what it returned, or the exception's class name
    (pylibmc raises NotFound, ClientError... for memcached's error lines)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - the class is the result
        return "raises " + type(e).__name__


def cases(c, addr, p):
    """Yields (name, thunk, expected). expected is a value, or a function
    of the result that says whether it is right. p is the key prefix."""
    k = lambda s: p + s  # noqa: E731

    def setget():
        c.set(k("a"), b"v1")
        return c.get(k("a"))

    yield "set", lambda: c.set(k("s"), b"value"), True
    yield "get hit", setget, b"v1"
    yield "get miss", lambda: c.get(k("nope")), None
    yield "add new", lambda: c.add(k("add"), b"x"), True
    yield "add existing", lambda: (c.set(k("add2"), b"x"), c.add(k("add2"), b"y"), c.get(k("add2")))[1:], (False, b"x")
    yield "replace missing", lambda: (c.replace(k("rep"), b"x"), c.get(k("rep"))), (False, None)
    yield "replace existing", lambda: (c.set(k("rep2"), b"x"), c.replace(k("rep2"), b"y"), c.get(k("rep2")))[1:], (True, b"y")
    yield "append missing", lambda: c.append(k("app"), b"x"), False
    yield "append existing", lambda: (c.set(k("app2"), b"ab"), c.append(k("app2"), b"cd"), c.get(k("app2")))[1:], (True, b"abcd")
    yield "prepend missing", lambda: c.prepend(k("pre"), b"x"), False
    yield "prepend existing", lambda: (c.set(k("pre2"), b"ab"), c.prepend(k("pre2"), b"cd"), c.get(k("pre2")))[1:], (True, b"cdab")

    def gets():
        c.set(k("g"), b"gv")
        v, cas = c.gets(k("g"))
        return v, isinstance(cas, int) and cas > 0

    yield "gets hit", gets, (b"gv", True)
    yield "gets miss", lambda: c.gets(k("gnope")), (None, None)

    def cas_ok():
        c.set(k("c"), b"1")
        _, cas = c.gets(k("c"))
        return c.cas(k("c"), b"2", cas), c.get(k("c"))

    def cas_stale():
        c.set(k("c2"), b"1")
        _, cas = c.gets(k("c2"))
        c.set(k("c2"), b"other")
        return c.cas(k("c2"), b"2", cas), c.get(k("c2"))

    def cas_missing():
        c.set(k("c3"), b"1")
        _, cas = c.gets(k("c3"))
        c.delete(k("c3"))
        return outcome(lambda: c.cas(k("c3"), b"2", cas)), c.get(k("c3"))

    yield "cas matching", cas_ok, (True, b"2")
    yield "cas stale (EXISTS)", cas_stale, (False, b"other")
    # pylibmc raises NotFound for memcached's NOT_FOUND.
    yield "cas missing (NOT_FOUND)", cas_missing, ("raises NotFound", None)
    yield "incr", lambda: (c.set(k("n"), b"41"), c.incr(k("n")), c.incr(k("n"), 8), c.get(k("n")))[1:], (42, 50, b"50")
    yield "incr missing", lambda: outcome(lambda: c.incr(k("nn"))), "raises NotFound"
    yield "incr non-numeric", lambda: (c.set(k("nx"), b"abc"), outcome(lambda: c.incr(k("nx"))))[1], lambda r: isinstance(r, str) and r.startswith("raises ")
    yield "incr wraps at 2^64", lambda: (c.set(k("nw"), b"18446744073709551615"), c.incr(k("nw")))[1], 0
    # memcached may space-pad a number that decr shortened (protocol.txt).
    yield "decr", lambda: (c.set(k("d"), b"10"), c.decr(k("d"), 3), c.get(k("d")))[1:], lambda r: r[0] == 7 and r[1].rstrip(b" ") == b"7"
    yield "decr stops at 0", lambda: (c.set(k("d0"), b"2"), c.decr(k("d0"), 5))[1], 0
    yield "decr missing", lambda: outcome(lambda: c.decr(k("dn"))), "raises NotFound"
    yield "incr_multi", lambda: (c.set_multi({k("m1"): b"1", k("m2"): b"5"}), c.incr_multi([k("m1"), k("m2")], delta=2), c.get_multi([k("m1"), k("m2")]))[2], {k("m1"): b"3", k("m2"): b"7"}
    yield "touch existing", lambda: (c.set(k("t"), b"x"), c.touch(k("t"), 100), c.get(k("t")))[1:], (True, b"x")
    yield "touch missing", lambda: c.touch(k("tn"), 100), False
    yield "delete existing", lambda: (c.set(k("del"), b"x"), c.delete(k("del")), c.get(k("del")))[1:], (True, None)
    yield "delete missing", lambda: c.delete(k("deln")), False
    yield "get_multi", lambda: (c.set(k("gm1"), b"1"), c.set(k("gm2"), b"2"), c.get_multi([k("gm1"), k("gmx"), k("gm2")]))[2], {k("gm1"): b"1", k("gm2"): b"2"}
    yield "set_multi", lambda: (c.set_multi({k("sm1"): b"1", k("sm2"): b"2"}), c.get_multi([k("sm1"), k("sm2")])), ([], {k("sm1"): b"1", k("sm2"): b"2"})
    yield "add_multi", lambda: (c.set(k("am1"), b"old"), c.add_multi({k("am1"): b"1", k("am2"): b"2"}), c.get_multi([k("am1"), k("am2")]))[1:], ([k("am1")], {k("am1"): b"old", k("am2"): b"2"})
    yield "delete_multi", lambda: (c.set_multi({k("dm1"): b"1", k("dm2"): b"2"}), c.delete_multi([k("dm1"), k("dm2")]), c.get_multi([k("dm1"), k("dm2")]))[1:], (True, {})
    yield "flags: int, str, pickled", lambda: (c.set(k("fi"), 12345), c.set(k("fs"), "olé"), c.set(k("fp"), {"a": [1, 2]}), c.get(k("fi")), c.get(k("fs")), c.get(k("fp")))[3:], (12345, "olé", {"a": [1, 2]})
    big = bytes(range(256)) * 2000  # 512,000 bytes, every byte value, \r\n inside
    yield "512 KB binary value", lambda: (c.set(k("big"), big), c.get(k("big")) == big), (True, True)
    yield "value over 1 MB refused", lambda: outcome(lambda: c.set(k("huge"), b"x" * (1024 * 1024 + 1))), lambda r: r is False or (isinstance(r, str) and r.startswith("raises "))
    yield "key of 250 bytes", lambda: (c.set(p[:8] + "k" * 242, b"x"), c.get(p[:8] + "k" * 242)), (True, b"x")

    def expiry():
        c.set(k("exp"), b"x", time=1)
        before = c.get(k("exp"))
        time.sleep(2.2)
        return before, c.get(k("exp"))

    yield "set with exptime 1s expires", expiry, (b"x", None)

    def stats():
        st = c.get_stats()
        return len(st) == 1 and "pid" in st[0][1] and "curr_connections" in st[0][1]

    yield "stats", stats, True
    yield "version (raw)", lambda: raw(addr, b"version\r\n").startswith(b"VERSION 1.") and raw(addr, b"version\r\n").endswith(b"\r\n"), True
    yield "verbosity (raw)", lambda: raw(addr, b"verbosity 1\r\n"), b"OK\r\n"
    yield "gat (raw)", lambda: (c.set(k("gat"), b"gv"), raw(addr, b"gat 100 " + k("gat").encode() + b"\r\n", until=(b"END\r\n",)))[1], b"VALUE " + k("gat").encode() + b" 0 2\r\ngv\r\nEND\r\n"
    yield "gats (raw)", lambda: (c.set(k("gats"), b"gv"), raw(addr, b"gats 100 " + k("gats").encode() + b"\r\n", until=(b"END\r\n",)).split(b" ")[:4])[1], lambda r: r[:3] == [b"VALUE", k("gats").encode(), b"0"] and r[3].startswith(b"2")
    yield "noreply set then get (raw)", lambda: raw(addr, b"set " + k("nr").encode() + b" 5 0 2 noreply\r\nhi\r\nget " + k("nr").encode() + b"\r\n", until=(b"END\r\n",)), b"VALUE " + k("nr").encode() + b" 5 2\r\nhi\r\nEND\r\n"
    yield "noreply delete, incr then get (raw)", lambda: raw(addr, b"set " + k("nd").encode() + b" 0 0 1\r\n1\r\nincr " + k("nd").encode() + b" 4 noreply\r\nget " + k("nd").encode() + b"\r\ndelete " + k("nd").encode() + b" noreply\r\nget " + k("nd").encode() + b"\r\n", until=(b"END\r\nEND\r\n",)), b"STORED\r\nVALUE " + k("nd").encode() + b" 0 1\r\n5\r\nEND\r\nEND\r\n"
    # Meta commands are passed through to the key's server (mn to one).
    yield "meta ms, mg, ma, md, mn (raw)", lambda: raw(addr, b"ms " + k("mt").encode() + b" 1\r\n5\r\nmg " + k("mt").encode() + b" v\r\nma " + k("mt").encode() + b" D3 v\r\nmd " + k("mt").encode() + b"\r\nmg " + k("mt").encode() + b" v\r\nmn\r\n", until=(b"MN\r\n",)), b"HD\r\nVA 1\r\n5\r\nVA 1\r\n8\r\nHD\r\nEN\r\nMN\r\n"
    yield "unknown command (raw)", lambda: raw(addr, b"bogus\r\n"), b"ERROR\r\n"
    yield "key too long (raw)", lambda: raw(addr, b"get " + b"k" * 251 + b"\r\n").startswith(b"CLIENT_ERROR"), True
    yield "bad data chunk (raw)", lambda: raw(addr, b"set " + k("bd").encode() + b" 0 0 2\r\nabcd\r\n").startswith(b"CLIENT_ERROR bad data chunk"), True
    yield "quit (raw)", lambda: raw(addr, b"quit\r\n"), b""

    def flush():
        c.set(k("fl"), b"x")
        r = c.flush_all()
        return r, c.get(k("fl"))

    # flush_all last: it empties the servers under the other cases.
    yield "flush_all", flush, (True, None)
    # A set right after flush_all of a key that missed just before (issue
    # 14, 2): memcached stores it.
    yield "get miss, flush_all, set, get", lambda: (c.get(k("ff")), c.flush_all(), c.set(k("ff"), b"1"), c.get(k("ff"))), (None, True, True, b"1")


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    out = open(sys.argv[1], "w")
    run = uuid.uuid4().hex[:8]
    for spec in sys.argv[2:]:
        name, addr = spec.split("=", 1)
        c = pylibmc.Client([addr], binary=False, behaviors={"cas": True, "tcp_nodelay": True})
        p = "compat:%s:%s:" % (run, name)
        for case, thunk, expected in cases(c, addr, p):
            got = outcome(thunk)
            ok = expected(got) if callable(expected) else got == expected
            # The key prefix differs per target: strip it so that the
            # results of the targets compare.
            shown = repr(got).replace(p, "<p>")
            out.write("pylibmc\t%s\t%s\t%s\t%s\n" % (case, name, "PASS" if ok else "FAIL", shown.replace("\t", " ")[:300]))
        c.disconnect_all()
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
