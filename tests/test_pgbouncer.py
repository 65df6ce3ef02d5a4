"""The app behind a real PgBouncer in transaction pooling mode (Debian's `pgbouncer`), configured as
the cluster configures it: the app's own role, SCRAM-SHA-256, TLS checked with verify-full.

PgBouncer refuses to run as root: as root it is started with `-u` as the user that owns the
database's socket folder (the embedded server) or `postgres`. It is stopped by its PID.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import assert_error, burst, not_installed, program
from sqlalchemy import text
from sqlalchemy.engine import make_url

from deploy import credentials
from deploy import pgbouncer as pgbouncer_part
from deploy.credentials import Credentials
from greenflask import PROJECT_DIR, embedded, servers
from greenflask.settings import Settings

PGBOUNCER = program("pgbouncer")
DATABASE = "greenflask_pgbouncer"
POOL_SIZE = 10
pytestmark = pytest.mark.skipif(not PGBOUNCER, reason=str(not_installed("pgbouncer")))


@pytest.fixture(scope="module")
def pgbouncer(database_url):
    """PgBouncer (pool_mode = transaction, default_pool_size 10) in front of the test server,
    for a database of its own; yields the app's URL through it."""
    server_url = make_url(database_url)
    db_url = embedded.ensure_database(database_url, DATABASE)
    engine = embedded.script_engine(db_url)
    # Straight to the server, before PgBouncer opens server connections: a database setting
    # applies to the sessions opened after it.
    seeded = run_seed({"DATABASE_URL": db_url, "DB_PGBOUNCER": "1", "DB_STATEMENT_TIMEOUT": "500"})
    assert seeded.returncode == 0, seeded.stderr
    assert "statement_timeout 500 ms set on database greenflask_pgbouncer" in seeded.stdout
    # Not pytest's tmp_path: its parents are private to root, and PgBouncer runs as another user.
    folder = Path(tempfile.mkdtemp(prefix="greenflask-pgbouncer-"))
    folder.chmod(0o755)
    port = servers.free_port()
    server = server_url.set(database=DATABASE)
    run_as = pgbouncer_part.run_as_user(server)
    # As the cluster does it: the app's role, SCRAM secrets, a certificate for 127.0.0.1, and
    # deploy/pgbouncer.ini, the cluster's own template, with a pool of 10 on 127.0.0.1.
    files = Credentials(folder)
    app, secret = pgbouncer_part.make_app_role(server, files)
    credentials.make_certificates(files, {"pgbouncer": ["127.0.0.1"]}, run_as)
    pgbouncer_part.write_pgbouncer_secrets(files, app, secret, run_as)
    host, database = app.query.get("host") or app.host or "127.0.0.1", app.database  # a socket, or DATABASE_URL's
    (folder / "pgbouncer.ini").write_text(pgbouncer_part.config(
        [f"{database} = host={host} port={app.port or 5432} dbname={database}"], "127.0.0.1", port,
        str(files.auth_file), str(files.cert("pgbouncer")), str(files.key("pgbouncer")), str(files.ca_cert),
        "disable", Settings.from_env().statement_timeout_ms, POOL_SIZE, 500, ""))
    command = [PGBOUNCER, str(folder / "pgbouncer.ini")]
    if run_as:
        command[1:1] = ["-u", run_as]
    process = servers.spawn(command, folder / "pgbouncer.log")  # PgBouncer logs to stderr
    url = app.set(host="127.0.0.1", port=port, query={"sslmode": "verify-full", "sslrootcert": str(files.ca_cert)})
    try:
        servers.wait_until(lambda: servers.port_open("127.0.0.1", port) or process.poll() is not None, "PgBouncer")
        assert process.poll() is None, (folder / "pgbouncer.log").read_text()
        yield url.render_as_string(hide_password=False), folder / "pgbouncer.log", str(files.app_passfile)
    finally:
        servers.stop(process.pid, grace=10)
        with engine.connect() as conn:
            conn.execute(text(f"ALTER DATABASE {DATABASE} RESET statement_timeout"))
            conn.commit()
        engine.dispose()
        shutil.rmtree(folder, ignore_errors=True)


def run_seed(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "seed.py", "--reset"], cwd=PROJECT_DIR,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def test_without_the_setting_pgbouncer_refuses_the_startup_options(start_server, pgbouncer):
    url, log, passfile = pgbouncer
    server = start_server("-k", "gevent", database=url, env={"DB_POOL_SIZE": "5", "PGPASSFILE": passfile})
    try:
        answer = server.get("/todos")
    finally:
        server.stop()
    assert_error(answer, 503, "database_unavailable")
    assert "unsupported startup parameter: options" in log.read_text()


def test_behind_pgbouncer_with_db_pgbouncer_1(start_server, pgbouncer, figure):
    url, _, passfile = pgbouncer
    env = {"DB_PGBOUNCER": "1", "DB_STATEMENT_TIMEOUT": "500", "DB_POOL_SIZE": "30", "PGPASSFILE": passfile}
    server = start_server("-k", "gevent", database=url, env=env)
    try:
        todos = server.get("/todos")
        slow = server.get("/sleep/postgres/?seconds=2")
        outcomes, wall = burst(server.url("/sleep/postgres/?seconds=0.3"), 30)
        after = server.get("/todos")
    finally:
        server.stop()
    assert "statement timeout differs" not in server.log()
    assert todos.status == 200 and len(todos.json()["todos"]) == 50
    assert_error(slow, 504, "statement_timeout")
    assert "canceling statement due to statement timeout" in server.log(), "the server's own timeout answered"
    assert [outcome.status for outcome in outcomes] == [200] * 30
    # 30 sleeps of 0.3 s through 10 server connections: three waves, about 0.9 s.
    assert 0.8 < wall < 2.5, f"{wall:.2f} s"
    assert after.status == 200
    figure(f"behind PgBouncer (transaction mode, pool {POOL_SIZE}): /todos 200; statement_timeout 500 ms from the "
           f"database setting answered 504; 30 x pg_sleep(0.3) in {wall:.2f} s (waves of the PgBouncer pool)")
