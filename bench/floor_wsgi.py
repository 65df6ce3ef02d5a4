"""The floor for this stack: raw WSGI + psycopg2 + psycogreen under gunicorn's gevent worker.

No Flask, no SQLAlchemy: a small LIFO pool of autocommit connections and one query. It
answers the app's three measured routes with the same JSON bodies as the app, so the
difference is the framework: GET /todos (a page), GET /todos/<id> (one row by id, the
single-row floor TechEmpower's /db test measures) and GET /healthz (a JSON answer with no
query: the raw WSGI JSON floor of TechEmpower's /json). /sleep/python/ and /sleep/postgres/
sleep first, like the app's, and a request that waits longer than DB_POOL_TIMEOUT for a
connection answers 503, like the app's.

    BENCH_DSN=... gunicorn bench.floor_wsgi:application -k gevent -w 2
"""

import json
import time
from urllib.parse import parse_qs

import psycopg2
from gevent.queue import Empty, LifoQueue
from psycogreen.gevent import patch_psycopg

from greenflask.settings import Settings, Tools

patch_psycopg()  # imported by the gevent worker after monkey-patching

_TOOLS = Tools.from_env()
DSN = _TOOLS.bench_dsn
POOL_SIZE = _TOOLS.bench_pool_size
POOL_TIMEOUT = Settings.from_env().pool_timeout
COLUMNS = ("id", "title", "done", "priority", "due_at")
PAGE = f"SELECT {', '.join(COLUMNS)} FROM todos ORDER BY id LIMIT 100 OFFSET 0"
ONE = f"SELECT {', '.join(COLUMNS)} FROM todos WHERE id = %s"
BUSY = b'{"error":{"status":503,"code":"pool_exhausted"}}\n'

_idle: LifoQueue = LifoQueue()
_opened = 0


def _connection():
    """An idle connection, a new one while under POOL_SIZE, else wait for one (raises
    gevent.queue.Empty after POOL_TIMEOUT)."""
    global _opened
    if _idle.empty() and _opened < POOL_SIZE:
        _opened += 1
        connection = psycopg2.connect(DSN)
        connection.autocommit = True
        return connection
    return _idle.get(timeout=POOL_TIMEOUT)


def _answer(start_response, status: str, document) -> list[bytes]:
    body = (json.dumps(document, separators=(",", ":"), default=_iso) + "\n").encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _iso(value):
    return value.isoformat()


def application(environ, start_response):
    """GET /todos, /todos/<id> and /healthz; /sleep/python/?seconds=S sleeps first
    (gevent's sleep: the worker is patched) and /sleep/postgres/?seconds=S has the server
    sleep on the request's connection, as the app's routes do, so a burst of sleeps has a
    floor too."""
    path = environ["PATH_INFO"]
    if path == "/healthz":
        return _answer(start_response, "200 OK", {"status": "ok"})
    one = path[len("/todos/"):] if path.startswith("/todos/") else None
    if one is not None and not one.isdigit() or one is None and path not in ("/todos", "/sleep/python/",
                                                                               "/sleep/postgres/"):
        return _answer(start_response, "404 Not Found", {"error": "not found"})
    seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("seconds", ["5"])[0])
    if path == "/sleep/python/":
        time.sleep(seconds)
    try:
        connection = _connection()
    except Empty:
        start_response("503 Service Unavailable", [("Content-Type", "application/json"), ("Retry-After", "1")])
        return [BUSY]
    try:
        with connection.cursor() as cursor:
            if path == "/sleep/postgres/":
                cursor.execute("SELECT pg_sleep(%s)", (seconds,))
            if one is None:
                cursor.execute(PAGE)
            else:
                cursor.execute(ONE, (int(one),))
            rows = cursor.fetchall()
    finally:
        _idle.put(connection)
    todos = [dict(zip(COLUMNS, row)) for row in rows]  # noqa: B905
    if one is None:
        return _answer(start_response, "200 OK", {"todos": todos, "limit": 100, "offset": 0})
    if not todos:
        return _answer(start_response, "404 Not Found", {"error": "not found"})
    return _answer(start_response, "200 OK", todos[0])
