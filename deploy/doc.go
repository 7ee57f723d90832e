// Package deploy holds what an operator installs next to the binaries:
// systemd units (systemd/), Prometheus alert rules with their unit tests
// and an example scrape configuration (prometheus/), a Grafana dashboard
// (grafana/) and example configs. It has no code; its tests check those
// files with systemd-analyze and promtool, and check that every metric
// the rules and the dashboard use is one the code exports.
package deploy
