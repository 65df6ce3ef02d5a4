"""Each worker's open client connections against its limit, for /stats and /metrics.

gunicorn's gevent worker serves at most `worker_connections` connections at once; the next
ones wait in the listen backlog, unanswered, until one closes. From outside that looks like
waves of exactly that size, so the count is shown where the load tester can read it and
name the wall. The sync worker serves one at a time: its limit is 1.

`track(worker)` wraps the worker's per-connection handler in gunicorn's `post_worker_init`,
before the worker's loop binds it.
"""

import functools

from greenflask import metrics

stats = {"open": 0, "peak": 0, "limit": None, "workers": None, "keepalive": None}  # this worker's, for /stats


def track(worker) -> int:
    """Count the client connections `worker` handles; return its limit."""
    limit = getattr(worker, "worker_connections", 1)  # only the async workers have one
    stats.update(limit=limit, workers=worker.cfg.workers, keepalive=worker.cfg.keepalive)
    metrics.CONNECTIONS_LIMIT.set(limit)
    metrics.read_at_publish(metrics.CONNECTIONS_OPEN, lambda: stats["open"])
    handle = worker.handle

    @functools.wraps(handle)
    def counted(listener, client, address):
        _opened()
        try:
            return handle(listener, client, address)
        finally:
            _closed()

    worker.handle = counted
    return limit


def _opened() -> None:
    stats["open"] += 1
    stats["peak"] = max(stats["peak"], stats["open"])


def _closed() -> None:
    stats["open"] -= 1
