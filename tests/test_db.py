"""db.py in this process, against the real database: wait callback choice, engine per
process, read-only sessions handing their connection back transactional."""

import os

import psycopg2.extensions
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

import db
from app import create_app


@pytest.fixture
def app_engine(database_url, monkeypatch):
    """db.get_engine() for this test process, pointed at the test database, pool of one."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("DB_POOL_SIZE", "1")
    monkeypatch.setattr(db, "_engine", None)
    engine = db.get_engine()
    yield engine
    engine.dispose()
    psycopg2.extensions.set_wait_callback(None)


def test_wait_callback_follows_gevent_patching():
    assert not db.socket_is_green(), "pytest does not monkey-patch"
    try:
        assert db.install_wait_callback("auto") is False
        assert psycopg2.extensions.get_wait_callback() is None
        assert db.install_wait_callback("on") is True
        assert psycopg2.extensions.get_wait_callback() is not None
        assert db.install_wait_callback("off") is False
        assert psycopg2.extensions.get_wait_callback() is None
    finally:
        psycopg2.extensions.set_wait_callback(None)


def test_engine_is_made_again_after_fork(app_engine):
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: a new engine, and a working connection of its own
        try:
            fresh = db.get_engine()
            with fresh.connect() as conn:
                ok = fresh is not app_engine and conn.scalar(text("SELECT 1")) == 1
            os.write(write_end, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 1)
    os.waitpid(child, 0)
    assert answer == b"1"
    assert db.get_engine() is app_engine, "the parent keeps its own"


def test_read_only_session_returns_its_connection_transactional(app_engine):
    app = create_app()
    with app.app_context():
        session = db.get_session(read_only=True)
        session.execute(text("SELECT 1"))
        assert session.connection().connection.driver_connection.autocommit is True
        db.close_session()
    with app_engine.connect() as conn:  # pool of one: the same connection
        assert conn.connection.driver_connection.autocommit is False
        conn.execute(text("SELECT 1"))
        assert conn.scalar(text("SELECT now() = statement_timestamp()")) is False, "inside a transaction"


def test_write_session_commits_once_or_rolls_back(app_engine, seeded):
    app = create_app()
    with app.app_context():
        session = db.get_session()
        session.execute(text("UPDATE todos SET title = 'not committed' WHERE id = 1"))
        db.close_session()  # teardown without commit
    with Session(app_engine) as check:
        assert check.scalar(text("SELECT title FROM todos WHERE id = 1")) != "not committed"
