#!/usr/bin/env bash
# The main job end to end: embedded database, seed, gunicorn (gevent) in the background,
# `python loadtest.py 100`, then a clean stop of both servers by PID.
# `make demo` runs it after installing into .venv; extra arguments go to loadtest.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PORT=${PORT:-8000}
LOG=${DEMO_LOG:-gunicorn-demo.log}

embedded=0
[ -z "${DATABASE_URL:-}" ] && [ ! -f "${EMBEDDED_PGDATA:-.pgdata}/postmaster.pid" ] && embedded=1

$PY seed.py
.venv/bin/gunicorn app:app -k gevent -b "127.0.0.1:$PORT" >"$LOG" 2>&1 &
server_pid=$!
stop() {
  kill -TERM "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
  echo "gunicorn (pid $server_pid) stopped; its log: $LOG"
  if [ "$embedded" = 1 ]; then $PY -m greenflask.embedded stop; fi
}
trap stop EXIT

$PY -m greenflask.servers wait "http://127.0.0.1:$PORT"

$PY loadtest.py --url "http://127.0.0.1:$PORT" "${@:-100}"
