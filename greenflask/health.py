"""What this worker last saw of the database, so that /healthz need not always ask it.

A health check that runs a query waits where the requests wait: in this worker's pool and,
behind PgBouncer, in PgBouncer's queue for a server connection. Under load that wait
passes the balancer's check timeout, and the balancer takes every busy host out of
rotation at once. So a worker whose database answered within the window, with no failure
since, is healthy without a round trip; an idle worker, or one that saw a failure, asks.
"""

import time

_last_answer = 0.0
_last_failure = 0.0


def note_answer() -> None:
    """A connection came back to the pool alive: the database answered just now."""
    global _last_answer
    _last_answer = time.monotonic()


def note_failure() -> None:
    """A request failed because the database could not be reached or did not answer."""
    global _last_failure
    _last_failure = time.monotonic()


def answered_within(seconds: float) -> bool:
    return _last_answer > _last_failure and time.monotonic() - _last_answer < seconds
