"""The `todos` table and every query the routes need, always with bound parameters.

The writes are SQLAlchemy Core statements; the reads, on the hot path, are Core statements
compiled once to SQL strings and run on the session's own connection. No ORM objects: the
routes only move rows to JSON, and plain rows skip the identity map and attribute
instrumentation the ORM would pay for on every row. Each function takes the request's
`Session`, so all of them share its connection and, for writes, its one transaction.
"""

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from greenflask.engine import fetch

TITLE_MAX_LENGTH = 60
IDEMPOTENCY_KEY_MAX_LENGTH = 255
PRIORITY_MIN, PRIORITY_MAX = 0, 9
# due_at's years as a client writes them (validation.py); the table's constraint is a day
# wider each side, for the offsets, and keeps every stored value one a Python datetime holds.
DUE_AT_FIRST_YEAR, DUE_AT_LAST_YEAR = 1970, 9998

metadata = MetaData()

todos = Table(
    "todos",
    metadata,
    Column("id", Integer, Identity(), primary_key=True),
    Column("title", String(TITLE_MAX_LENGTH), nullable=False),
    Column("done", Boolean, nullable=False, server_default="false"),
    Column("priority", Integer, nullable=False, server_default="0"),
    # Added by migration 0003 (expand -> deploy -> contract: docs/operations.md).
    Column("due_at", DateTime(timezone=True)),
    CheckConstraint(f"char_length(title) BETWEEN 1 AND {TITLE_MAX_LENGTH}", name="title_length"),
    CheckConstraint(f"priority BETWEEN {PRIORITY_MIN} AND {PRIORITY_MAX}", name="priority_range"),
    CheckConstraint("due_at >= '1969-12-30 00:00+00' AND due_at < '9999-01-03 00:00+00'", name="due_at_range"),
)

# `Idempotency-Key` on POST /todos: the first answer to a key, stored in the transaction
# that made the row, so a client that lost the answer (a failover, a timeout) can send the
# request again and get that answer instead of a second row. `fingerprint` is the request's
# fields: the same key with other fields is refused (IETF draft "The Idempotency-Key HTTP
# Header Field", 422).
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("key", String(IDEMPOTENCY_KEY_MAX_LENGTH), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("status", Integer),
    Column("body", Text),  # the answer's bytes as sent, so a replay is the same answer
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("ix_idempotency_keys_created_at", "created_at"),
)


def _driver_sql(statement) -> str:
    """A Core statement compiled once, at import, to psycopg2's SQL with %(name)s parameters."""
    return str(statement.compile(dialect=postgresql.psycopg2.dialect()))


# The reads are built with Core from the table above, then run as fixed SQL strings by
# `exec_driver_sql`: no statement to compile and no cache key to compute per request
# (BENCHMARKS.md, "Speed"), and the columns are named once, in the table.
_by_id = select(todos).order_by(todos.c.id)
_page = _by_id.limit(bindparam("limit")).offset(bindparam("offset"))
_ALL_SQL = _driver_sql(_by_id)
_PAGE_SQL = _driver_sql(_page)
_PAGE_BY_DONE_SQL = _driver_sql(_page.where(todos.c.done == bindparam("done")))
_ONE_SQL = _driver_sql(select(todos).where(todos.c.id == bindparam("id")))
_SLEEP_SQL = _driver_sql(select(func.pg_sleep(bindparam("seconds"))))


def read_rows(session: Session, sql: str, parameters: dict | None = None) -> list[dict]:
    """Rows as plain dicts for JSON, fetched in one call on the session's connection
    (engine.fetch: no execution context or result object per read)."""
    keys, rows = fetch(session.connection(), sql, parameters or {})
    return [dict(zip(keys, row)) for row in rows]  # noqa: B905 (every row has exactly these keys)


def all_todos(session: Session) -> list[dict]:
    """Every todo by id, as the original demo returned after each sleep."""
    return read_rows(session, _ALL_SQL)


def list_todos(session: Session, limit: int, offset: int, done: bool | None = None) -> list[dict]:
    if done is None:
        return read_rows(session, _PAGE_SQL, {"limit": limit, "offset": offset})
    return read_rows(session, _PAGE_BY_DONE_SQL, {"limit": limit, "offset": offset, "done": done})


def get_todo(session: Session, todo_id: int) -> dict | None:
    rows = read_rows(session, _ONE_SQL, {"id": todo_id})
    return rows[0] if rows else None


def create_todo(session: Session, fields: dict) -> dict:
    row = session.execute(insert(todos).values(**fields).returning(todos)).mappings().one()
    return dict(row)


def claim_idempotency_key(session: Session, key: str, fingerprint: str) -> dict | None:
    """None when this request is the first with `key` (it now holds the key until its
    transaction ends); otherwise what the first one stored: fingerprint, status, body. A
    request with the same key still in flight is waited for (the key's unique index)."""
    claimed = session.execute(
        postgresql.insert(idempotency_keys).values(key=key, fingerprint=fingerprint)
        .on_conflict_do_nothing().returning(idempotency_keys.c.key)
    ).first()
    if claimed:
        return None
    stored = select(idempotency_keys.c.fingerprint, idempotency_keys.c.status, idempotency_keys.c.body)
    return dict(session.execute(stored.where(idempotency_keys.c.key == key)).mappings().one())


def store_answer(session: Session, key: str, status: int, body: str) -> None:
    """The answer to the request that claimed `key`, committed with its work."""
    session.execute(update(idempotency_keys).where(idempotency_keys.c.key == key).values(status=status, body=body))


def update_todo(session: Session, todo_id: int, fields: dict) -> dict | None:
    statement = update(todos).where(todos.c.id == todo_id).values(**fields).returning(todos)
    row = session.execute(statement).mappings().first()
    return dict(row) if row else None


def delete_todo(session: Session, todo_id: int) -> bool:
    deleted = session.execute(delete(todos).where(todos.c.id == todo_id).returning(todos.c.id))
    return deleted.first() is not None


def pg_sleep(session: Session, seconds: float) -> None:
    """Have the server sleep; blocks the worker unless the green wait callback is on."""
    session.connection().exec_driver_sql(_SLEEP_SQL, {"seconds": seconds})


def ping(session: Session) -> None:
    session.connection().exec_driver_sql("SELECT 1")


def expire_idempotency_keys(session: Session, older_than_hours: float, batch: int) -> int:
    """Delete up to `batch` keys stored more than `older_than_hours` ago; return how many.

    The oldest first, by the created_at index. `FOR UPDATE SKIP LOCKED` passes over a key a
    request holds right now, so the deletion never waits for a write and no write waits for
    it longer than one small batch's transaction.
    """
    cutoff = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, older_than_hours * 3600)
    expired = (
        select(idempotency_keys.c.key)
        .where(idempotency_keys.c.created_at < cutoff)
        .order_by(idempotency_keys.c.created_at)
        .limit(batch)
        .with_for_update(skip_locked=True)
    )
    deleted = session.execute(delete(idempotency_keys).where(idempotency_keys.c.key.in_(expired.scalar_subquery())))
    return deleted.rowcount
