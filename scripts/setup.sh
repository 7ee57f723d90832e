#!/usr/bin/env bash
# Installs the system packages the tests, the demo and the benchmarks need,
# when they are missing. Idempotent, and quick when everything is present.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
ls /usr/lib/postgresql/*/bin/pg_recvlogical >/dev/null 2>&1 || need+=(postgresql-client)
have memcached || need+=(memcached)
have nutcracker || need+=(nutcracker)
have memcaslap || need+=(libmemcached-tools)
have promtool || need+=(prometheus)              # deploy/ tests: promtool check/test rules
have systemd-analyze || need+=(systemd)          # deploy/ tests: systemd-analyze verify
have go || { echo "setup: Go is not installed (need go 1.26+ on PATH)" >&2; exit 1; }

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian starts packaged services on install; the project runs its own.
for svc in memcached postgresql nutcracker prometheus; do
  if have systemctl && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" 2>/dev/null || true
  fi
done
exit 0
