"""Migrate the schema and ensure the original demo's todos: `python seed.py [--reset] [--count N]`.

The schema comes from Alembic's migrations (`alembic upgrade head`, migrations/). The seed
todos have fixed ids 1..N, so running it twice leaves N rows, not 2N.
"""

import sys
from pathlib import Path

import click
from alembic import command
from alembic.config import Config
from sqlalchemy import func, inspect, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from greenflask import embedded
from greenflask.logs import first_line
from greenflask.settings import Settings
from models import todos

ALEMBIC_INI = Path(__file__).resolve().parent / "alembic.ini"
BASELINE = "0001"


def original_todos(count: int) -> list[dict]:
    """The 2013 demo's rows (its titles reworded), ids fixed so seeding is idempotent."""
    return [
        {"id": i + 1, "title": f"Work for the man {i}", "done": i % 2 == 0, "priority": i % 5}
        for i in range(count)
    ]


def alembic_config(connection=None) -> Config:
    """alembic.ini's settings; with `connection`, migrations/env.py runs on it."""
    config = Config(ALEMBIC_INI)
    config.attributes["connection"] = connection
    return config


def migrate(engine: Engine, revision: str = "head") -> None:
    """`alembic upgrade <revision>` on `engine`'s database.

    A database that `create_all` made before there were migrations (it has `todos` and no
    `alembic_version`) is stamped at the baseline first, so it is adopted, not rebuilt.
    """
    with engine.connect() as connection:
        tables = inspect(connection).get_table_names()
        if "todos" in tables and "alembic_version" not in tables:
            command.stamp(alembic_config(connection), BASELINE)
        command.upgrade(alembic_config(connection), revision)
        connection.commit()


def seed(engine: Engine, count: int = 50, reset: bool = False) -> int:
    """Migrate the schema to the newest revision and make sure the first `count` seed todos
    exist; return rows inserted. `reset` empties the tables first."""
    migrate(engine)
    with Session(engine) as session:
        if reset:
            session.execute(text("TRUNCATE todos, idempotency_keys RESTART IDENTITY"))
        statement = insert(todos).values(original_todos(count)).on_conflict_do_nothing(index_elements=["id"])
        inserted = session.execute(statement).rowcount if count else 0
        # Explicit ids do not advance the identity sequence; move it past them.
        session.execute(
            text("SELECT setval(pg_get_serial_sequence('todos', 'id'), GREATEST((SELECT max(id) FROM todos), 1))")
        )
        session.commit()
    return inserted


def set_statement_timeout(engine: Engine, milliseconds: int) -> str:
    """Make DB_STATEMENT_TIMEOUT the database's own default (for DB_PGBOUNCER=1, where the app
    cannot send it at connect). It applies to sessions opened afterwards: run this before
    PgBouncer opens its server connections, or RECONNECT them. Returns the database's name."""
    with engine.connect() as conn:
        database = conn.scalar(text("SELECT current_database()"))
        quoted = engine.dialect.identifier_preparer.quote(database)
        conn.execute(text(f"ALTER DATABASE {quoted} SET statement_timeout = {int(milliseconds)}"))
        conn.commit()
    return database


@click.command()
@click.option("--reset", is_flag=True, help="Empty the tables (todos and idempotency keys) first.")
@click.option("--count", default=50, show_default=True, type=click.IntRange(0, 100_000), help="Seed todos to ensure.")
def main(reset: bool, count: int) -> None:
    """Migrate the schema (alembic upgrade head) and make sure the seed todos exist."""
    settings = Settings.from_env()
    try:
        url = embedded.database_url(settings)
        engine = embedded.script_engine(url)
        inserted = seed(engine, count=count, reset=reset)
        if settings.pgbouncer:
            database = set_statement_timeout(engine, settings.statement_timeout_ms)
            click.echo(f"statement_timeout {settings.statement_timeout_ms} ms set on database {database}")
        with engine.connect() as conn:
            total = conn.scalar(select(func.count()).select_from(todos))
    except (SQLAlchemyError, OSError) as error:
        click.echo(f"seed.py: cannot reach the database: {first_line(getattr(error, 'orig', None) or error)}", err=True)
        sys.exit(1)
    where = make_url(url).render_as_string(hide_password=True)
    action = "reset and seeded" if reset else "seeded"
    click.echo(f"{action} {where}: {inserted} todos inserted, {total} in the table")


if __name__ == "__main__":
    main()
