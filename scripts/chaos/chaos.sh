#!/usr/bin/env bash
# Runs the chaos scenarios against a local environment with the real
# daemons and writes CHAOS.md at the repository root.
#   scripts/chaos/chaos.sh                 # full form, every scenario
#   scripts/chaos/chaos.sh -short          # short form (as TestChaosShort)
#   scripts/chaos/chaos.sh -scenarios a,c  # some scenarios
#   scripts/chaos/chaos.sh check -config check.yaml -duration 10m
# Needs what `make test` needs (scripts/setup.sh installs it) and root or
# sudo: Postgres runs as the postgres user.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ "${1:-}" == "check" ]]; then
	shift
	exec go run ./cmd/chaos check "$@"
fi
exec go run ./cmd/chaos run -out CHAOS.md "$@"
