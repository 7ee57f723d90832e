#!/usr/bin/env bash
# make bench: the project's benchmarks, each against its reference in the
# same run. Figures on a shared 2-core machine are only comparable within
# one run; BENCHMARKS.md records them with the command and the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
echo "== Go micro-benchmarks: key rendering, pgoutput decoding, meta pool vs gomemcache"
go test -run '^$' -bench . -benchmem -count 1 ./keys/ ./wal/ ./mcpool/
echo "== the purger alone over two real memcached (issue 16): 10-key batches, pipelined quiet deletes per server"
go test -run '^$' -bench Purger -benchtime 100000x ./purge/
echo "== a delivered batch's decoding (issue 16): encoding/json against the consumer's keys-in-place reading, 1,000 keys"
go test -run '^$' -bench Decode -benchmem ./bus/
echo "== invalidation pipeline (issue 3): tail and end-to-end vs pg_recvlogical, commit-to-purge latency, 1M-row RSS, RSS with a DC's pool down for a minute, purge scale-out (1 and 2 purge processes on one DC's durable, and one killed), refill after a pool flush with and without leaseproxy"
go test -run '^$' -bench . -benchtime 1x -timeout 30m ./bench/
echo "== counters (issue 5): deltas absorbed by the batcher, and the batcher vs one UPDATE per event at the same rate"
go test -run '^$' -bench Absorb -benchtime 1000000x ./counterstore/
go test -run '^$' -bench VersusNaive -benchtime 30000x ./counterstore/
echo "== leaseproxy vs memcached direct vs nutcracker (memcaslap, own load generator, herd)"
# 5 rounds of 5 s per target, taking turns (see the script).
bash scripts/bench/leaseproxy.sh "${BENCH_SECONDS:-5}" 10,100,1000,10000 "${BENCH_ROUNDS:-5}"
echo "== leaseproxy vs nutcracker under memory attacks (issue 14): peak RSS under a 1.5 GB multi-get that is not read, and 1,000 declared 1 MB sets"
bash scripts/bench/leaseproxyattack.sh "${ATTACK_SECONDS:-10}"
