#!/usr/bin/env bash
# Peak memory of leaseproxy and of nutcracker (twemproxy) under the same
# two attacks, in one run (issue 14, 3), on the same two memcached servers:
#   multiget: one connection sends "get K K ... K", 1,500 names of one
#             1,000,000-byte value (1.5 GB of replies), and reads nothing
#             for 10 s; then it reads what is left for up to 30 s;
#   slowread: the same get, read at 1 MB/s for 10 s, then as above;
#   declared: 1,000 connections each send "set kN 0 0 1000000" and none of
#             the data, for 10 s.
# Each attack gets a fresh proxy process (VmHWM, the kernel's peak RSS of a
# process, only grows), and the proxies take turns. Reported per attack and
# proxy: peak RSS (VmHWM), RSS before and 5 s after the attack, for
# leaseproxy the largest Go heap seen (go_memstats_heap_alloc_bytes: a
# buffer allocated but not yet written is in the heap, not in RSS), how the
# attacker's connection(s) ended, and a probe client's gets during the
# attack (is the proxy still serving others?).
# Usage: scripts/bench/leaseproxyattack.sh [hold seconds, default 10]
# Environment: LEASEPROXY_EXTRA (YAML lines appended to leaseproxy's config),
# LEASEPROXY_BIN (a built leaseproxy instead of ./cmd/leaseproxy's).
set -euo pipefail
HOLD=${1:-10}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d /tmp/leaseproxy-attack.XXXXXX)
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
need nutcracker "apt-get install nutcracker"
NUTCRACKER=$(command -v nutcracker || echo /usr/sbin/nutcracker)

freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
waitport() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.05; done; echo "port $1 not up" >&2; exit 1; }

echo "building..." >&2
(cd "$ROOT" && go build -o "$WORK/leaseproxyattack" ./scripts/bench/leaseproxyattack)
if [ -n "${LEASEPROXY_BIN:-}" ]; then cp "$LEASEPROXY_BIN" "$WORK/leaseproxy"; else (cd "$ROOT" && go build -o "$WORK/leaseproxy" ./cmd/leaseproxy); fi

M1=$(freeport); M2=$(freeport)
for p in $M1 $M2; do
	memcached -u root -l 127.0.0.1 -p "$p" -U 0 -m 256 -c 20000 -t 2 & PIDS+=($!)
done
for p in $M1 $M2; do waitport "$p"; done

# start_leaseproxy / start_nutcracker: a fresh process on a fresh port;
# sets PORT, PID and METRICS (leaseproxy's /metrics, for its Go heap).
start_leaseproxy() {
	PORT=$(freeport); HTTP=$(freeport); METRICS=http://127.0.0.1:$HTTP/metrics
	cat >"$WORK/leaseproxy.yaml" <<YML
listen: 127.0.0.1:$PORT
servers: [127.0.0.1:$M1, 127.0.0.1:$M2]
hash: ketama
limits: {max_conns: 19000}
http: {listen: 127.0.0.1:$HTTP}
log: {level: warn}
${LEASEPROXY_EXTRA:-}
YML
	"$WORK/leaseproxy" -config "$WORK/leaseproxy.yaml" 2>>"$WORK/leaseproxy.log" & PID=$!; PIDS+=($PID)
	waitport "$PORT"
}
start_nutcracker() {
	PORT=$(freeport); METRICS=
	cat >"$WORK/nutcracker.yml" <<YML
pool:
  listen: 127.0.0.1:$PORT
  hash: md5
  distribution: ketama
  auto_eject_hosts: false
  timeout: 2000
  servers:
   - 127.0.0.1:$M1:1
   - 127.0.0.1:$M2:1
YML
	"$NUTCRACKER" -c "$WORK/nutcracker.yml" -s "$(freeport)" -a 127.0.0.1 -o "$WORK/nutcracker.log" & PID=$!; PIDS+=($PID)
	waitport "$PORT"
}

printf '%-11s %-9s %9s %8s %10s %9s %9s  %-46s %s\n' proxy attack "peak(MB)" "base(MB)" "sampled(MB)" "after(MB)" "heap(MB)" "attacker's connection(s)" "probe ok/fail/max ms"
declare -A PEAK
for attack in multiget slowread declared; do
	case $attack in
	slowread) args=(-mode multiget -read 1000000) ;;
	*) args=(-mode "$attack") ;;
	esac
	for proxy in leaseproxy nutcracker; do
		"start_$proxy"
		out=$("$WORK/leaseproxyattack" "${args[@]}" -name "$proxy" -addr "127.0.0.1:$PORT" -pid "$PID" -metrics "$METRICS" -hold "${HOLD}s")
		read -r name mode peak base sampled after heap detail ok fail pmax <<<"$out"
		printf '%-11s %-9s %9s %8s %10s %9s %9s  %-46s %s/%s/%s\n' "$name" "$attack" "$peak" "$base" "$sampled" "$after" "$heap" "$detail" "$ok" "$fail" "$pmax"
		PEAK[$proxy.$attack]=$peak
		kill "$PID"; wait "$PID" 2>/dev/null || true
	done
done
for attack in multiget slowread declared; do
	awk -v a="$attack" -v l="${PEAK[leaseproxy.$attack]}" -v n="${PEAK[nutcracker.$attack]}" \
		'BEGIN { printf "%s: peak RSS leaseproxy/nutcracker %.3fx (%d MB against %d MB)\n", a, l/n, l, n }'
done
