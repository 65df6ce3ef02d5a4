"""The `todos` table and every query the routes need, in SQLAlchemy Core with bound parameters.

Core rather than ORM objects: the routes only move rows to JSON, and Core rows skip the
identity map and attribute instrumentation that the ORM would pay for on every row.
Each function takes the request's `Session`, so all of them share its one transaction.
"""

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    Identity,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    delete,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

TITLE_MAX_LENGTH = 60
PRIORITY_MIN, PRIORITY_MAX = 0, 9

metadata = MetaData()

todos = Table(
    "todos",
    metadata,
    Column("id", Integer, Identity(), primary_key=True),
    Column("title", String(TITLE_MAX_LENGTH), nullable=False),
    Column("done", Boolean, nullable=False, server_default="false"),
    Column("priority", Integer, nullable=False, server_default="0"),
    CheckConstraint(f"char_length(title) BETWEEN 1 AND {TITLE_MAX_LENGTH}", name="title_length"),
    CheckConstraint(f"priority BETWEEN {PRIORITY_MIN} AND {PRIORITY_MAX}", name="priority_range"),
)

_all_todos = select(todos).order_by(todos.c.id)


def _dicts(result) -> list[dict]:
    """Rows as plain dicts for JSON, fetched in one call. Every row has exactly these keys
    (zip() without strict=: see BENCHMARKS.md)."""
    keys = tuple(result.keys())
    return [dict(zip(keys, row)) for row in result.all()]  # noqa: B905


def all_todos(session: Session) -> list[dict]:
    """Every todo by id, as the original demo returned after each sleep."""
    return _dicts(session.execute(_all_todos))


# Built once: limit, offset and done are bound parameters, so per request nothing is rebuilt.
_page = select(todos).order_by(todos.c.id).limit(bindparam("limit")).offset(bindparam("offset"))
_page_by_done = _page.where(todos.c.done == bindparam("done"))


def list_todos(session: Session, limit: int, offset: int, done: bool | None = None) -> list[dict]:
    parameters = {"limit": limit, "offset": offset}
    if done is None:
        return _dicts(session.execute(_page, parameters))
    return _dicts(session.execute(_page_by_done, {**parameters, "done": done}))


def get_todo(session: Session, todo_id: int) -> dict | None:
    row = session.execute(select(todos).where(todos.c.id == todo_id)).mappings().first()
    return dict(row) if row else None


def create_todo(session: Session, fields: dict) -> dict:
    row = session.execute(insert(todos).values(**fields).returning(todos)).mappings().one()
    return dict(row)


def update_todo(session: Session, todo_id: int, fields: dict) -> dict | None:
    statement = update(todos).where(todos.c.id == todo_id).values(**fields).returning(todos)
    row = session.execute(statement).mappings().first()
    return dict(row) if row else None


def delete_todo(session: Session, todo_id: int) -> bool:
    deleted = session.execute(delete(todos).where(todos.c.id == todo_id).returning(todos.c.id))
    return deleted.first() is not None


def pg_sleep(session: Session, seconds: float) -> None:
    """Have the server sleep; blocks the worker unless the green wait callback is on."""
    session.execute(text("SELECT pg_sleep(:seconds)"), {"seconds": seconds})


def ping(session: Session) -> None:
    session.execute(text("SELECT 1"))
