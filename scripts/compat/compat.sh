#!/usr/bin/env bash
# make compat: real memcached clients' own test suites against leaseproxy,
# with memcached direct as the reference in the same run (issue 14, 4):
#   pymemcache  the upstream integration tests of Debian's python3-pymemcache
#               (the package ships upstream's pymemcache/test of its own
#               version; dpkg's version is printed), with pytest;
#   gomemcache  TestLocalhost of the github.com/bradfitz/gomemcache version
#               in go.mod, from a copy of the module cache's package whose
#               address constant is pointed at the target;
#   pylibmc     scripts/compat/pylibmc_commands.py: every text command
#               through Debian's python3-pylibmc (libmemcached), and raw
#               lines for what pylibmc does not expose.
# The reference is one memcached; the proxy runs over two others (ketama,
# leases on with their defaults, flush_all: forward: the suites flush
# between tests). Prints per suite how many cases pass against each and
# every difference; fails if the proxy fails a case that memcached passes
# and scripts/compat/known-differences.txt does not list it with a reason.
# Environment: LEASEPROXY_BIN (a built leaseproxy to use instead of
# building ./cmd/leaseproxy), COMPAT_KEEP=1 (keep the work directory).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/scripts/compat"
PY=/usr/bin/python3 # Debian's, where the apt packages install
WORK=$(mktemp -d /tmp/compat.XXXXXX)
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	if [ "${COMPAT_KEEP:-}" = 1 ]; then echo "work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# What the suites need, from Debian (no PyPI).
missing=()
for p in memcached python3-pymemcache python3-pylibmc python3-pytest python3-six; do
	dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "installing ${missing[*]}" >&2
	apt-get install -y "${missing[@]}" >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y "${missing[@]}" >/dev/null; }
fi
MEMCACHED=$(command -v memcached || echo /usr/bin/memcached)

freeport() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
waitport() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.05; done; echo "port $1 not up" >&2; exit 1; }

if [ -n "${LEASEPROXY_BIN:-}" ]; then
	LEASEPROXY=$LEASEPROXY_BIN
else
	echo "building leaseproxy..." >&2
	(cd "$ROOT" && go build -o "$WORK/leaseproxy" ./cmd/leaseproxy)
	LEASEPROXY=$WORK/leaseproxy
fi

REF=$(freeport); M1=$(freeport); M2=$(freeport); LP=$(freeport); LPH=$(freeport)
for p in $REF $M1 $M2; do
	"$MEMCACHED" -u root -l 127.0.0.1 -p "$p" -U 0 -m 64 2>>"$WORK/memcached.log" & PIDS+=($!)
done
cat >"$WORK/leaseproxy.yaml" <<YML
listen: 127.0.0.1:$LP
servers: [127.0.0.1:$M1, 127.0.0.1:$M2]
flush_all: forward
http: {listen: 127.0.0.1:$LPH}
log: {level: warn}
YML
"$LEASEPROXY" -config "$WORK/leaseproxy.yaml" 2>"$WORK/leaseproxy.log" & PIDS+=($!)
for p in $REF $M1 $M2 $LP; do waitport "$p"; done
TARGETS=("direct=127.0.0.1:$REF" "proxy=127.0.0.1:$LP")
RESULTS=$WORK/results.tsv
: >"$RESULTS"

echo "== memcached $("$MEMCACHED" -V | awk '{print $2}') direct on :$REF; leaseproxy on :$LP over :$M1 and :$M2"

# pymemcache: the installed package's own tests, copied out so that pytest
# writes nothing under /usr. test_tls needs a TLS memcached: deselected.
PMV=$(dpkg-query -W -f '${Version}' python3-pymemcache)
PMDIR=$("$PY" -c 'import os, pymemcache; print(os.path.dirname(pymemcache.__file__))')
echo "== pymemcache $PMV ($PMDIR/test/test_integration.py, upstream's tests of that version)"
cp -r "$PMDIR/test" "$WORK/pymemcache_test"
for t in "${TARGETS[@]}"; do
	name=${t%%=*}; addr=${t#*=}
	(cd "$WORK" && PYTHONDONTWRITEBYTECODE=1 timeout 300 "$PY" -m pytest -p no:cacheprovider -q \
		-W ignore::pytest.PytestUnknownMarkWarning -k 'not test_tls' \
		--junitxml "$WORK/pymemcache-$name.xml" pymemcache_test/test_integration.py \
		--server "${addr%:*}" --port "${addr##*:}" >"$WORK/pymemcache-$name.log" 2>&1) || true
	tail -1 "$WORK/pymemcache-$name.log" | sed "s/^/   $name: /"
	"$PY" "$HERE/junit2tsv.py" pymemcache "$name" "$WORK/pymemcache-$name.xml" >>"$RESULTS"
done

# gomemcache: TestLocalhost dials the constant localhostTCPAddr
# ("localhost:11211"); the copy reads it from COMPAT_ADDR instead. The
# module cache is not touched.
GMDIR=$(cd "$ROOT" && go list -m -f '{{.Dir}}' github.com/bradfitz/gomemcache)
GMVER=$(cd "$ROOT" && go list -m -f '{{.Version}}' github.com/bradfitz/gomemcache)
echo "== gomemcache $GMVER TestLocalhost ($GMDIR/memcache/memcache_test.go)"
cp -r "$GMDIR" "$WORK/gomemcache"
chmod -R u+w "$WORK/gomemcache"
sed -i 's|^const localhostTCPAddr = "localhost:11211"$|var localhostTCPAddr = os.Getenv("COMPAT_ADDR")|' "$WORK/gomemcache/memcache/memcache_test.go"
grep -q 'os.Getenv("COMPAT_ADDR")' "$WORK/gomemcache/memcache/memcache_test.go" ||
	{ echo "gomemcache: could not point TestLocalhost at a port (localhostTCPAddr changed upstream?)" >&2; exit 1; }
for t in "${TARGETS[@]}"; do
	name=${t%%=*}; addr=${t#*=}
	rc=0
	(cd "$WORK/gomemcache" && COMPAT_ADDR=$addr GOWORK=off GOFLAGS=-mod=mod timeout 300 \
		go test -count=1 -v -run '^TestLocalhost$' ./memcache/ >"$WORK/gomemcache-$name.log" 2>&1) || rc=$?
	if grep -q -- '--- PASS: TestLocalhost' "$WORK/gomemcache-$name.log"; then
		verdict=PASS; detail=""
	else
		# A skip (no server) counts as a failure: the test must run.
		verdict=FAIL
		detail=$(grep -E 'memcache_test.go:[0-9]+:|SKIP|panic' "$WORK/gomemcache-$name.log" | sed 's/^ *//' | head -3 | tr '\n\t' '  ')
		[ -n "$detail" ] || detail="go test exit $rc: $(tail -3 "$WORK/gomemcache-$name.log" | tr '\n\t' '  ')"
	fi
	echo "   $name: $verdict $detail"
	printf 'gomemcache\tTestLocalhost\t%s\t%s\t%s\n' "$name" "$verdict" "$detail" >>"$RESULTS"
done

PLV=$(dpkg-query -W -f '${Version}' python3-pylibmc)
echo "== pylibmc $PLV ($("$PY" -c 'import _pylibmc; print("libmemcached", _pylibmc.libmemcached_version)')): scripts/compat/pylibmc_commands.py"
timeout 300 "$PY" "$HERE/pylibmc_commands.py" "$WORK/pylibmc.tsv" "${TARGETS[@]}"
cat "$WORK/pylibmc.tsv" >>"$RESULTS"

echo
"$PY" "$HERE/report.py" "$RESULTS" "$HERE/known-differences.txt" direct proxy
