#!/usr/bin/env bash
# Benchmark leaseproxy against memcached directly and nutcracker (twemproxy)
# on the same two memcached servers, in one run:
#   1. throughput: memcaslap (2 threads, 32 connections, 100-byte values,
#      9 gets : 1 set) against each; ops/s and ratios;
#   2. latency: p50/p99 of the same mix from leaseproxyload;
#   3. herd: N clients miss one key at once and fill on a miss (10ms "query");
#      database fills and p99 wait, for leaseproxy and, as contrast, nutcracker.
# Usage: scripts/bench/leaseproxy.sh [seconds per run, default 10] [herd sizes, default 10,100,1000,10000]
# Environment: LEASEPROXY_PROCS (leaseproxy's procs, i.e. GOMAXPROCS; unset:
# leaseproxy's default, 1; 0: Go's default, every core),
# LEASEPROXY_CONNS_PER_SERVER (default 1, as leaseproxy's).
# Figures on a shared 2-core machine are only comparable within one run. The
# CPU time each proxy process used per operation is printed too: it is less
# sensitive than ops/s to what else runs on the machine.
set -euo pipefail
DUR=${1:-10}
HERD=${2:-10,100,1000,10000}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d /tmp/leaseproxy-bench.XXXXXX)
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$WORK"
}
trap cleanup EXIT
ulimit -n 20000 2>/dev/null || true

need() { command -v "$1" >/dev/null || { [ -x "/usr/sbin/$1" ] && return; echo "missing $1 ($2)" >&2; exit 1; }; }
need memcached "apt-get install memcached"
need memcaslap "apt-get install libmemcached-tools"
need nutcracker "apt-get install nutcracker"
NUTCRACKER=$(command -v nutcracker || echo /usr/sbin/nutcracker)

freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
waitport() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.05; done; echo "port $1 not up" >&2; exit 1; }

echo "building..." >&2
(cd "$ROOT" && go build -o "$WORK/leaseproxy" ./cmd/leaseproxy && go build -o "$WORK/leaseproxyload" ./scripts/bench/leaseproxyload)

M1=$(freeport); M2=$(freeport); NC=$(freeport); NCS=$(freeport); LP=$(freeport); LPH=$(freeport)
for p in $M1 $M2; do
	memcached -u root -l 127.0.0.1 -p "$p" -U 0 -m 256 -c 20000 -t 2 & PIDS+=($!)
done
cat >"$WORK/nutcracker.yml" <<YML
pool:
  listen: 127.0.0.1:$NC
  hash: md5
  distribution: ketama
  auto_eject_hosts: false
  timeout: 2000
  servers:
   - 127.0.0.1:$M1:1
   - 127.0.0.1:$M2:1
YML
"$NUTCRACKER" -c "$WORK/nutcracker.yml" -s "$NCS" -a 127.0.0.1 -o "$WORK/nutcracker.log" & NCPID=$!; PIDS+=($NCPID)
cat >"$WORK/leaseproxy.yaml" <<YML
listen: 127.0.0.1:$LP
servers: [127.0.0.1:$M1, 127.0.0.1:$M2]
hash: ketama
lease: {ttl: 2s, wait: 250ms, stale: true}
limits: {max_conns: 19000}
pool: {conns_per_server: ${LEASEPROXY_CONNS_PER_SERVER:-1}}
${LEASEPROXY_PROCS:+procs: $LEASEPROXY_PROCS}
http: {listen: 127.0.0.1:$LPH}
log: {level: warn}
YML
"$WORK/leaseproxy" -config "$WORK/leaseproxy.yaml" 2>"$WORK/leaseproxy.log" & LPPID=$!; PIDS+=($LPPID)
for p in $M1 $M2 $NC $LP; do waitport "$p"; done

# cputicks PID: user+system CPU time of a process, in clock ticks.
cputicks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
echo "== throughput: memcaslap -T 2 -c 32 -X 100 -t ${DUR}s (9 get : 1 set)"
declare -A TPS
for t in "memcached=127.0.0.1:$M1,127.0.0.1:$M2=" "nutcracker=127.0.0.1:$NC=$NCPID" "leaseproxy=127.0.0.1:$LP=$LPPID"; do
	name=${t%%=*}; rest=${t#*=}; addr=${rest%%=*}; pid=${rest#*=}
	[ -n "$pid" ] && c0=$(cputicks "$pid")
	out=$(memcaslap -s "$addr" -T 2 -c 32 -X 100 -t "${DUR}s" 2>&1)
	tps=$(echo "$out" | sed -n 's/.*TPS: \([0-9]*\).*/\1/p' | tail -1)
	errs=$(echo "$out" | grep -c 'ERROR' || true)
	TPS[$name]=${tps:-0}
	cpu=""
	if [ -n "$pid" ] && [ "${tps:-0}" -gt 0 ]; then
		c1=$(cputicks "$pid")
		cpu=$(awk -v t="$((c1 - c0))" -v hz="$(getconf CLK_TCK)" -v n="$tps" -v d="$DUR" \
			'BEGIN { printf "  proxy CPU %.2f cores, %.1f us/op", t/hz/d, t/hz*1e6/(n*d) }')
	fi
	printf "%-12s %10s ops/s  (error lines: %s)%s\n" "$name" "${tps:-?}" "$errs" "$cpu"
done
awk -v m="${TPS[memcached]}" -v n="${TPS[nutcracker]}" -v l="${TPS[leaseproxy]}" 'BEGIN {
	printf "ratios: leaseproxy/nutcracker %.2f  leaseproxy/memcached %.2f  nutcracker/memcached %.2f\n", l/n, l/m, n/m }'

echo "== latency: leaseproxyload -conns 32 -duration ${DUR}s (100-byte values, 9 get : 1 set)"
"$WORK/leaseproxyload" -mode mix -duration "${DUR}s" -conns 32 -size 100 \
	-targets "memcached=127.0.0.1:$M1,nutcracker=127.0.0.1:$NC,leaseproxy=127.0.0.1:$LP"

echo "== herd: N clients miss one key at once; a miss fills (10ms) and sets"
"$WORK/leaseproxyload" -mode herd -n "$HERD" -fill 10ms -targets "leaseproxy=127.0.0.1:$LP,nutcracker=127.0.0.1:$NC"
curl -s "127.0.0.1:$LPH/metrics" 2>/dev/null | grep -E '^leaseproxy_lease_(wins|waits|wait_timeouts|polls|fills|refused_fills)_total' || true
