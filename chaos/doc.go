// Package chaos proves, against real servers, that pgcache loses no
// invalidation and leaves nothing stale: a workload (writers on the
// primary, cache-aside readers through each datacenter's leaseproxy that
// fill from their replica, likes feeding counters), fault scenarios that
// kill, partition, pause and slow the real processes of a testenv
// environment, a consistency checker in the style of Meta's Polaris that
// samples keys named in recent invalidations and measures how long each
// stays stale in every datacenter, the end-of-scenario verdict (stale
// keys, lost invalidations, counter drift, convergence time) and the
// report.
//
// The Checker also runs against a real deployment (cmd/chaos check): it
// needs only the JetStream stream, each datacenter's memcached pool and a
// SQL query per key pattern that renders a row to its cached value. It
// only reads: it never writes to the cache or the database.
//
// Starting the servers is left to package testenv; the daemons are the
// real cmd/invalidator and cmd/leaseproxy binaries, built with go build.
package chaos
