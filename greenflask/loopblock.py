"""Catch the gevent loop being blocked, and say for how long and where.

Blocking is silent under gevent: a call that does not yield (psycopg2 without the green
wait callback, a CPU-bound loop, a C library doing I/O) stops every other request of the
worker, and from outside it only looks slow. gevent's own monitor thread checks every
`max_blocking_time` whether the loop switched; when it did not, it emits `EventLoopBlocked`
with the blocking greenlet's stack, and the request it was serving (requestid.running).

Here those events are grouped into blocks (consecutive reports for one greenlet), and each
block is logged once, with its length and the project's own frames in the stack
(`models.py:... in pg_sleep < views.py:... in sleep_postgres`), and counted in /metrics and
/stats. The monitor thread only queues what it saw (it is a real OS thread, where gevent's
patched locks must not be taken); a greenlet of the worker logs and counts, once the loop
runs again.
"""

import logging
import time
from collections import deque
from pathlib import Path

from greenflask import PROJECT_DIR, metrics, requestid

log = logging.getLogger("greenflask.loop")

# The project's own files: the app at the top and this package.
OWN_FOLDERS = (PROJECT_DIR, Path(__file__).resolve().parent)
_reports: deque = deque()  # (monotonic time, greenlet id, stack lines, request id), from the monitor thread
_period = 0.1
_current: dict | None = None  # the block being grouped: first/last report, greenlet, frames
stats = {"count": 0, "longest_seconds": 0.0}  # this worker's, for /stats


def start(threshold_ms: int) -> None:
    """In a gevent worker, after monkey-patching: start gevent's monitor thread for this
    worker's hub, with `threshold_ms` as its period, and the greenlet that reports."""
    import gevent
    from gevent import config as gevent_config
    from gevent import events

    global _period
    _period = threshold_ms / 1000
    gevent_config.monitor_thread = True
    gevent_config.max_blocking_time = _period
    gevent_config.print_blocking_reports = False  # one log line of ours instead of gevent's dump
    events.subscribers.append(_on_event)
    gevent.get_hub().start_periodic_monitoring_thread()
    gevent.spawn(_report_forever)
    log.info("event-loop block detector on: blocks longer than %d ms are logged", threshold_ms)


def _on_event(event) -> None:
    """In the monitor thread: queue the report, nothing else."""
    from gevent.events import EventLoopBlocked

    if isinstance(event, EventLoopBlocked):
        blocker = id(event.greenlet)
        _reports.append((time.monotonic(), blocker, list(event.info), requestid.running(event.greenlet)))


def _report_forever() -> None:
    import gevent

    while True:
        gevent.sleep(_period)
        report_blocks()


def report_blocks() -> None:
    """Group queued reports into blocks; log and count each block that has ended.

    A block goes on as long as reports for the same greenlet keep coming one period apart;
    this greenlet running at all means the loop is free again, so what was queued has ended.
    """
    global _current
    while _reports:
        seen_at, greenlet_id, lines, request_id = _reports.popleft()
        same_block = (
            _current is not None
            and _current["greenlet"] == greenlet_id
            and seen_at - _current["last"] <= 1.5 * _period
        )
        if same_block:
            _current["last"] = seen_at
        else:
            _end_block()
            _current = {"first": seen_at, "last": seen_at, "greenlet": greenlet_id, "where": project_frames(lines),
                        "request_id": request_id}
    _end_block()


def _end_block() -> None:
    global _current
    if _current is None:
        return
    # Reported at each check (one per period) that saw no switch: the first report comes one
    # to two periods after the block began, the last up to one period before it ended.
    seconds = _current["last"] - _current["first"] + 2 * _period
    # Logged by the reporting greenlet, in the name of the request that blocked the loop.
    log.warning("event loop blocked for %.2f s in %s", seconds, _current["where"] or "(no frame of this project)",
                extra={"request_id": _current["request_id"]})
    metrics.LOOP_BLOCKED.inc()
    metrics.LOOP_BLOCKED_SECONDS.observe(seconds)
    stats["count"] += 1
    stats["longest_seconds"] = max(stats["longest_seconds"], round(seconds, 3))
    metrics.LOOP_BLOCKED_LONGEST.set(stats["longest_seconds"])
    _current = None


def project_frames(report: list[str], most: int = 3) -> str:
    """'models.py:96 in pg_sleep < views.py:33 in sleep_postgres': the innermost frames of
    this project's own files in the blocked stack of gevent's report, innermost first."""
    frames = []
    in_blocked_stack = False
    for line in "\n".join(report).splitlines():
        text = line.strip()
        if text.startswith("Blocked Stack"):
            in_blocked_stack = True
        elif in_blocked_stack and not text:
            break
        elif in_blocked_stack and text.startswith('File "'):
            path, _, rest = text[len('File "'):].partition('", line ')
            if Path(path).parent in OWN_FOLDERS:
                number, _, function = rest.partition(", in ")
                frames.append(f"{Path(path).name}:{number} in {function}")
    return " < ".join(reversed(frames[-most:]))
