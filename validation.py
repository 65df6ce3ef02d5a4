"""Turn query strings and JSON bodies into checked values, or raise a 400 ApiError."""

import math
import re
from datetime import UTC, datetime

from flask import Request
from werkzeug.exceptions import RequestEntityTooLarge

from errors import ApiError, not_found
from models import (
    DUE_AT_FIRST_YEAR,
    DUE_AT_LAST_YEAR,
    IDEMPOTENCY_KEY_MAX_LENGTH,
    PRIORITY_MAX,
    PRIORITY_MIN,
    TITLE_MAX_LENGTH,
)

DEFAULT_SLEEP_SECONDS = 5.0
DEFAULT_PAGE_LIMIT = 100
MAX_PAGE_LIMIT = 1000
INT_MAX = 2**31 - 1
TODO_FIELDS = {"title", "done", "priority", "due_at"}
_BOOLEANS = {"true": True, "false": False}
# A JSON number, in ASCII: float() alone would also take "1_0", " 5", "nan" and "٥".
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
# RFC 3339's date-time (JSON Schema's format "date-time"): an offset always, ASCII digits.
_DATE_TIME = re.compile(
    r"([0-9]{4})-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def sleep_seconds(args, maximum: float) -> float:
    """`?seconds=S`: a number from 0 to `maximum`; 5 when absent, as in the original (or
    `maximum` when that is lower)."""
    raw = args.get("seconds")
    if raw is None:
        return min(DEFAULT_SLEEP_SECONDS, maximum)
    if not _NUMBER.fullmatch(raw):
        raise bad_request("seconds must be a number")
    seconds = float(raw)
    if not math.isfinite(seconds) or not 0 <= seconds <= maximum:
        raise bad_request(f"seconds must be a finite number from 0 to {maximum:g}")
    return seconds


def _int_arg(args, name: str, default: int, low: int, high: int) -> int:
    raw = args.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > len(str(high)) or not low <= int(raw) <= high:
        raise bad_request(f"{name} must be an integer from {low} to {high}")
    return int(raw)


def page(args) -> tuple[int, int, bool | None]:
    """`?limit=&offset=&done=` for GET /todos."""
    limit = _int_arg(args, "limit", DEFAULT_PAGE_LIMIT, 1, MAX_PAGE_LIMIT)
    offset = _int_arg(args, "offset", 0, 0, 10**9)
    raw_done = args.get("done")
    if raw_done is not None and raw_done not in _BOOLEANS:
        raise bad_request("done must be true or false")
    return limit, offset, _BOOLEANS.get(raw_done)


def todo_id(value: int) -> int:
    """Path ids beyond PostgreSQL's integer are simply absent, not an error of the server.

    Not werkzeug's `int(max=...)` converter: for PATCH and DELETE its failed match answers
    405 with a wrong Allow header instead of 404.
    """
    if value > INT_MAX:
        raise not_found()
    return value


def json_object(request: Request) -> dict:
    """The body as a JSON object. Flask itself answers 415 for a wrong Content-Type, 413 past
    MAX_CONTENT_LENGTH and 400 for malformed JSON (NaN and Infinity included)."""
    _refuse_long_streamed_body(request)
    try:
        body = request.get_json()
    except RecursionError:  # not a ValueError, so Flask lets it through
        raise bad_request("the JSON body is nested too deeply") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


def _refuse_long_streamed_body(request: Request) -> None:
    """A chunked body (no Content-Length) past MAX_CONTENT_LENGTH answers 413, like one with.

    werkzeug stops reading such a body at the limit instead of refusing it, so the JSON
    parser would see a truncated document and answer 400. One more byte read from the
    server's stream after the limit tells the two apart.
    """
    limit = request.max_content_length
    if request.content_length is not None or limit is None:
        return
    if len(request.get_data(cache=True)) >= limit and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()


def idempotency_key(headers) -> str | None:
    """The `Idempotency-Key` header: 1 to 255 visible ASCII characters, or absent."""
    key = headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX_LENGTH or not all("!" <= c <= "~" for c in key):
        raise bad_request(f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX_LENGTH} visible ASCII characters")
    return key


def todo_fields(body: dict, partial: bool) -> dict:
    """Check a todo body: title 1-60 chars, done a boolean, priority an integer 0-9, due_at
    an RFC 3339 date-time (years 1970-9998) or null.

    For POST (partial=False) title is required; for PATCH at least one field is.
    """
    unknown = set(body) - TODO_FIELDS
    if unknown:
        raise bad_request(f"unknown fields: {', '.join(sorted(map(str, unknown)))[:100]}")
    if not partial and "title" not in body:
        raise bad_request("title is required")
    if partial and not body:
        raise bad_request("send at least one of title, done, priority, due_at")
    if "title" in body:
        title = body["title"]
        if not isinstance(title, str) or not 1 <= len(title) <= TITLE_MAX_LENGTH or not _storable(title):
            raise bad_request(f"title must be a string of 1 to {TITLE_MAX_LENGTH} characters")
    if "done" in body and not isinstance(body["done"], bool):
        raise bad_request("done must be true or false")
    if "priority" in body:
        priority = body["priority"]
        # JSON has one number type: 3.0 is the integer 3 (JSON Schema's "integer" says so too).
        if isinstance(priority, float) and priority.is_integer():
            priority = int(priority)
        if isinstance(priority, bool) or not isinstance(priority, int) or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
            raise bad_request(f"priority must be an integer from {PRIORITY_MIN} to {PRIORITY_MAX}")
        body = {**body, "priority": priority}
    if "due_at" in body and body["due_at"] is not None:
        body = {**body, "due_at": _date_time(body["due_at"])}
    return dict(body)


def _date_time(value) -> datetime:
    due = (f"due_at must be null or an RFC 3339 date-time with an offset, "
           f"years {DUE_AT_FIRST_YEAR} to {DUE_AT_LAST_YEAR}")
    match = _DATE_TIME.fullmatch(value) if isinstance(value, str) else None
    if not match or not DUE_AT_FIRST_YEAR <= int(match.group(1)) <= DUE_AT_LAST_YEAR:
        raise bad_request(due)
    try:
        # In UTC: RFC 3339 allows offsets to 23:59, PostgreSQL takes them only to 15:59.
        return datetime.fromisoformat(value.upper().replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:  # a day, an hour or an offset out of range (leap seconds included)
        raise bad_request(due) from None


def _storable(text: str) -> bool:
    """PostgreSQL text takes neither NUL nor lone surrogates (valid in JSON, not in UTF-8)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
