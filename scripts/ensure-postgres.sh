#!/usr/bin/env bash
# Start the local PostgreSQL cluster the tests use, if it is not already accepting connections.
set -euo pipefail
host=${SYNCD_TEST_PG_HOST:-127.0.0.1}
port=${SYNCD_TEST_PG_PORT:-5432}
if pg_isready -q -h "$host" -p "$port" 2>/dev/null; then
  exit 0
fi
if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
fi
for _ in $(seq 1 30); do
  pg_isready -q -h "$host" -p "$port" 2>/dev/null && exit 0
  sleep 1
done
echo "PostgreSQL is not reachable at $host:$port; the tests need it" >&2
exit 1
