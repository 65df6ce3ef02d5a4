"""Prometheus metrics, summed over gunicorn's workers (prometheus_client's multiprocess mode).

Each worker writes its values to files in PROMETHEUS_MULTIPROC_DIR; whichever worker answers
GET /metrics reads them all, so a scrape is the sum over the live workers. gunicorn.conf.py
makes that folder fresh at every server start, marks dead workers in it and removes it at
exit. Outside gunicorn (the tests' in-process app, a script) the variable is unset and each
process reports only itself.

prometheus_client rather than hand-written counters: it is the format's reference library,
and it does the multiprocess bookkeeping (which gauges sum over live workers only) that
would otherwise be the hard part.
"""

import threading
import time
from collections.abc import Callable

import gevent
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from greenflask import green

REQUEST_DURATION = Histogram(
    "greenflask_http_request_duration_seconds",
    "Time from the start of a request to its answer, by URL rule, method and status.",
    ["route", "method", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
IN_FLIGHT = Gauge(
    "greenflask_http_requests_in_flight", "Requests being answered now.", multiprocess_mode="livesum"
)
CONNECTIONS_OPEN = Gauge(
    "greenflask_http_connections_open", "Client connections open now, all workers.", multiprocess_mode="livesum"
)
CONNECTIONS_LIMIT = Gauge(
    "greenflask_http_connections_limit",
    "Client connections the workers serve at once (worker_connections; 1 for a sync worker), summed.",
    multiprocess_mode="livesum",
)
POOL_CHECKED_OUT = Gauge(
    "greenflask_db_pool_checked_out",
    "Pooled connections in use, as each worker last published them (every PUBLISH_SECONDS).",
    multiprocess_mode="livesum",
)
POOL_SIZE = Gauge("greenflask_db_pool_size", "Pool size (pool_size) per worker, summed.", multiprocess_mode="livesum")
POOL_TIMEOUTS = Counter("greenflask_db_pool_timeouts", "Requests answered 503 pool_exhausted.")
DB_ERRORS = Counter(
    "greenflask_db_errors", "Requests answered because of the database, by kind.", ["kind"]
)
LOOP_BLOCKED = Counter("greenflask_event_loop_blocked", "Times the gevent loop was held past LOOP_BLOCK_WARN_MS.")
LOOP_BLOCKED_LONGEST = Gauge(
    "greenflask_event_loop_blocked_longest_seconds",
    "The longest block of the gevent loop seen by any live worker.",
    multiprocess_mode="livemax",
)
LOOP_BLOCKED_SECONDS = Histogram(
    "greenflask_event_loop_blocked_seconds",
    "How long the gevent loop was held, each time it was held past LOOP_BLOCK_WARN_MS.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


# The gauges of what a worker already knows (requests in flight, client connections open,
# connections checked out) are read from it, not written on every change: in multiprocess
# mode each write is a write to the worker's file, four of them a request. Each worker
# writes them out every PUBLISH_SECONDS, and the worker that answers a scrape first.
PUBLISH_SECONDS = 1.0
_readings: dict[Gauge, Callable[[], float]] = {}


class Tally:
    """A plain count, for a gauge read at publish time."""

    def __init__(self):
        self.count = 0


in_flight = Tally()  # greenflask/instrument.py counts the requests in flight


def read_at_publish(gauge: Gauge, reading: Callable[[], float]) -> None:
    """`gauge` is set to `reading()` at each publish (replacing an earlier reading)."""
    _readings[gauge] = reading


read_at_publish(IN_FLIGHT, lambda: in_flight.count)


def publish() -> None:
    for gauge, reading in _readings.items():
        gauge.set(reading())


def start_publishing(seconds: float = PUBLISH_SECONDS) -> None:
    """In each gunicorn worker: publish every `seconds`, in a greenlet of a gevent worker's
    loop, in a daemon thread of a sync worker (whose one thread is in a request or in accept)."""

    def loop() -> None:
        while True:
            publish()
            time.sleep(seconds)

    if green.socket_is_green():
        gevent.spawn(loop)
    else:
        threading.Thread(target=loop, name="greenflask-metrics", daemon=True).start()


# One histogram child per (route, method, status), looked up in a plain dict: the library's
# labels() validates and locks on every call, a measurable part of this module's cost.
_durations_by_labels: dict[tuple, Histogram] = {}


def observe(route: str, method: str, status: str, seconds: float) -> None:
    """One answered request (greenflask/instrument.py)."""
    key = (route, method, status)
    child = _durations_by_labels.get(key)
    if child is None:
        child = _durations_by_labels.setdefault(key, REQUEST_DURATION.labels(route, method, status))
    child.observe(seconds)


def exposition(multiprocess_dir: str | None) -> tuple[bytes, str]:
    """The text format for GET /metrics: every live worker's values when under gunicorn
    (PROMETHEUS_MULTIPROC_DIR set), else this process's."""
    publish()
    if multiprocess_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
