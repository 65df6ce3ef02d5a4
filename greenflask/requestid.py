"""Every request gets an id: the caller's `X-Request-ID` when it is a sane one (HAProxy sets
it with `unique-id-format`), else a new one. It is returned in the answer's `X-Request-ID`,
put in every log line of the request (greenflask/logs.py) and in the access log; the
instrumentation middleware (greenflask/instrument.py) does all three."""

import os
import string

HEADER = "X-Request-ID"
ENVIRON_KEY = "greenflask.request_id"  # where the access log (logs.py) finds it
MAX_LENGTH = 128
# A set test, not a regex: this runs on every request (BENCHMARKS.md, "Speed").
SANE = frozenset(string.ascii_letters + string.digits + "._:-")
# Each greenlet keeps the id of the request it serves (or served last) in this attribute:
# gevent's monitor thread, which sees only the greenlet that blocked the loop, names the
# request with it (loopblock.py). An attribute, not a map cleared when the request ends: on
# a loaded machine the report may come after the blocking request has ended, and it still
# names that request; the attribute goes with the greenlet.
ATTRIBUTE = "greenflask_request_id"


def running(greenlet) -> str | None:
    """The id of the request `greenlet` serves, or served last."""
    return getattr(greenlet, ATTRIBUTE, None)


def of(environ: dict) -> str:
    """The caller's id when it is sane, else a new one: 32 random hex digits, the shape of a
    uuid4's hex without the cost of making a UUID object."""
    given = environ.get("HTTP_X_REQUEST_ID")
    if given and len(given) <= MAX_LENGTH and SANE.issuperset(given):
        return given
    return os.urandom(16).hex()
