"""The cluster's PostgreSQL without Patroni: DATABASE_URL's server or the embedded one (and
its streaming replica); the schema, applied by a release's own seed.py and migrations.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import click
from sqlalchemy.engine import URL, make_url

from deploy import ha
from deploy.credentials import Credentials
from deploy.runtime import CLUSTER_DIR, State, save_state
from greenflask import embedded


def start(state: State, given: str | None) -> URL:
    """`given` (DATABASE_URL's server), or the embedded one (started if needed); the database's URL."""
    if given:
        url = make_url(given)
        state["postgres"] = {"pid": None, "embedded": False, "started": False}
    else:
        was_running = embedded.is_running()
        url = make_url(embedded.ensure_database(embedded.start(), embedded.DATABASE))
        state["postgres"] = {"pid": embedded.server_pid(), "embedded": True, "started": not was_running,
                             "pgdata": str(embedded.pgdata())}
    state["postgres"]["url"] = url.render_as_string(hide_password=True)
    return url


def seed(release: Path, database_url: URL, pgbouncer: bool) -> None:
    """The release's `python seed.py` straight to PostgreSQL: its migrations, its seed rows;
    with PgBouncer it also makes DB_STATEMENT_TIMEOUT the database's own setting (the hosts
    cannot send it)."""
    run_in_release(release, [sys.executable, "seed.py"], database_url, {"DB_PGBOUNCER": "1" if pgbouncer else "0"})


def run_in_release(release: Path, command: list[str], database_url: URL, env: dict | None = None) -> str:
    """`command` in the release's folder with DATABASE_URL set; its output (stderr first)."""
    env = {**os.environ, "DATABASE_URL": database_url.render_as_string(hide_password=False), **(env or {})}
    done = subprocess.run(command, cwd=release, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise click.ClickException(f"{' '.join(command[1:])} failed in {release}: {done.stderr.strip()[-2000:]}")
    return done.stderr + done.stdout


def schema_url(state: State, given: str | None) -> URL:
    """Where migrations go: straight to PostgreSQL (with --ha, the primary through the
    database side's HAProxy), never through PgBouncer (migrations/env.py says why). Made
    again from the state's parts: the state file holds no password."""
    if state.get("ha"):
        return ha.superuser_url(state, Credentials(CLUSTER_DIR)).set(database=embedded.DATABASE)
    if state["postgres"]["embedded"]:
        return make_url(embedded.ensure_database(embedded.start(), embedded.DATABASE))
    if given:
        return make_url(given)
    raise click.ClickException("the cluster's PostgreSQL is DATABASE_URL's: set it again to migrate")


def migrate_schema(state: State, release: Path, given: str | None, revision: str = "head") -> None:
    """`alembic upgrade REVISION` of the release's migrations on the cluster's database."""
    started = time.monotonic()
    output = run_in_release(release, [sys.executable, "-m", "alembic", "upgrade", revision], schema_url(state, given))
    steps = [line.split("Running upgrade ", 1)[1].split(",")[0] for line in output.splitlines()
             if "Running upgrade " in line]
    click.echo(f"schema: alembic upgrade {revision} from {release}: {', '.join(steps) or 'already there'} "
               f"in {time.monotonic() - started:.2f} s")


def start_replica(state: State, primary: URL) -> URL:
    """A streaming replica of the embedded primary, in CLUSTER_DIR/replica; its URL."""
    folder = CLUSTER_DIR / "replica"
    url = make_url(embedded.start_replica(primary.render_as_string(hide_password=False), folder))
    state["replica"] = {"pid": embedded.server_pid(folder), "pgdata": str(folder)}
    save_state(state)
    return url
