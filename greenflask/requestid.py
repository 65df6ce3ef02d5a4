"""Every request gets an id: the caller's `X-Request-ID` when it is a sane one (HAProxy sets
it with `unique-id-format`), else a new one. It is returned in the answer's `X-Request-ID`,
put in every log line of the request (greenflask/logs.py) and in the access log."""

import re
import uuid

from flask import Flask, request
from gevent import getcurrent

from greenflask import logs

HEADER = "X-Request-ID"
SANE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Each greenlet keeps the id of the request it serves (or served last) in this attribute:
# gevent's monitor thread, which sees only the greenlet that blocked the loop, names the
# request with it (loopblock.py). An attribute, not a map cleared when the request ends: on
# a loaded machine the report may come after the blocking request has ended, and it still
# names that request; the attribute goes with the greenlet.
ATTRIBUTE = "greenflask_request_id"


def running(greenlet) -> str | None:
    """The id of the request `greenlet` serves, or served last."""
    return getattr(greenlet, ATTRIBUTE, None)


def init_app(app: Flask) -> None:
    app.before_request(_begin)
    app.after_request(_answer)
    app.teardown_request(_end)


def _begin() -> None:
    given = request.headers.get(HEADER, "")
    value = given if SANE.fullmatch(given) else uuid.uuid4().hex
    request.environ["greenflask.request_id"] = value
    request.environ["greenflask.request_id_token"] = logs.request_id.set(value)
    setattr(getcurrent(), ATTRIBUTE, value)


def _answer(response):
    value = request.environ.get("greenflask.request_id")
    if value:
        response.headers[HEADER] = value
    return response


def _end(error: BaseException | None = None) -> None:
    token = request.environ.pop("greenflask.request_id_token", None)
    if token is not None:
        logs.request_id.reset(token)
