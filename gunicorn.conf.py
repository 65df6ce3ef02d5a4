"""gunicorn settings, loaded automatically from the working folder.

No worker class is forced: `gunicorn app:app` is the sync mode, `-k gevent` the green one.
"""

import os
import shutil
import tempfile
from pathlib import Path

from config import Settings, env_number

_settings = Settings.from_env()
bind = "127.0.0.1:8000"
workers = env_number("WEB_CONCURRENCY", 1, minimum=1)
# The sync worker is killed when one request holds it longer than this; the gevent worker
# only when its event loop is blocked this long (PSYCOGREEN=0 with many pg_sleeps).
timeout = env_number("GUNICORN_TIMEOUT", 120, minimum=1)
graceful_timeout = 30
# gunicorn 27 opens a control socket at a fixed path by default; servers side by side
# (tests, benchmarks) would fight over it.
control_socket_disable = True
# ACCESS_LOG=1: one line per request on stderr, with the time it took in seconds (%(L)s).
accesslog = "-" if _settings.access_log else None
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss pid=%(p)s'

# prometheus_client picks its multiprocess mode when it is first imported, which happens
# after this file is read (in each worker, or in the master with --preload): so the folder
# is chosen here, after the settings above have parsed (a bad one exits before any folder
# exists). A fresh one per server start, removed at exit; a folder given in
# PROMETHEUS_MULTIPROC_DIR is emptied instead (old files would add to the sums).
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _metrics_dir, _metrics_dir_is_ours = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]), False
    _metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in _metrics_dir.glob("*.db"):
        stale.unlink()
else:
    # In memory (tmpfs) where there is one: every request writes to these files' pages, and
    # on a disk-backed folder the kernel keeps writing them back (measured in BENCHMARKS.md).
    _in_memory = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    _metrics_dir = Path(tempfile.mkdtemp(prefix="greenflask-metrics-", dir=_in_memory))
    _metrics_dir_is_ours = True
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir)


def on_starting(server):
    """In the master, before any fork: print the settings, start the embedded database once."""
    import embedded_pg

    server.log.info("greenflask settings: %s", _settings.describe())
    server.log.info("metrics of all workers in %s", _metrics_dir)
    if not _settings.database_url:
        server.log.info("embedded PostgreSQL: %s", embedded_pg.database_url())


def post_worker_init(worker):
    """In each worker, after gevent's monkey-patching: the server check makes the engine
    (choosing the wait callback and logging the mode) and warns when the pools cannot fit
    in the server's max_connections; a gevent worker starts the event-loop block detector."""
    import db
    import loopblock

    db.database(worker.wsgi).check_server(worker.cfg.workers)
    if db.socket_is_green() and _settings.loop_block_warn_ms > 0:
        loopblock.start(_settings.loop_block_warn_ms)


def child_exit(server, worker):
    """A worker that exited no longer counts in the live sums of /metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _metrics_dir_is_ours:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
