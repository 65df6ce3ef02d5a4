"""db.py and greenflask/engine.py in this process, against the real database: wait callback choice, engine per
process, read-only sessions handing their connection back transactional."""

import dataclasses
import os

import psycopg2.errors
import psycopg2.extensions
import pytest
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session

import db
import models
from app import create_app
from greenflask import embedded, green
from greenflask.settings import Settings


def settings_for(database_url: str, **changes) -> Settings:
    return dataclasses.replace(Settings.from_env(), database_url=database_url, **changes)


@pytest.fixture
def app(database_url):
    """An app on the test database with a pool of one, as the factory makes it."""
    app = create_app(settings_for(database_url, pool_size=1))
    yield app
    db.engines(app).dispose()
    psycopg2.extensions.set_wait_callback(None)


@pytest.fixture
def app_engine(app):
    return db.engines(app).primary


@pytest.mark.parametrize(("mode", "installed"), [("auto", False), ("on", True), ("off", False)])
def test_wait_callback_follows_gevent_patching(mode, installed):
    assert not green.socket_is_green(), "pytest does not monkey-patch"
    try:
        assert green.choose(settings_for(None, psycogreen=mode)) is installed
        assert (psycopg2.extensions.get_wait_callback() is not None) is installed
    finally:
        psycopg2.extensions.set_wait_callback(None)


def test_engine_is_made_again_after_fork(app, app_engine):
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: a new engine, and a working connection of its own
        try:
            fresh = db.engines(app).primary
            with fresh.connect() as conn:
                ok = fresh is not app_engine and conn.scalar(text("SELECT 1")) == 1
            os.write(write_end, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 1)
    os.waitpid(child, 0)
    assert answer == b"1"
    assert db.engines(app).primary is app_engine, "the parent keeps its own"


def test_read_only_session_returns_its_connection_transactional(app, app_engine):
    with app.app_context():
        session = db.read_session()
        session.execute(text("SELECT 1"))
        assert session.connection().connection.driver_connection.autocommit is True
        db.close_session()
    with app_engine.connect() as conn:  # pool of one: the same connection
        assert conn.connection.driver_connection.autocommit is False
        conn.execute(text("SELECT 1"))
        assert conn.scalar(text("SELECT now() = statement_timestamp()")) is False, "inside a transaction"


def test_write_session_commits_once_or_rolls_back(app, app_engine, seeded):
    with app.app_context():
        session = db.write_session()
        session.execute(text("UPDATE todos SET title = 'not committed' WHERE id = 1"))
        db.close_session()  # teardown without commit
    with Session(app_engine) as check:
        assert check.scalar(text("SELECT title FROM todos WHERE id = 1")) != "not committed"


def test_several_processes_starting_the_embedded_server_at_once_share_one(tmp_path):
    """Workers booting together must not run initdb twice or start two servers."""
    import subprocess
    import sys

    from conftest import ROOT

    pgdata = tmp_path / "pgdata"
    script = f"from greenflask import embedded; import pathlib; print(embedded.start(pathlib.Path({str(pgdata)!r})))"
    starters = [
        subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(4)
    ]
    try:
        urls = {starter.communicate(timeout=120)[0].strip() for starter in starters}
        assert all(starter.returncode == 0 for starter in starters)
        assert len(urls) == 1 and urls.pop().startswith("postgresql://")
        postmaster_pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        assert os.path.exists(f"/proc/{postmaster_pid}")
    finally:
        embedded.stop(pgdata)
    assert not (pgdata / "postmaster.pid").exists()


@pytest.mark.parametrize(("first", "then"), [(db.read_session, db.write_session), (db.write_session, db.read_session)])
def test_one_kind_of_session_per_request(app, first, then):
    with app.app_context():
        session = first()
        assert first() is session
        with pytest.raises(RuntimeError, match="already opened a"):
            then()
        db.close_session()


def test_a_read_on_a_terminated_connection_is_retried_on_a_new_one(app, seeded):
    """models' reads run on the DBAPI cursor (engine.fetch), and still get SQLAlchemy's
    disconnect handling: the error is a DBAPIError with connection_invalidated, which
    db.read() retries once on a new connection."""
    with app.app_context():
        first = db.read_session().connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with seeded.connect() as conn:
            assert conn.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": first}) is True
        assert db.read(models.get_todo, 1)["id"] == 1
        second = db.read_session().connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
        db.close_session()
    assert second != first


def test_a_failed_read_is_sqlalchemys_error_and_the_next_works(app, seeded):
    with app.app_context():
        with pytest.raises(ProgrammingError) as raised:
            db.read(models.read_rows, "SELECT * FROM no_such_table")
        assert isinstance(raised.value.orig, psycopg2.errors.UndefinedTable)
        assert not raised.value.connection_invalidated
        db.close_session()
        assert db.read(models.get_todo, 2)["id"] == 2
        db.close_session()
