#!/usr/bin/env bash
# The multi-host job end to end: python -m deploy.cluster up (PostgreSQL, PgBouncer, app hosts,
# HAProxy), `python loadtest.py 100` through the balancer, then down (every process by
# its PID, every namespace removed). `make cluster` runs it after installing into .venv;
# CLUSTER_ARGS go to `up` (default: --hosts 3), extra arguments to loadtest.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

# What pip does not bring (Debian's packages); installed here when absent and root.
missing() { ! command -v "$1" >/dev/null && [ ! -x "/usr/sbin/$1" ]; }
if missing pgbouncer || missing haproxy; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq pgbouncer haproxy >/dev/null
  else
    echo "make cluster needs PgBouncer and HAProxy: sudo apt-get install pgbouncer haproxy" >&2
    exit 1
  fi
fi

# shellcheck disable=SC2086
url=$($PY -m deploy.cluster up ${CLUSTER_ARGS:---hosts 3} | tee /dev/stderr | tail -n 1)
trap '$PY -m deploy.cluster down' EXIT
$PY -m deploy.cluster status
$PY loadtest.py --url "$url" "${@:-100}"
