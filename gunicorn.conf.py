"""gunicorn settings, loaded automatically from the working folder.

No worker class is forced: `gunicorn app:app` is the sync mode, `-k gevent` the green one.
"""

import db
import embedded_pg
from config import Settings, env_number

bind = "127.0.0.1:8000"
workers = env_number("WEB_CONCURRENCY", 1, minimum=1)
# The sync worker is killed when one request holds it longer than this; the gevent worker
# only when its event loop is blocked this long (PSYCOGREEN=0 with many pg_sleeps).
timeout = env_number("GUNICORN_TIMEOUT", 120, minimum=1)
graceful_timeout = 30
# gunicorn 27 opens a control socket at a fixed path by default; servers side by side
# (tests, benchmarks) would fight over it.
control_socket_disable = True


def on_starting(server):
    """In the master, before any fork: print the settings, start the embedded database once."""
    settings = Settings.from_env()
    server.log.info("greenflask settings: %s", settings.describe())
    if not settings.database_url:
        server.log.info("embedded PostgreSQL: %s", embedded_pg.database_url())


def post_worker_init(worker):
    """In each worker, after gevent's monkey-patching: the budget check makes the engine
    (choosing the wait callback and logging the mode) and warns when the pools cannot fit
    in the server's max_connections."""
    db.database(worker.wsgi).check_connection_budget(worker.cfg.workers)
