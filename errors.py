"""Every failure is an answer: one JSON shape, the right status, logged once.

    {"error": {"status": 503, "code": "pool_exhausted", "message": "..."}}

No SQL text or stack trace ever reaches a client; the log gets the detail instead.
"""

import logging

from flask import Flask, jsonify
from psycopg2 import errors as pg_errors
from sqlalchemy import exc as sa_exc
from werkzeug.exceptions import HTTPException

from greenflask import health, metrics
from greenflask.green import DatabaseTimeout
from greenflask.logs import first_line

log = logging.getLogger("greenflask.errors")

RETRY_AFTER_SECONDS = 1


class ApiError(Exception):
    """An error the client can fix or retry; raised by validation and routes."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def not_found() -> ApiError:
    return ApiError(404, "not_found", "no such todo")


def error_response(status: int, code: str, message: str, retry_after: int | None = None):
    response = jsonify(error={"status": status, "code": code, "message": message})
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def _api_error(error: ApiError):
    return error_response(error.status, error.code, error.message)


def _http_error(error: HTTPException):
    """Werkzeug's own errors (404, 405, 413, 415, malformed JSON's 400) in the JSON shape,
    keeping their headers: a 405 names the methods it allows (RFC 9110, 15.5.6)."""
    code = (error.name or "error").lower().replace(" ", "_")
    response = error_response(error.code or 500, code, error.description or error.name)
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def _pool_timeout(error: sa_exc.TimeoutError):
    metrics.POOL_TIMEOUTS.inc()
    log.warning("503 pool_exhausted: %s", error.args[0].split(",")[0])
    return error_response(
        503, "pool_exhausted", "all database connections are busy; retry shortly", RETRY_AFTER_SECONDS
    )


def _statement_timeout(cause: str):
    metrics.DB_ERRORS.labels("statement_timeout").inc()
    log.warning("504 statement_timeout: %s", cause)
    return error_response(504, "statement_timeout", "the database took too long to answer", RETRY_AFTER_SECONDS)


def _database_unavailable(cause: str):
    metrics.DB_ERRORS.labels("unavailable").inc()
    log.warning("503 database_unavailable: %s", cause)
    return error_response(
        503, "database_unavailable", "the database cannot be reached; retry shortly", RETRY_AFTER_SECONDS
    )


def _database_error(error: sa_exc.DBAPIError):
    """A statement too slow (the server's statement_timeout, or the worker's bound on a
    statement) -> 504; connecting, the liveness check or a lost connection -> 503."""
    cause = first_line(error.orig)
    if isinstance(error.orig, DatabaseTimeout):
        health.note_failure()
        if error.orig.phase == "statement":
            return _statement_timeout(f"{cause} (bound in the worker)")
        return _database_unavailable(f"{cause} (bound in the worker)")
    if isinstance(error.orig, pg_errors.QueryCanceled):
        return _statement_timeout(cause)
    if isinstance(error.orig, pg_errors.ReadOnlySqlTransaction):
        # A write reached a server that is (now) a replica: the primary moved (a failover
        # or switchover) and the balancer has not yet seen it. Retrying soon works.
        return _database_unavailable(cause)
    if isinstance(error, sa_exc.OperationalError) or error.connection_invalidated:
        health.note_failure()
        return _database_unavailable(cause)
    return _unexpected(error)


def _unexpected(error: Exception):
    log.exception("500 internal_error")
    return error_response(500, "internal_error", "the server failed to answer; see its log")


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(sa_exc.TimeoutError, _pool_timeout)
    app.register_error_handler(sa_exc.DBAPIError, _database_error)
    app.register_error_handler(Exception, _unexpected)
