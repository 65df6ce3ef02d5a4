"""gunicorn settings, loaded automatically from the working folder.

No worker class is forced: `gunicorn app:app` is the sync mode, `-k gevent` the green one.
"""

import os
import shutil
import tempfile
from pathlib import Path

from greenflask.settings import Server, Settings

_server = Server.from_env()
_settings = Settings.from_env()
bind = "127.0.0.1:8000"
workers = _server.web_concurrency
# The sync worker is killed when one request holds it longer than this; the gevent worker
# only when its event loop is blocked this long (PSYCOGREEN=0 with many pg_sleeps).
timeout = _server.gunicorn_timeout
graceful_timeout = 30
# Past these a burst waits, or is closed, unanswered (docs/scaling.md): gunicorn's defaults are 1,000
# connections, a backlog of 2,048 and a 2 s keep-alive.
worker_connections = _server.worker_connections
backlog = _server.backlog
keepalive = _server.keepalive
# gunicorn 27 opens a control socket at a fixed path by default; servers side by side
# (tests, benchmarks) would fight over it.
control_socket_disable = True
# ACCESS_LOG=1: one line per request on stderr, with the time it took in seconds (%(L)s).
accesslog = "-" if _settings.access_log else None
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss pid=%(p)s request_id=%({x-request-id}o)s'
if _settings.log_format == "json":  # LOG_FORMAT=json: one JSON object per request instead
    from greenflask.logs import json_access_logger

    logger_class = json_access_logger()

# prometheus_client picks its multiprocess mode when it is first imported, which happens
# after this file is read (in each worker, or in the master with --preload): so the folder
# is chosen here, after the settings above have parsed (a bad one exits before any folder
# exists). A fresh one per server start, removed at exit; a folder given in
# PROMETHEUS_MULTIPROC_DIR is emptied instead (old files would add to the sums).
if _settings.metrics_dir:
    _metrics_dir, _metrics_dir_is_ours = Path(_settings.metrics_dir), False
    _metrics_dir.mkdir(parents=True, exist_ok=True)
    for stale in _metrics_dir.glob("*.db"):
        stale.unlink()
else:
    # In memory (tmpfs) where there is one: every request writes to these files' pages, and
    # on a disk-backed folder the kernel keeps writing them back (measured in BENCHMARKS.md).
    _in_memory = "/dev/shm" if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
    _metrics_dir = Path(tempfile.mkdtemp(prefix="greenflask-metrics-", dir=_in_memory))
    _metrics_dir_is_ours = True
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_metrics_dir)  # for prometheus_client and the app


def on_starting(server):
    """In the master, before any fork: print the settings, raise the open-file limit the
    workers inherit, start the embedded database once."""
    from greenflask import embedded, limits

    server.log.info("greenflask settings: %s workers=%d timeout=%ds worker_connections=%d backlog=%d keepalive=%ds",
                    _settings.describe(), workers, timeout, worker_connections, backlog, keepalive)
    server.log.info("metrics of all workers in %s", _metrics_dir)
    before, _ = limits.open_files()
    soft, _ = limits.raise_open_files(_open_files_needed(server.cfg.worker_connections))
    if soft != before:
        server.log.info("open files: soft limit raised from %d to %d", before, soft)
    if not _settings.database_url:
        server.log.info("embedded PostgreSQL: %s", embedded.embedded_url())


def _open_files_needed(connections: int) -> int:
    """A worker's client connections, its pools (two with a read replica) and the rest."""
    from greenflask import limits

    pools = 2 if _settings.database_read_url else 1
    return connections + pools * (_settings.pool_size + _settings.max_overflow) + limits.SPARE


def post_worker_init(worker):
    """In each worker, after gevent's monkey-patching: count its client connections; warn
    when its open-file limit cannot hold them and its pool; the server check makes the
    engines (choosing the wait callback and logging the mode) and warns when the pools
    cannot fit in the server's max_connections; a gevent worker starts the event-loop
    block detector, and its gauges are published every second (metrics.start_publishing)."""
    import db
    from greenflask import connections, green, limits, loopblock, metrics

    limit = connections.track(worker)
    needed, (soft, hard) = _open_files_needed(limit), limits.open_files()
    if soft < needed:
        worker.log.warning(
            "open files: limit %d cannot hold %d client connections + pool %d + %d spare = %d; "
            "raise `ulimit -n` (hard limit %d) or lower GUNICORN_WORKER_CONNECTIONS",
            soft, limit, needed - limit - limits.SPARE, limits.SPARE, needed, hard,
        )
    db.engines(worker.wsgi).check_server(worker.cfg.workers)
    metrics.start_publishing()
    if green.socket_is_green() and _settings.loop_block_warn_ms > 0:
        loopblock.start(_settings.loop_block_warn_ms)


def child_exit(server, worker):
    """A worker that exited no longer counts in the live sums of /metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _metrics_dir_is_ours:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
