#!/usr/bin/env bash
# Benchmark leaseproxy against memcached directly and nutcracker (twemproxy)
# on the same two memcached servers, in one run:
#   1. throughput: memcaslap (2 threads, 32 connections, 100-byte values,
#      9 gets : 1 set) against each; ops/s and ratios;
#   2. latency: p50/p99 of the same mix from leaseproxyload;
#   3. herd: N clients miss one key at once and fill on a miss (10ms "query");
#      database fills and p99 wait, for leaseproxy and, as contrast, nutcracker;
#   4. slow herd: the largest N, with a fill (400ms) slower than lease.wait
#      (250ms), so that every waiter misses and sets: the sets' answers and the
#      proxy's breaker opens, with the sets on the get's connection and on a
#      pool of 500 other connections (leaseproxy, and leaseproxy-ref if given).
# Usage: scripts/bench/leaseproxy.sh [seconds per run, default 10] [herd sizes, default 10,100,1000,10000] [rounds, default 3]
# Environment: LEASEPROXY_PROCS (leaseproxy's procs, i.e. GOMAXPROCS; unset:
# leaseproxy's default, 1; 0: Go's default, every core),
# LEASEPROXY_CONNS_PER_SERVER (default 1, as leaseproxy's), LEASEPROXY_BIN
# (a built leaseproxy instead of ./cmd/leaseproxy's), LEASEPROXY_REF_BIN
# (another leaseproxy build, e.g. the code before a change: it runs as a
# fourth target, "leaseproxy-ref", with the same config, takes its turns in
# 1 and 2 (before leaseproxy in even rounds, after it in odd ones), and the
# medians of leaseproxy/leaseproxy-ref are printed too), LEASEPROXY_FOREIGN_SET
# (lease.foreign_set of both leaseproxies; unset: the default, check),
# LEASEPROXY_REF_FOREIGN_SET (lease.foreign_set of leaseproxy-ref alone: with
# LEASEPROXY_REF_BIN set to the same build and "plain", the rounds measure
# what the default check of sets not tied to a lease costs).
# Figures on a shared 2-core machine are only comparable within one run, so
# 1 and 2 take turns between the targets, round after round, and report the
# median over the rounds of each ratio taken within a round. The
# CPU time each proxy process used per operation is printed too: it is less
# sensitive than ops/s to what else runs on the machine.
set -euo pipefail
DUR=${1:-10}
HERD=${2:-10,100,1000,10000}
ROUNDS=${3:-3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d /tmp/leaseproxy-bench.XXXXXX)
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	[ -n "${BENCH_KEEP:-}" ] && echo "kept $WORK" >&2 || rm -rf "$WORK"
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
(cd "$ROOT" && go build -o "$WORK/leaseproxyload" ./scripts/bench/leaseproxyload)
if [ -n "${LEASEPROXY_BIN:-}" ]; then cp "$LEASEPROXY_BIN" "$WORK/leaseproxy"; else (cd "$ROOT" && go build -o "$WORK/leaseproxy" ./cmd/leaseproxy); fi

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
lease: {ttl: 2s, wait: 250ms, stale: true${LEASEPROXY_FOREIGN_SET:+, foreign_set: $LEASEPROXY_FOREIGN_SET}}
limits: {max_conns: 19000}
pool: {conns_per_server: ${LEASEPROXY_CONNS_PER_SERVER:-1}}
${LEASEPROXY_PROCS:+procs: $LEASEPROXY_PROCS}
http: {listen: 127.0.0.1:$LPH}
log: {level: warn}
YML
"$WORK/leaseproxy" -config "$WORK/leaseproxy.yaml" 2>"$WORK/leaseproxy.log" & LPPID=$!; PIDS+=($LPPID)
LPTARGETS=("leaseproxy=127.0.0.1:$LP=$LPPID"); LOADREF=""
if [ -n "${LEASEPROXY_REF_BIN:-}" ]; then
	LPR=$(freeport); LPRH=$(freeport)
	sed -e "s/^listen: .*/listen: 127.0.0.1:$LPR/" -e "s/^http: .*/http: {listen: 127.0.0.1:$LPRH}/" \
		-e 's/^lease: {\(.*\)}$/lease: {\1, record_prefix: "_leaseref:"}/' \
		${LEASEPROXY_REF_FOREIGN_SET:+-e 's/, foreign_set: [a-z]*//' -e "s/^lease: {\(.*\)}\$/lease: {\1, foreign_set: $LEASEPROXY_REF_FOREIGN_SET}/"} \
		"$WORK/leaseproxy.yaml" >"$WORK/leaseproxy-ref.yaml"
	"$LEASEPROXY_REF_BIN" -config "$WORK/leaseproxy-ref.yaml" 2>"$WORK/leaseproxy-ref.log" & LPRPID=$!; PIDS+=($LPRPID)
	waitport "$LPR"
	LPTARGETS+=("leaseproxy-ref=127.0.0.1:$LPR=$LPRPID"); LOADREF=",leaseproxy-ref=127.0.0.1:$LPR"
fi
for p in $M1 $M2 $NC $LP; do waitport "$p"; done

# cputicks PID: user+system CPU time of a process, in clock ticks.
cputicks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
# The targets take turns, round after round, so that a change in what else
# the shared machine runs hits all of them alike; each ratio compares two
# targets within a round, and the summary is the median over the rounds.
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo "== throughput: memcaslap -T 2 -c 32 -X 100 -t ${DUR}s (9 get : 1 set), $ROUNDS rounds"
declare -A CPU
RATIOS_N=(); RATIOS_M=(); RATIOS_R=()
for r in $(seq "$ROUNDS"); do
	declare -A TPS=()
	line="round $r:"
	# With a reference build, the two leaseproxies swap places every round.
	lpt=("${LPTARGETS[@]}"); [ $((r % 2)) -eq 0 ] && [ ${#lpt[@]} -eq 2 ] && lpt=("${lpt[1]}" "${lpt[0]}")
	for t in "memcached=127.0.0.1:$M1,127.0.0.1:$M2=" "nutcracker=127.0.0.1:$NC=$NCPID" "${lpt[@]}"; do
		name=${t%%=*}; rest=${t#*=}; addr=${rest%%=*}; pid=${rest#*=}
		[ -n "$pid" ] && c0=$(cputicks "$pid")
		out=$(memcaslap -s "$addr" -T 2 -c 32 -X 100 -t "${DUR}s" 2>&1)
		tps=$(echo "$out" | sed -n 's/.*TPS: \([0-9]*\).*/\1/p' | tail -1)
		if [ -z "$tps" ] || [ "$tps" -eq 0 ] || echo "$out" | grep -q ERROR; then
			echo "memcaslap against $name failed:" >&2; echo "$out" | tail -5 >&2; exit 1
		fi
		TPS[$name]=$tps
		[ -n "$pid" ] && CPU[$name]="${CPU[$name]:-} $(( $(cputicks "$pid") - c0 )):$tps"
		line="$line  $name $tps"
	done
	echo "$line ops/s"
	[ -n "$LOADREF" ] && RATIOS_R+=("$(awk -v l="${TPS[leaseproxy]}" -v r="${TPS[leaseproxy-ref]}" 'BEGIN { printf "%.3f", l/r }')")
	RATIOS_N+=("$(awk -v l="${TPS[leaseproxy]}" -v n="${TPS[nutcracker]}" 'BEGIN { printf "%.3f", l/n }')")
	RATIOS_M+=("$(awk -v l="${TPS[leaseproxy]}" -v n="${TPS[nutcracker]}" -v m="${TPS[memcached]}" 'BEGIN { printf "%.3f %.3f", l/m, n/m }')")
done
for name in nutcracker leaseproxy ${LOADREF:+leaseproxy-ref}; do
	# CPU time the proxy process used per operation, over all rounds.
	echo "${CPU[$name]}" | tr ' ' '\n' | awk -F: -v n="$name" -v hz="$HZ" -v d="$DUR" 'NF == 2 { t += $1; ops += $2 * d }
		END { printf "%-12s proxy CPU %.1f us/op\n", n, t/hz*1e6/ops }'
done
echo "ratios per round, leaseproxy/nutcracker: ${RATIOS_N[*]}"
printf 'median ratios: leaseproxy/nutcracker %s  leaseproxy/memcached %s  nutcracker/memcached %s\n' \
	"$(printf '%s\n' "${RATIOS_N[@]}" | median)" \
	"$(printf '%s\n' "${RATIOS_M[@]}" | awk '{print $1}' | median)" \
	"$(printf '%s\n' "${RATIOS_M[@]}" | awk '{print $2}' | median)"

echo "== latency: leaseproxyload -conns 32 -duration ${DUR}s (100-byte values, 9 get : 1 set), $ROUNDS rounds"
P99_RATIOS=(); P99_REF=()
for r in $(seq "$ROUNDS"); do
	out=$("$WORK/leaseproxyload" -mode mix -duration "${DUR}s" -conns 32 -size 100 \
		-targets "memcached=127.0.0.1:$M1,nutcracker=127.0.0.1:$NC,$(if [ -n "$LOADREF" ] && [ $((r % 2)) -eq 0 ]; then echo "${LOADREF#,},leaseproxy=127.0.0.1:$LP"; else echo "leaseproxy=127.0.0.1:$LP$LOADREF"; fi)")
	echo "$out" | sed "s/^/round $r: /"
	[ -n "$LOADREF" ] && P99_REF+=("$(echo "$out" | awk '$1 == "leaseproxy-ref" { r = $4 } $1 == "leaseproxy" { l = $4 } END { printf "%.3f", l/r }')")
	P99_RATIOS+=("$(echo "$out" | awk '$1 == "nutcracker" { n = $4 } $1 == "leaseproxy" { l = $4 } END { printf "%.3f", l/n }')")
done
echo "p99 ratios per round, leaseproxy/nutcracker: ${P99_RATIOS[*]}"
echo "median p99 ratio: leaseproxy/nutcracker $(printf '%s\n' "${P99_RATIOS[@]}" | median)"
if [ -n "$LOADREF" ]; then
	echo "leaseproxy/leaseproxy-ref per round: throughput ${RATIOS_R[*]}; p99 ${P99_REF[*]}"
	echo "median leaseproxy/leaseproxy-ref: throughput $(printf '%s\n' "${RATIOS_R[@]}" | median), p99 $(printf '%s\n' "${P99_REF[@]}" | median)"
fi

echo "== herd: N clients miss one key at once; a miss fills (10ms) and sets"
"$WORK/leaseproxyload" -mode herd -n "$HERD" -fill 10ms -targets "leaseproxy=127.0.0.1:$LP,nutcracker=127.0.0.1:$NC"
curl -s "127.0.0.1:$LPH/metrics" 2>/dev/null | grep -E '^leaseproxy_lease_(wins|waits|wait_timeouts|polls|fills|refused_fills)_total' || true

# The metrics a slow herd moves (counters since the proxy started).
herdmetrics() {
	curl -s "127.0.0.1:$1/metrics" 2>/dev/null | grep -E '^leaseproxy_(lease_(wins|wait_timeouts|fills|refused_fills|refused_waited|grouped_sets)_total|server_(breaker_opens|failures|requests)_total)' | sed "s/^/$2 /" || true
}
SLOWN=${HERD##*,}
echo "== slow herd: N=$SLOWN clients miss one key at once; a miss fills (400ms, lease.wait is 250ms) and sets"
SLOWTARGETS="leaseproxy=127.0.0.1:$LP$LOADREF"
echo "-- metrics before (counters since start)"
herdmetrics "$LPH" leaseproxy
if [ -n "$LOADREF" ]; then herdmetrics "$LPRH" leaseproxy-ref; fi
"$WORK/leaseproxyload" -mode herd -n "$SLOWN" -fill 400ms -targets "$SLOWTARGETS"
echo "-- the same, each client's set on another connection (a pool of 500) than its get"
"$WORK/leaseproxyload" -mode herd -n "$SLOWN" -fill 400ms -pooled -pool 500 -targets "$SLOWTARGETS"
echo "-- metrics after"
herdmetrics "$LPH" leaseproxy
if [ -n "$LOADREF" ]; then herdmetrics "$LPRH" leaseproxy-ref; fi
