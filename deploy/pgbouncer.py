"""PgBouncer in front of PostgreSQL (deploy/pgbouncer.ini): its config for the render and the
cluster, its secrets (SCRAM secrets in auth_file, never a password), its admin console.
"""

import os
import pwd
from pathlib import Path
from string import Template

import click
from sqlalchemy.engine import URL

from deploy import credentials, units
from deploy.credentials import ADMIN_USER, APP_ROLE, Credentials
from deploy.haproxy import host_port, render_database_router
from deploy.inventory import Inventory, PgBouncer, Postgres
from deploy.layout import Layout, Need, Rendered
from deploy.runtime import DEPLOY_DIR, State, log_tail, run_unit, save_state, wait_for
from greenflask import servers, sizing

EXECUTABLE = "/usr/sbin/pgbouncer"
PORT = 6432
CA = "the deployment's CA certificate (ca.crt)"


def config(databases: list[str], listen_addr: str, listen_port: int, auth_file: str, cert_file: str, key_file: str,
           ca_file: str, server_tls_sslmode: str, statement_timeout_ms: int, pool_size: int, max_client_conn: int,
           unix_socket_dir: str) -> str:
    """deploy/pgbouncer.ini with these values. A client waits for a server connection at most
    half the statement bound (1..30 s): "no server" answers 503, never the statement's 504."""
    return Template((DEPLOY_DIR / "pgbouncer.ini").read_text()).substitute(
        databases="\n".join(databases), listen_addr=listen_addr, listen_port=listen_port, auth_file=auth_file,
        admin_user=ADMIN_USER, tls_cert_file=cert_file, tls_key_file=key_file,
        server_tls_sslmode=server_tls_sslmode, ca_file=ca_file,
        query_wait_timeout=max(1, min(30, statement_timeout_ms // 2000)), pool_size=pool_size,
        max_client_conn=max_client_conn, unix_socket_dir=unix_socket_dir)


def render(inventory: Inventory, layout: Layout) -> Rendered:
    """PgBouncer's host: PgBouncer, its exporter, and with db_nodes the database's HAProxy."""
    pool, app = inventory.pgbouncer, inventory.app
    host = Rendered(pool.name)
    if inventory.db_nodes:
        databases = [f"greenflask = host={pool.address} port={pool.primary_port} dbname=greenflask",
                     f"greenflask_replica = host={pool.address} port={pool.replicas_port} dbname=greenflask"]
        server_tls = "verify-full"
        render_database_router(inventory, layout, host)
    else:
        server = inventory.postgres
        databases = [server_line("greenflask", server)]
        if server.replica is not None:
            databases.append(server_line("greenflask_replica", server.replica))
        local = server.socket_dir or server.address.is_loopback
        server_tls = "disable" if local else "verify-full"
    reads_apart = bool(inventory.db_nodes) or bool(inventory.postgres and inventory.postgres.replica)
    workers = sum(app_host.workers for app_host in inventory.app_hosts)
    clients = sizing.app_connections(1, workers, app.pool_size, app.max_overflow) * (2 if reads_apart else 1)
    paths = {name: layout.path(f"etc/pgbouncer/{name}") for name in
             ("userlist.txt", "tls/pgbouncer.crt", "tls/pgbouncer.key", "tls/ca.crt", "admin.pgpass")}
    ini, run_dir = "etc/pgbouncer/pgbouncer.ini", layout.path("run/pgbouncer")
    host.add(ini, config(databases, str(pool.address), pool.port, paths["userlist.txt"], paths["tls/pgbouncer.crt"],
                         paths["tls/pgbouncer.key"], paths["tls/ca.crt"], server_tls, app.statement_timeout_ms,
                         pool.pool_size, clients + 20, run_dir))
    host.add_unit("pgbouncer.service", units.unit("PgBouncer for the greenflask app hosts", [
        ("Type", "notify"), ("User", pool.user), ("Group", pool.user),
        ("ExecStart", f"{EXECUTABLE} {layout.path(ini)}"),
        # HUP re-reads the ini; SIGINT is PgBouncer's own safe shutdown (it waits for the clients).
        ("ExecReload", "/bin/kill -HUP $MAINPID"), ("KillSignal", "SIGINT"),
        ("RuntimeDirectory", "pgbouncer"), ("LimitNOFILE", "65536"), ("Restart", "always"), *units.BASELINE]))
    host.add_unit("greenflask-pgbouncer-exporter.service", units.unit(
        "PgBouncer's pools for Prometheus (deploy/pgbouncer_exporter.py)", [
            ("User", pool.user), ("WorkingDirectory", str(layout.prefix)),
            ("ExecStart", f"{layout.program('python')} -m deploy.pgbouncer_exporter "
                          f"--listen {host_port(pool.address, pool.exporter_port)} "
                          f"--pgbouncer {host_port(pool.address, pool.port)} --passfile {paths['admin.pgpass']} "
                          f"--ca {paths['tls/ca.crt']}"),
            ("Restart", "always"), *units.BASELINE], after=("pgbouncer.service",)))
    host.needs += [
        Need(paths["userlist.txt"], f'its auth_file: "{APP_ROLE}" and "{ADMIN_USER}" with their SCRAM secrets',
             owner=pool.user, kind="auth_file"),
        Need(paths["tls/pgbouncer.crt"], f"its certificate, naming {pool.address}", 0o644, pool.user,
             "cert:pgbouncer"),
        Need(paths["tls/pgbouncer.key"], "its certificate's key", owner=pool.user, kind="key:pgbouncer"),
        Need(paths["tls/ca.crt"], CA, 0o644, pool.user, "ca"),
        Need(paths["admin.pgpass"], f"a passfile of {ADMIN_USER}, for the exporter", owner=pool.user,
             kind="admin_passfile"),
        Need(run_dir, "its unix socket's folder, for the online restart (pgbouncer -R)", 0o700, pool.user, "folder"),
    ]
    return host


def server_line(name: str, server: Postgres) -> str:
    """One line of [databases] for a server of the inventory's `postgres` (or its replica)."""
    return f"{name} = host={server.socket_dir or server.address} port={server.port} dbname={server.database}"


# --- the cluster's PgBouncer ----------------------------------------------------------------


def run_as_user(server: URL | None) -> str | None:
    """Who PgBouncer runs as (and owns its key and auth_file). It refuses to run as root: as
    root, on a unix socket (the embedded server) the socket's owner, so that it may connect,
    otherwise `postgres` or `nobody`; not root, None: it runs as we do."""
    if os.geteuid() != 0:
        return None
    socket_dir = server.query.get("host") if server is not None else None
    if socket_dir:
        return pwd.getpwuid(os.stat(socket_dir).st_uid).pw_name
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        return "nobody"


def replica_database(server: URL) -> str:
    return f"{server.database}_replica"


def make_app_role(server: URL, files: Credentials) -> tuple[URL, str]:
    """The app's own role with a new password (deploy/credentials.py) on the database of
    `server` (a superuser's URL), its passfile; the URL the app connects with (no password
    in it) and the role's SCRAM secret."""
    files.make_folders()
    password = credentials.new_password()
    secret = credentials.make_app_role(libpq_dsn(server), password)
    credentials.write_private(files.app_passfile, credentials.passfile(APP_ROLE, password))
    return server.set(username=APP_ROLE, password=None).difference_update_query(["passfile"]), secret


def libpq_dsn(server: URL) -> str:
    """`server` as a libpq connection string (its query's parameters, e.g. passfile, kept)."""
    return server.set(drivername="postgresql").render_as_string(hide_password=False)


def write_pgbouncer_secrets(files: Credentials, server: URL, app_secret: str, run_as: str | None) -> None:
    """PgBouncer's auth_file (the app role's SCRAM secret, and its admin user's) and the
    admin's passfile; its files (and its key, made before) readable by `run_as`."""
    admin_password = credentials.new_password()
    # libpq computes the secret on this side, over any connection: the app's own.
    app = libpq_dsn(server.update_query_dict({"passfile": str(files.app_passfile)}))
    admin_secret = credentials.scram_secret(app, ADMIN_USER, admin_password)
    credentials.write_private(files.admin_passfile, credentials.passfile(ADMIN_USER, admin_password))
    credentials.write_private(files.auth_file, f'"{APP_ROLE}" "{app_secret}"\n"{ADMIN_USER}" "{admin_secret}"\n',
                              run_as)


def start(state: State, pool: PgBouncer, unit: Path, files: Credentials) -> None:
    """PgBouncer from its rendered unit (deploy/localhosts.py put its secrets in place)."""
    state["pgbouncer"] = {"pid": None, "address": host_port(pool.address, pool.port), "pool_size": pool.pool_size,
                          "unit": str(unit), "admin_user": ADMIN_USER, "admin_passfile": str(files.admin_passfile),
                          "ca": str(files.ca_cert)}
    run(state)


def run(state: State, online: bool = False) -> None:
    """Start PgBouncer as its unit says; return once it listens. `online`: with `-R`, the new
    process asks the running one, over its unix socket, for the listening socket and every
    client and server connection, which the old one hands over before it exits."""
    pgbouncer = state["pgbouncer"]
    old_pid = pgbouncer["pid"]
    pgbouncer["pid"] = pid = run_unit(Path(pgbouncer["unit"]), "pgbouncer.log", args=["-R"] if online else [])
    save_state(state)
    if online:
        wait_for(lambda: not servers.is_alive(old_pid) or not servers.is_alive(pid), "PgBouncer's online restart")
    else:
        address, port = pgbouncer["address"].rsplit(":", 1)
        wait_for(lambda: servers.port_open(address, int(port)) or not servers.is_alive(pid), "PgBouncer")
    if not servers.is_alive(pid):
        raise click.ClickException(f"PgBouncer{' -R' if online else ''} exited: {log_tail('pgbouncer.log')}")


def admin(pgbouncer: dict, command: str) -> list[dict]:
    """One command on PgBouncer's admin console (the `pgbouncer` database; `pgbouncer` holds its
    address, admin_user, admin_passfile and ca, as PgBouncerState does); its rows, if any."""
    import psycopg2

    address, port = pgbouncer["address"].rsplit(":", 1)
    connection = psycopg2.connect(host=address, port=port, dbname="pgbouncer", user=pgbouncer["admin_user"],
                                  passfile=pgbouncer["admin_passfile"], sslmode="verify-full",
                                  sslrootcert=pgbouncer["ca"], connect_timeout=5)
    try:
        connection.autocommit = True  # the console takes no BEGIN
        with connection.cursor() as cursor:
            cursor.execute(command)
            if cursor.description is None:
                return []
            names = [column.name for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        connection.close()
