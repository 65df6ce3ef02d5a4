"""The floor for this stack: raw WSGI + psycopg2 + psycogreen under gunicorn's gevent worker.

No Flask, no SQLAlchemy: a small LIFO pool of autocommit connections and one query. It
answers GET /todos with the same JSON body as the app, so the difference is the framework;
/sleep/python/ and /sleep/postgres/ sleep first, like the app's, and a request that waits
longer than DB_POOL_TIMEOUT for a connection answers 503, like the app's.

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
QUERY = "SELECT id, title, done, priority FROM todos ORDER BY id LIMIT 100 OFFSET 0"
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


def application(environ, start_response):
    """GET /todos; /sleep/python/?seconds=S sleeps first (gevent's sleep: the worker is
    patched) and /sleep/postgres/?seconds=S has the server sleep on the request's
    connection, as the app's routes do, so a burst of sleeps has a floor too."""
    path = environ["PATH_INFO"]
    seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("seconds", ["5"])[0])
    if path == "/sleep/python/":
        time.sleep(seconds)
    elif path not in ("/todos", "/sleep/postgres/"):
        start_response("404 Not Found", [("Content-Type", "application/json")])
        return [b'{"error":"not found"}\n']
    try:
        connection = _connection()
    except Empty:
        start_response("503 Service Unavailable", [("Content-Type", "application/json"), ("Retry-After", "1")])
        return [BUSY]
    try:
        with connection.cursor() as cursor:
            if path == "/sleep/postgres/":
                cursor.execute("SELECT pg_sleep(%s)", (seconds,))
            cursor.execute(QUERY)
            rows = cursor.fetchall()
    finally:
        _idle.put(connection)
    todos = [{"id": i, "title": t, "done": d, "priority": p} for i, t, d, p in rows]
    body = (json.dumps({"todos": todos, "limit": 100, "offset": 0}, separators=(",", ":")) + "\n").encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
