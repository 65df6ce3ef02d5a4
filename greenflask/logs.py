"""The app's log lines: text by default, one JSON object per line with LOG_FORMAT=json, and
the request's id in every line logged while it runs; driver errors in one line.

JSON lines are written by python-json-logger (the formatter most Python services use) for
the app's own lines, and by `JsonAccessLogger`, a gunicorn logger class, for the access log.
The request id lives in a context variable, which greenlet gives each greenlet its own of.
"""

import logging
from contextvars import ContextVar

from greenflask import requestid

FORMAT = "[%(process)d] [%(levelname)s] %(name)s: %(message)s%(request_suffix)s"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(process)d %(request_id)s"

request_id: ContextVar[str | None] = ContextVar("greenflask_request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Adds the running request's id to every record (None outside a request) unless the
    record names one itself (`extra`: a loop block reported for the request that caused
    it); for text, also ` request_id=ID` to end the line with."""

    def __init__(self, text: bool):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = getattr(record, "request_id", None) or request_id.get()
        if self.text:
            record.request_suffix = f" request_id={record.request_id}" if record.request_id else ""
        return True


def configure(log_format: str = "text") -> None:
    """Log INFO and up to stderr, in `log_format`, unless the process (a test runner,
    gunicorn with its own logging set up) already has handlers."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(JSON_FIELDS, rename_fields={"asctime": "time", "levelname": "level"},
                                           datefmt=TIME_FORMAT))
    else:
        handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RequestIdFilter(text=log_format != "json"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def first_line(error: BaseException) -> str:
    """The driver's message without its SQL context lines, for a one-line log entry."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def json_access_logger():
    """gunicorn's Logger with an access log of one JSON object per request (gunicorn's own
    format string cannot escape what a client sends)."""
    import json
    import time

    from gunicorn import glogging

    class JsonAccessLogger(glogging.Logger):
        def access(self, resp, req, environ, request_time):
            if not self.access_log_enabled:
                return
            atoms = self.atoms(resp, req, environ, request_time)
            self.access_log.info(json.dumps({
                "time": time.strftime(TIME_FORMAT), "remote": atoms["h"], "method": atoms["m"], "path": atoms["U"],
                "query": atoms["q"], "status": int(atoms["s"]), "bytes": atoms["B"],
                "seconds": float(atoms["L"]), "request_id": environ.get(requestid.ENVIRON_KEY),
                "pid": int(atoms["p"].strip("<>")),
            }))

    return JsonAccessLogger
