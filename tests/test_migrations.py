"""The schema as Alembic revisions: from empty to head and back, one head, the models equal
to the migrations, a database made by the old `create_all` adopted, and a migration that
waits for a lock gives up instead of holding every query behind it."""


import time

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import inspect, text
from sqlalchemy.exc import OperationalError

import seed
from greenflask import embedded

SCRATCH_DATABASE = "greenflask_migrations"


@pytest.fixture
def scratch(database_url):
    """An empty database of its own on the tests' server, dropped after."""
    server = embedded.make_url(database_url).set(database="postgres")
    admin = embedded.script_engine(server.render_as_string(hide_password=False), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {SCRATCH_DATABASE} WITH (FORCE)"))
        conn.execute(text(f"CREATE DATABASE {SCRATCH_DATABASE}"))
    engine = embedded.script_engine(server.set(database=SCRATCH_DATABASE).render_as_string(hide_password=False))
    yield engine
    engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {SCRATCH_DATABASE} WITH (FORCE)"))
    admin.dispose()


def tables(engine) -> set[str]:
    with engine.connect() as conn:
        return set(inspect(conn).get_table_names())


def revision(engine) -> str | None:
    with engine.connect() as conn:
        if "alembic_version" not in inspect(conn).get_table_names():
            return None
        return conn.scalar(text("SELECT version_num FROM alembic_version"))


def alembic(engine, name: str, *args) -> None:
    with engine.connect() as conn:
        getattr(command, name)(seed.alembic_config(conn), *args)
        conn.commit()


def head() -> str:
    return ScriptDirectory.from_config(seed.alembic_config()).get_current_head()


def test_one_head():
    assert len(ScriptDirectory.from_config(seed.alembic_config()).get_heads()) == 1


def test_upgrade_from_empty_then_down_to_base_and_back(scratch):
    assert tables(scratch) == set()
    seed.migrate(scratch)
    assert {"todos", "idempotency_keys", "alembic_version"} <= tables(scratch)
    assert revision(scratch) == head()
    alembic(scratch, "downgrade", "base")
    assert tables(scratch) == {"alembic_version"}
    seed.migrate(scratch)
    assert revision(scratch) == head()
    assert seed.seed(scratch, count=5) == 5


def test_the_models_match_the_migrations(scratch):
    seed.migrate(scratch)
    alembic(scratch, "check")  # raises when an autogenerate would find a difference


def test_alembic_check_sees_a_difference(scratch):
    """The check can fail: a schema of only the baseline, stamped as head, lacks what the
    models declare."""
    seed.migrate(scratch, "0001")
    alembic(scratch, "stamp", "head")
    with pytest.raises(CommandError, match="New upgrade operations detected"):
        alembic(scratch, "check")


def test_a_database_made_by_create_all_is_adopted(scratch):
    """What the old seed.py left (the baseline's tables, rows, no alembic_version) is stamped
    at the baseline and upgraded; its rows stay."""
    seed.migrate(scratch, "0001")
    with scratch.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(text("INSERT INTO todos (title) VALUES ('made before migrations')"))
    seed.migrate(scratch)
    assert revision(scratch) == head()
    with scratch.connect() as conn:
        assert conn.scalar(text("SELECT title FROM todos")) == "made before migrations"


def test_a_migration_waiting_for_a_lock_gives_up(scratch):
    """0003's ALTER TABLE needs ACCESS EXCLUSIVE; behind a transaction that read todos and
    stays open it waits MIGRATION_LOCK_TIMEOUT (3 s), not for ever, and fails with nothing
    changed (every query queued behind it would have waited as long). Once the reader is
    gone it runs."""
    seed.migrate(scratch, "0002")
    with scratch.connect() as reader:
        reader.execute(text("SELECT count(*) FROM todos"))  # holds ACCESS SHARE until it ends
        started = time.monotonic()
        with pytest.raises(OperationalError, match="lock timeout"):
            seed.migrate(scratch)
        waited = time.monotonic() - started
        reader.rollback()
    assert revision(scratch) == "0002"
    assert 2.5 < waited < 30, waited
    seed.migrate(scratch)
    assert revision(scratch) == head()
