// Package bench holds the invalidation pipeline's whole-system benchmarks
// (issue 3). They start the real two-datacenter environment through
// testenv, build and run the real invalidator binaries, and measure each
// figure against a reference taken in the same run:
//
//   - BenchmarkTail: WAL to acked in JetStream, against pg_recvlogical
//     draining the same WAL from a slot made at the same LSN;
//   - BenchmarkEndToEnd: WAL to purged in both datacenters' memcached,
//     against the same pg_recvlogical figure;
//   - BenchmarkCommitToPurge: commit to purge latency per datacenter at a
//     steady commit rate, timed by memcached's own watch log;
//   - BenchmarkMillionRowRSS: the invalidator's peak RSS through a
//     1,000,000-row transaction.
//
// Run them with make bench, or:
//
//	go test -run '^$' -bench . -benchtime 1x -timeout 30m ./bench/
//
// The package has no code of its own outside its tests.
package bench
