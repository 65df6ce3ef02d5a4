"""Several app hosts behind HAProxy, PgBouncer in front of PostgreSQL, all on this machine.

    python -m deploy.cluster up [--hosts 3] [--workers 1] [--port 8080] [--direct] [--replica] [--monitoring]
    python -m deploy.cluster up --ha [--db-nodes 3]  # PostgreSQL run by Patroni: failover, no write lost
    python -m deploy.cluster status [--json]
    python -m deploy.cluster link host2 down|up     # cut a host (or, with --ha, a node) from its network
    python -m deploy.cluster restart postgres|pgbouncer
    python -m deploy.cluster rollout [--hosts host1,host2] [--release DIR]   # migrate, then a new gunicorn per host
    python -m deploy.cluster migrate [--release DIR] [--revision REV]        # alembic upgrade on the primary
    python -m deploy.cluster kill db1 | start db1 | switchover [--to db2]   # with --ha
    python -m deploy.cluster down

As root, every app host is a network namespace of its own with two links: one to the
front network, where HAProxy reaches it, and one to the back network, where it reaches
PgBouncer. Two links, so that a host can lose its database and still answer HAProxy's
health checks (with 503), which is how HAProxy learns to route around it:

    client -> HAProxy 127.0.0.1:8080 -> front 10.77.1.0/24 -> hostK 10.77.1.1K:8000
    hostK 10.77.2.1K -> back 10.77.2.0/24 -> PgBouncer 10.77.2.1:6432 -> PostgreSQL

Not root: no namespaces can be made; hosts listen on 127.0.0.1K and share one network.
The namespaces, links and bridges are made in deploy/network.py.

Only the app gets in (deploy/credentials.py): `up` makes the app a PostgreSQL role of its
own with a new password, which the hosts read from a passfile (PGPASSFILE, mode 600);
PgBouncer requires TLS and a SCRAM-SHA-256 proof, and the hosts verify its certificate
(sslmode=verify-full) against a CA made at `up`. HAProxy's public side serves the API
routes only: /metrics, /stats and /healthz are read on each host's own address.

PostgreSQL is DATABASE_URL's server when set, otherwise the embedded one (EMBEDDED_PGDATA).
Every host runs `gunicorn app:app -k gevent -w W` with this environment's DB_* settings.
`--direct` leaves PgBouncer out (hosts connect straight to PostgreSQL), to compare.
`--replica` adds a streaming replica of the embedded server (pg_basebackup), which the
hosts' read-only sessions use through PgBouncer (DATABASE_READ_URL).
`--ha` replaces the single PostgreSQL with nodes run by Patroni (deploy/ha.py): PgBouncer
sends writes to the primary and reads to the replicas through a HAProxy that asks Patroni.
What `up` starts is written to CLUSTER_DIR/state.json as it goes; `down` stops each by
its PID and removes the namespaces and links, also after an `up` that failed half-way.
CLUSTER_NET (default 10.77) picks the networks, so two clusters can run side by side.
`up` removes the namespaces and bridges of its CLUSTER_NET that a cluster killed before
`down` left, unless a process still runs in one (then that network is a live cluster's).
"""

import csv
import io
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from string import Template

import click
from sqlalchemy.engine import URL, make_url

from deploy import credentials, ha
from deploy.credentials import ADMIN_USER, APP_ROLE, Credentials
from deploy.network import (
    Network,
    ip,
    make_bridges,
    make_db_namespace,
    make_host_namespace,
    remove_network,
    remove_stale_network,
)
from deploy.runtime import (
    CLUSTER_DIR,
    CLUSTER_NET,
    DEPLOY_DIR,
    load_state,
    log_tail,
    program,
    save_state,
    spawn,
    state_path,
    wait_for,
)
from greenflask import PROJECT_DIR, embedded, green, servers, sizing
from greenflask.settings import Settings

APP_PORT = 8000
PGBOUNCER_PORT = 6432


# --- PostgreSQL ----------------------------------------------------------------------


def start_postgres(state: dict) -> URL:
    """DATABASE_URL's server, or the embedded one (started if needed); the database's URL."""
    if given := Settings.from_env().database_url:
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


def schema_url(state: dict) -> URL:
    """Where migrations go: straight to PostgreSQL (with --ha, the primary through the
    database side's HAProxy), never through PgBouncer (migrations/env.py says why). Made
    again from the state's parts: the state file holds no password."""
    if state.get("ha"):
        return ha.superuser_url(state, Credentials(CLUSTER_DIR)).set(database=embedded.DATABASE)
    if state["postgres"]["embedded"]:
        return make_url(embedded.ensure_database(embedded.start(), embedded.DATABASE))
    if given := Settings.from_env().database_url:
        return make_url(given)
    raise click.ClickException("the cluster's PostgreSQL is DATABASE_URL's: set it again to migrate")


def migrate_schema(state: dict, release: Path, revision: str = "head") -> None:
    """`alembic upgrade REVISION` of the release's migrations on the cluster's database."""
    started = time.monotonic()
    output = run_in_release(release, [sys.executable, "-m", "alembic", "upgrade", revision], schema_url(state))
    steps = [line.split("Running upgrade ", 1)[1].split(",")[0] for line in output.splitlines()
             if "Running upgrade " in line]
    click.echo(f"schema: alembic upgrade {revision} from {release}: {', '.join(steps) or 'already there'} "
               f"in {time.monotonic() - started:.2f} s")


def start_replica(state: dict, primary: URL) -> URL:
    """A streaming replica of the embedded primary, in CLUSTER_DIR/replica; its URL."""
    folder = CLUSTER_DIR / "replica"
    url = make_url(embedded.start_replica(primary.render_as_string(hide_password=False), folder))
    state["replica"] = {"pid": embedded.server_pid(folder), "pgdata": str(folder)}
    save_state(state)
    return url


# --- PgBouncer -----------------------------------------------------------------------


def run_as_user(server: URL) -> str | None:
    """Who PgBouncer runs as (and owns its key and auth_file). It refuses to run as root: as
    root, on a unix socket (the embedded server) the socket's owner, so that it may connect,
    otherwise `postgres` or `nobody`; not root, None: it runs as we do."""
    if os.geteuid() != 0:
        return None
    socket_dir = server.query.get("host")
    if socket_dir:
        return pwd.getpwuid(os.stat(socket_dir).st_uid).pw_name
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        return "nobody"


def pgbouncer_database(name: str, server: URL) -> str:
    """One line of [databases]: `name` is the database PgBouncer's clients ask for."""
    host = server.query.get("host") or server.host or "127.0.0.1"
    return f"{name} = host={host} port={server.port or 5432} dbname={server.database}"


def pgbouncer_config(server: URL, listen_addr: str, listen_port: int, pool_size: int, max_client_conn: int,
                     files: Credentials, replica: URL | None = None, socket_dir: Path | None = None,
                     server_tls: bool = False) -> str:
    """deploy/pgbouncer.ini with this cluster's values; `socket_dir` (else none) for the online
    restart; `server_tls`: PostgreSQL is across a network (--ha), verify its certificate."""
    databases = [pgbouncer_database(server.database, server)]
    if replica is not None:
        databases.append(pgbouncer_database(replica_database(server), replica))
    return Template((DEPLOY_DIR / "pgbouncer.ini").read_text()).substitute(
        databases="\n".join(databases),
        listen_addr=listen_addr,
        listen_port=listen_port,
        auth_file=files.auth_file,
        admin_user=ADMIN_USER,
        tls_cert_file=files.cert("pgbouncer"),
        tls_key_file=files.key("pgbouncer"),
        server_tls_sslmode="verify-full" if server_tls else "disable",
        ca_file=files.ca_cert,
        query_wait_timeout=max(1, min(30, Settings.from_env().statement_timeout_ms // 2000)),
        pool_size=pool_size,
        max_client_conn=max_client_conn,
        unix_socket_dir=socket_dir or "",
    )


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


def start_pgbouncer(state: dict, server: URL, app_secret: str, network: Network, pool_size: int, clients: int,
                    replica: URL | None, server_tls: bool = False) -> URL:
    """PgBouncer in transaction mode for the database (and its replica), SCRAM and TLS
    required from its clients; the URL the hosts connect to (the app's role, verify-full)."""
    executable = program("pgbouncer")
    address = network.pgbouncer_address()
    port = PGBOUNCER_PORT if network.namespaces else servers.free_port()
    files = Credentials(CLUSTER_DIR)
    run_as = run_as_user(server)
    write_pgbouncer_secrets(files, server, app_secret, run_as)
    ini = CLUSTER_DIR / "pgbouncer.ini"
    socket_dir = CLUSTER_DIR / "pgbouncer-run"
    socket_dir.mkdir(mode=0o700, exist_ok=True)
    ini.write_text(pgbouncer_config(server, address, port, pool_size, clients + 20, files, replica, socket_dir,
                                    server_tls))
    ini.chmod(0o644)
    command = [executable, str(ini)]
    if run_as:
        shutil.chown(socket_dir, run_as)
        command[1:1] = ["-u", run_as]
    state["pgbouncer"] = {"pid": None, "address": f"{address}:{port}", "pool_size": pool_size, "command": command,
                          "admin_user": ADMIN_USER, "admin_passfile": str(files.admin_passfile),
                          "ca": str(files.ca_cert)}
    run_pgbouncer(state)
    return server.set(host=address, port=port,
                      query={"sslmode": "verify-full", "sslrootcert": str(files.ca_cert)})


def run_pgbouncer(state: dict) -> None:
    """Start PgBouncer with its recorded command; return once it listens."""
    pgbouncer = state["pgbouncer"]
    pgbouncer["pid"] = pid = spawn(pgbouncer["command"], "pgbouncer.log")
    save_state(state)
    address, port = pgbouncer["address"].rsplit(":", 1)
    wait_for(lambda: servers.port_open(address, int(port)) or not servers.is_alive(pid), "PgBouncer")
    if not servers.is_alive(pid):
        raise click.ClickException(f"PgBouncer exited: {log_tail('pgbouncer.log')}")


def restart_pgbouncer_online(state: dict) -> None:
    """A new PgBouncer process (its binary and config as they are now) with `-R`: it asks the
    running one, over its unix socket, for the listening socket and every client and server
    connection, which the old one hands over before it exits."""
    pgbouncer = state["pgbouncer"]
    old_pid = pgbouncer["pid"]
    command = [pgbouncer["command"][0], "-R", *pgbouncer["command"][1:]]
    pgbouncer["pid"] = pid = spawn(command, "pgbouncer.log")
    save_state(state)
    wait_for(lambda: not servers.is_alive(old_pid) or not servers.is_alive(pid), "PgBouncer's online restart")
    if not servers.is_alive(pid):
        raise click.ClickException(f"PgBouncer -R exited: {log_tail('pgbouncer.log')}")


def pgbouncer_admin(pgbouncer: dict, command: str) -> list[dict]:
    """One command on PgBouncer's admin console (the `pgbouncer` database); its rows, if any."""
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


# --- app hosts -----------------------------------------------------------------------


def start_host(state: dict, network: Network, number: int, workers: int, database_url: URL, pgbouncer: bool,
               read_url: URL | None) -> None:
    name = f"host{number}"
    address = network.host_address(number, "front")
    # A metrics folder of the cluster's own per host, so that `down` removes it even when the
    # host's gunicorn was killed (its exit hook, which would remove its own, never ran).
    metrics_dir = metrics_folder(network, number)
    env = {"DATABASE_URL": database_url.render_as_string(hide_password=False),
           "DB_PGBOUNCER": "1" if pgbouncer else "0", "HOST_NAME": name, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
           "PGPASSFILE": state["passfile"]}
    if read_url is not None:
        env["DATABASE_READ_URL"] = read_url.render_as_string(hide_password=False)
    command = servers.gunicorn_command(f"{address}:{APP_PORT}", ["-k", "gevent", "-w", str(workers)])
    if network.namespaces:
        command = ["ip", "netns", "exec", network.namespace(number), *command]  # exec: same PID
    host = {"name": name, "address": address, "port": APP_PORT, "gunicorn_pid": None, "release": state["release"],
            "namespace": network.namespace(number) if network.namespaces else None,
            "metrics_dir": str(metrics_dir), "command": command, "env": env}
    state["hosts"].append(host)
    run_host(state, host)


def run_host(state: dict, host: dict) -> None:
    """Start the host's gunicorn with its recorded command and the cluster's part of its
    environment, in its release's folder (the code it runs); the rest of the environment
    (DB_* settings) is this process's now."""
    host["gunicorn_pid"] = spawn(host["command"], f"{host['name']}.log", host["env"], cwd=Path(host["release"]))
    save_state(state)


def metrics_folder(network: Network, number: int) -> Path:
    """In memory where there is /dev/shm (every request writes to these files)."""
    parent = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else CLUSTER_DIR
    return parent / f"greenflask-cluster-{network.prefix}-host{number}-metrics"


def host_url(host: dict, path: str = "") -> str:
    return f"http://{host['address']}:{host['port']}{path}"


def host_is_healthy(host: dict) -> bool:
    return servers.is_alive(host["gunicorn_pid"]) and servers.status_of(host_url(host, "/healthz")) == 200


# --- HAProxy -------------------------------------------------------------------------


def haproxy_config(bind: str, exporter_bind: str, admin_socket: Path, hosts: list[dict]) -> str:
    """deploy/haproxy.cfg with this cluster's values and a `server` line per host."""
    text = Template((DEPLOY_DIR / "haproxy.cfg").read_text()).substitute(
        bind=bind, exporter_bind=exporter_bind, admin_socket=admin_socket,
        max_body_bytes=Settings.from_env().max_body_bytes)
    return text + "".join(f"    server {host['name']} {host['address']}:{host['port']}\n" for host in hosts)


def start_haproxy(state: dict, port: int) -> None:
    executable = program("haproxy")
    admin_socket = CLUSTER_DIR / "haproxy.sock"
    config = CLUSTER_DIR / "haproxy.cfg"
    exporter = f"127.0.0.1:{servers.free_port()}"
    config.write_text(haproxy_config(f"127.0.0.1:{port}", exporter, admin_socket, state["hosts"]))
    checked = subprocess.run([executable, "-c", "-q", "-f", str(config)], capture_output=True, text=True)
    if checked.returncode != 0:
        raise click.ClickException(f"haproxy.cfg: {checked.stderr.strip()}")
    pid = spawn([executable, "-db", "-f", str(config)], "haproxy.log")
    state["haproxy"] = {"pid": pid, "url": f"http://127.0.0.1:{port}", "admin_socket": str(admin_socket),
                        "exporter": exporter}
    save_state(state)


# --- Prometheus ----------------------------------------------------------------------


def start_postgres_exporter(state: dict) -> str:
    """Debian's prometheus-postgres-exporter for the primary (its connection string in the
    environment, not in argv; with --ha, through HAProxy's primary port, so that it follows
    a failover, its password read from a file); the address it serves on."""
    executable = program("prometheus-postgres-exporter", "prometheus-postgres-exporter")
    if state.get("ha"):
        files = Credentials(CLUSTER_DIR)
        env = {"DATA_SOURCE_URI": f"127.0.0.1:{state['ha']['primary_port']}/postgres?sslmode=verify-full"
                                  f"&sslrootcert={files.ca_cert}",
               "DATA_SOURCE_USER": "postgres", "DATA_SOURCE_PASS_FILE": str(files.superuser_password)}
    else:
        url = make_url(Settings.from_env().database_url or embedded.embedded_url())
        query = {"sslmode": "disable", **url.query} if "sslmode" not in url.query else dict(url.query)
        env = {"DATA_SOURCE_NAME": url.set(drivername="postgresql", query=query).render_as_string(hide_password=False)}
    address = f"127.0.0.1:{servers.free_port()}"
    pid = spawn([executable, f"--web.listen-address={address}"], "postgres-exporter.log", env)
    state["postgres_exporter"] = {"pid": pid, "address": address}
    save_state(state)
    return address


def start_pgbouncer_exporter(state: dict) -> str:
    """deploy/pgbouncer_exporter.py for this cluster's PgBouncer; the address it serves on."""
    address = f"127.0.0.1:{servers.free_port()}"
    pid = spawn([sys.executable, "-m", "deploy.pgbouncer_exporter", "--listen", address], "pgbouncer-exporter.log")
    state["pgbouncer_exporter"] = {"pid": pid, "address": address}
    save_state(state)
    wait_for(lambda: servers.status_of(f"http://{address}/metrics") == 200 or not servers.is_alive(pid),
             "the PgBouncer exporter")
    return address


def start_prometheus(state: dict) -> None:
    """Prometheus with deploy/prometheus/ as it is, scraping every host's /metrics on its own
    address and HAProxy's exporter; the targets are files it reads (file_sd)."""
    executable = program("prometheus", "prometheus")
    folder = CLUSTER_DIR / "prometheus"
    (folder / "targets").mkdir(parents=True, exist_ok=True)
    for name in ("prometheus.yml", "alerts.yml", "recording.yml"):
        shutil.copy(DEPLOY_DIR / "prometheus" / name, folder / name)
    hosts = [{"targets": [f"{host['address']}:{host['port']}"], "labels": {"host": host["name"]}}
             for host in state["hosts"]]
    (folder / "targets" / "greenflask.json").write_text(json.dumps(hosts, indent=2))
    (folder / "targets" / "haproxy.json").write_text(json.dumps([{"targets": [state["haproxy"]["exporter"]]}]))
    exporter = start_postgres_exporter(state)
    (folder / "targets" / "postgres.json").write_text(json.dumps([{"targets": [exporter]}]))
    pgbouncer = [{"targets": [start_pgbouncer_exporter(state)]}] if state.get("pgbouncer") else []
    (folder / "targets" / "pgbouncer.json").write_text(json.dumps(pgbouncer))
    # Patroni's own GET /metrics on each node (patroni_primary, its WAL positions), with --ha.
    nodes = [{"targets": [f"{node['address']}:{ha.PATRONI_PORT}"], "labels": {"node": node["name"]}}
             for node in (state.get("ha") or {}).get("nodes", [])]
    (folder / "targets" / "patroni.json").write_text(json.dumps(nodes))
    url = f"http://127.0.0.1:{servers.free_port()}"
    pid = spawn([executable, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
                 f"--web.listen-address={url.removeprefix('http://')}", "--storage.tsdb.retention.time=1d"],
                "prometheus.log")
    state["prometheus"] = {"pid": pid, "url": url}
    save_state(state)
    wait_for(lambda: servers.status_of(url + "/-/ready") == 200 or not servers.is_alive(pid), "Prometheus")
    if not servers.is_alive(pid):
        raise click.ClickException(f"Prometheus exited: {log_tail('prometheus.log')}")


def haproxy_admin(admin_socket: str, command: str) -> str:
    """One command on HAProxy's admin socket; its answer ("" when HAProxy does not answer)."""
    try:
        with socket.socket(socket.AF_UNIX) as connection:
            connection.settimeout(2)
            connection.connect(admin_socket)
            connection.sendall(command.encode() + b"\n")
            return b"".join(iter(lambda: connection.recv(65536), b"")).decode()
    except OSError:
        return ""


def haproxy_servers(admin_socket: str, backend: str = "app_hosts") -> dict[str, dict]:
    """{server name: its `show stat` row in `backend`} (status "UP", "DOWN", "DRAIN", ...;
    scur: requests or connections in flight; stot: sent so far)."""
    rows = csv.DictReader(io.StringIO(haproxy_admin(admin_socket, "show stat").lstrip("# ")))
    return {row["svname"]: row for row in rows if row["pxname"] == backend
            and row["svname"] not in ("BACKEND", "FRONTEND")}


def haproxy_server_states(admin_socket: str, backend: str = "app_hosts") -> dict[str, str]:
    """{server name: "UP" | "DOWN" | ...} in `backend`, from HAProxy's admin socket."""
    return {name: row["status"] for name, row in haproxy_servers(admin_socket, backend).items()}


# --- commands ------------------------------------------------------------------------


RELEASE_OPTION = click.option(
    "--release", default=str(PROJECT_DIR), show_default="this checkout",
    type=click.Path(exists=True, file_okay=False, resolve_path=True, path_type=Path),
    help="The folder of the app's code the hosts run (and whose seed.py and migrations/ apply).")


@click.group()
def cli() -> None:
    """A multi-host deployment of the app on this machine (see the module's docstring)."""


@cli.command()
@click.option("--hosts", default=3, show_default=True, type=click.IntRange(1, 9), help="App hosts.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="gunicorn workers per host.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535), help="HAProxy's port.")
@click.option("--pgbouncer-pool", default=20, show_default=True, type=click.IntRange(1),
              help="PgBouncer's server connections (default_pool_size).")
@click.option("--direct", is_flag=True, help="No PgBouncer: hosts connect straight to PostgreSQL.")
@click.option("--monitoring", is_flag=True,
              help="Prometheus (deploy/prometheus/) scraping the hosts and HAProxy, with the alert rules.")
@click.option("--replica", is_flag=True,
              help="A streaming replica of the embedded PostgreSQL for the hosts' reads (DATABASE_READ_URL).")
@click.option("--ha", "ha_nodes", is_flag=True,
              help="PostgreSQL run by Patroni on --db-nodes nodes (etcd, synchronous replication, failover), "
                   "behind HAProxy; reads from the replicas.")
@click.option("--db-nodes", default=3, show_default=True, type=click.IntRange(2, 5), help="With --ha: nodes.")
@RELEASE_OPTION
def up(hosts: int, workers: int, port: int, pgbouncer_pool: int, direct: bool, monitoring: bool,
       replica: bool, ha_nodes: bool, db_nodes: int, release: Path) -> None:
    """Start PostgreSQL, PgBouncer, the app hosts and HAProxy (and Prometheus); print the balancer's URL last."""
    if load_state():
        raise click.ClickException(f"a cluster is already up ({state_path()}): python -m deploy.cluster down")
    if not direct:
        program("pgbouncer")
    program("haproxy")
    if monitoring:
        program("prometheus", "prometheus")
        program("prometheus-postgres-exporter", "prometheus-postgres-exporter")
    if replica and (direct or Settings.from_env().database_url):
        raise click.ClickException("--replica needs the embedded PostgreSQL and PgBouncer: no DATABASE_URL, "
                                   "no --direct")
    if ha_nodes:
        if direct or replica or Settings.from_env().database_url or os.geteuid() != 0:
            raise click.ClickException("--ha runs its own PostgreSQL nodes in network namespaces behind PgBouncer: "
                                       "as root, without DATABASE_URL, --direct or --replica")
        ha.check_ready()
    db_nodes = db_nodes if ha_nodes else 0
    CLUSTER_DIR.mkdir(parents=True, exist_ok=True)
    CLUSTER_DIR.chmod(0o755)  # PgBouncer, as another user, reads its files here
    for old_log in CLUSTER_DIR.glob("*.log"):  # each cluster's logs start empty
        old_log.unlink()
    network = Network(CLUSTER_NET, namespaces=os.geteuid() == 0)
    if network.namespaces and (removed := remove_stale_network(network)):
        click.echo(f"network: removed what a cluster killed before `down` left: {', '.join(removed)}")
    state = {"net": network.net, "namespaces": network.namespaces, "hosts": [], "planned_hosts": hosts,
             "planned_db_nodes": db_nodes, "ha": None, "passfile": None, "postgres": None, "replica": None,
             "pgbouncer": None, "haproxy": None, "prometheus": None, "release": str(release)}
    save_state(state)
    try:
        _bring_up(state, network, hosts, workers, port, pgbouncer_pool, direct, replica, db_nodes)
        if monitoring:
            start_prometheus(state)
            click.echo(f"Prometheus: {state['prometheus']['url']}, pid {state['prometheus']['pid']}")
    except BaseException:
        click.echo(f"up failed; stopping what started (logs in {CLUSTER_DIR})", err=True)
        _tear_down(state)
        raise
    click.echo(f"{hosts} hosts x {workers} workers, {'straight to PostgreSQL' if direct else 'through PgBouncer'}; "
               "python -m deploy.cluster status | down")
    click.echo(state["haproxy"]["url"])


def _bring_up(state: dict, network: Network, hosts: int, workers: int, port: int, pgbouncer_pool: int,
              direct: bool, replica: bool, db_nodes: int) -> None:
    if network.namespaces:
        click.echo(f"network: hosts in namespaces {network.namespace(1)}..{hosts}, front {network.net}.1.0/24, "
                   f"back {network.net}.2.0/24" + (f", database nodes {network.net}.3.0/24" if db_nodes else ""))
        make_bridges(network, ("front", "back", "db") if db_nodes else ("front", "back"))
        for number in range(1, hosts + 1):
            make_host_namespace(network, number)
        for number in range(1, db_nodes + 1):
            make_db_namespace(network, number)
    else:
        click.echo("network: not root, so no namespaces: hosts are 127.0.0.11.. on one shared network")
    files = Credentials(CLUSTER_DIR)
    files.make_folders()
    tls_names = {"pgbouncer": [network.pgbouncer_address()]}
    if db_nodes:
        credentials.make_certificates(files, {**tls_names, **ha.certificate_names(network, db_nodes)}, ha.RUN_AS)
        superuser = ha.start(state, network, db_nodes, files)
        database_url = make_url(embedded.ensure_database(superuser.render_as_string(hide_password=False),
                                                         embedded.DATABASE))
        click.echo(f"PostgreSQL: {db_nodes} nodes run by Patroni (etcd {state['ha']['etcd']['url']}), primary "
                   f"{ha.primary(state)}, synchronous replication; HAProxy 127.0.0.1:{state['ha']['primary_port']} "
                   f"(primary), :{state['ha']['replicas_port']} (replicas)")
        replica_url = database_url.set(port=state["ha"]["replicas_port"])
    else:
        database_url = start_postgres(state)
        click.echo(f"PostgreSQL: {state['postgres']['url']}")
        if not direct:
            credentials.make_certificates(files, tls_names, run_as_user(database_url))
    seed(Path(state["release"]), database_url, pgbouncer=not direct)
    if replica:
        replica_url = start_replica(state, database_url)
        click.echo(f"replica: {state['replica']['pgdata']} (streaming from the primary), pid {state['replica']['pid']}")
    elif not db_nodes:
        replica_url = None
    app_url, app_secret = make_app_role(database_url, files)
    if db_nodes:
        ha.wait_until_replicated(state)
    state["passfile"] = str(files.app_passfile)
    save_state(state)
    click.echo(f"app role: {APP_ROLE}, its password in {state['passfile']} (mode 600)")
    settings = Settings.from_env()
    # With a replica (or --ha's replicas) every worker has two pools, one to each database.
    reads_apart = replica_url is not None
    per_pool = sizing.app_connections(hosts, workers, settings.pool_size, settings.max_overflow)
    clients = per_pool * (2 if reads_apart else 1)
    read_url = None
    if direct:
        database_url = app_url
    else:
        database_url = start_pgbouncer(state, app_url, app_secret, network, pgbouncer_pool, clients, replica_url,
                                       server_tls=bool(db_nodes))
        click.echo(f"PgBouncer: {state['pgbouncer']['address']} (transaction mode, {pgbouncer_pool} server "
                   f"connections for {clients} app connections; SCRAM and TLS required)")
        if reads_apart:
            read_url = database_url.set(database=replica_database(database_url))
    for number in range(1, hosts + 1):
        start_host(state, network, number, workers, database_url, not direct, read_url)
    for host in state["hosts"]:
        wait_for(lambda host=host: host_is_healthy(host), f"{host['name']} ({host_url(host)})", within=60)
        click.echo(f"{host['name']}: {host_url(host)} gunicorn pid {host['gunicorn_pid']}")
    start_haproxy(state, port)
    admin_socket = state["haproxy"]["admin_socket"]
    wait_for(lambda: set(haproxy_server_states(admin_socket).values()) == {"UP"}, "HAProxy")
    click.echo(f"HAProxy: pid {state['haproxy']['pid']}, every host UP")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object (hosts, pgbouncer, haproxy, postgres).")
def status(as_json: bool) -> None:
    """What runs, by PID, and which hosts are healthy."""
    state = load_state()
    if state is None:
        raise click.ClickException("no cluster is up")
    states = haproxy_server_states(state["haproxy"]["admin_socket"]) if state.get("haproxy") else {}
    report = {
        "passfile": state.get("passfile"),
        "hosts": [{"name": host["name"], "address": host["address"], "gunicorn_pid": host["gunicorn_pid"],
                   "healthy": host_is_healthy(host), "haproxy": states.get(host["name"]),
                   "release": host.get("release")} for host in state["hosts"]],
        "pgbouncer": _with_alive(state.get("pgbouncer")),
        "haproxy": _with_alive(state.get("haproxy")),
        "prometheus": _with_alive(state.get("prometheus")),
        "postgres": _with_alive(state.get("postgres")),
        "replica": _with_alive(state.get("replica")),
    }
    if state.get("ha"):
        report.update(ha.report(state))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for host in report["hosts"]:
        click.echo(f"{host['name']:8} {host['address']:12} pid {host['gunicorn_pid']:<8} "
                   f"{'healthy' if host['healthy'] else 'NOT healthy'}, HAProxy: {host['haproxy']}, "
                   f"release {host['release']}")
    for node in report.get("db_nodes", []):
        click.echo(f"{node['name']:8} {node['address']:12} postgres pid {node['postgres_pid']}: {node['role']} "
                   f"({node['state']}), lag {node['lag']}")
    for part in ("pgbouncer", "haproxy", "prometheus", "postgres", "replica"):
        if report[part]:
            click.echo(f"{part:8} pid {report[part]['pid']} {'running' if report[part]['running'] else 'NOT running'}")


def _with_alive(part: dict | None) -> dict | None:
    if part is None:
        return None
    external = part.get("pid") is None
    return {**part, "running": True if external else servers.is_alive(part["pid"])}


def require(part: str | None = None) -> dict:
    """The running cluster's state; with `part`, one that has it."""
    state = load_state()
    if state is None:
        raise click.ClickException("no cluster is up")
    if part and not state.get(part):
        raise click.ClickException(f"this cluster has no {part} (up --{part})" if part == "ha" else f"no {part} is up")
    return state


@cli.command()
@click.argument("name")
@click.argument("state", type=click.Choice(["down", "up"]))
def link(name: str, state: str) -> None:
    """Take a host's link to the database network down (or up again): its requests answer
    503 within the app's bounds, and HAProxy's health check takes it out of rotation. With
    --ha, a database node's (db1, ...) only link: cut from everything, as if its host died."""
    cluster = require()
    if not cluster["namespaces"]:
        raise click.ClickException("hosts share one network when not root: no link to cut")
    network = Network(cluster["net"], namespaces=True)
    hosts = [entry["name"] for entry in cluster["hosts"]]
    nodes = [node["name"] for node in (cluster.get("ha") or {}).get("nodes", [])]
    if name in hosts:
        ip("link", "set", network.veth(hosts.index(name) + 1, "back"), state)
    elif name in nodes:
        ip("link", "set", network.db_veth(nodes.index(name) + 1), state)
    else:
        raise click.ClickException(f"no host or node {name!r}: {', '.join(hosts + nodes)}")
    click.echo(f"{name}: link {state}")


@cli.command()
@click.argument("node")
def kill(node: str) -> None:
    """With --ha: SIGKILL every process of a database node (Patroni, PostgreSQL), as a host
    that lost its power. Patroni elects a new primary within its ttl."""
    state = require("ha")
    pids = ha.kill(state, node)
    click.echo(f"{node}: killed {len(pids)} processes ({', '.join(map(str, pids))})")


@cli.command()
@click.argument("node")
def start(node: str) -> None:
    """With --ha: start a killed node's Patroni again (its host came back); it rejoins as a
    replica of the current primary, rewinding its data with pg_rewind where needed."""
    state = require("ha")
    ha.revive(state, node)
    click.echo(f"{node}: Patroni started, pid {ha.node_named(state, node)['patroni_pid']}")


@cli.command()
@click.option("--to", "candidate", help="The node to make primary [its synchronous standby].")
def switchover(candidate: str | None) -> None:
    """With --ha: a planned switchover behind PgBouncer's PAUSE and RESUME. PAUSE waits for
    the running transactions, and new ones wait in PgBouncer; Patroni stops the primary
    cleanly and promotes the candidate; once HAProxy routes to it, RESUME."""
    state = require("ha")
    started = time.monotonic()
    admin = state["ha"]["haproxy"]["admin_socket"]
    pgbouncer_admin(state["pgbouncer"], "PAUSE")
    try:
        old, new = ha.switchover(state, candidate)
        wait_for(lambda: haproxy_server_states(admin, "postgres_primary").get(new) == "UP"
                 and haproxy_server_states(admin, "postgres_primary").get(old) != "UP",
                 f"HAProxy to route writes to {new}")
    finally:
        pgbouncer_admin(state["pgbouncer"], "RESUME")
    click.echo(f"switchover {old} -> {new} in {time.monotonic() - started:.2f} s")


@cli.command()
@click.argument("part", type=click.Choice(["postgres", "pgbouncer"]))
def restart(part: str) -> None:
    """Restart the embedded PostgreSQL behind PgBouncer's PAUSE and RESUME (clients wait
    in PgBouncer instead of failing), or PgBouncer itself online (`pgbouncer -R`: the new
    process takes over the listening socket and every connection from the old one, so no
    client loses its connection)."""
    state = load_state()
    if state is None or not state.get("pgbouncer"):
        raise click.ClickException("no cluster with PgBouncer is up")
    started = time.monotonic()
    if part == "pgbouncer":
        restart_pgbouncer_online(state)
    else:
        if not state["postgres"]["embedded"]:
            raise click.ClickException("PostgreSQL is DATABASE_URL's server: restart it with its own tools")
        pgdata = Path(state["postgres"]["pgdata"])
        database = make_url(state["postgres"]["url"]).database
        pgbouncer_admin(state["pgbouncer"], f"PAUSE {database}")  # returns once no transaction runs
        try:
            embedded.stop(pgdata)
            embedded.start(pgdata)
            state["postgres"]["pid"] = embedded.server_pid(pgdata)
            save_state(state)
        finally:
            pgbouncer_admin(state["pgbouncer"], f"RESUME {database}")
    click.echo(f"{part} restarted in {time.monotonic() - started:.2f} s")


def longest_request_seconds() -> float:
    """The longest a request of the app may take: its longest sleep or its statement bound."""
    settings = Settings.from_env()
    return max(settings.sleep_max_seconds, settings.statement_timeout_ms / 1000 + green.STATEMENT_MARGIN_SECONDS)


@cli.command()
@click.option("--hosts", "names", help="Comma-separated host names, in order [every host].")
@click.option("--drain-margin", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds past the longest allowed request to wait for a host's requests to end.")
@RELEASE_OPTION
@click.option("--migrate/--no-migrate", default=True, show_default=True,
              help="First apply the release's migrations (alembic upgrade head), while the old hosts serve.")
def rollout(names: str | None, drain_margin: float, release: Path, migrate: bool) -> None:
    """Replace each host's gunicorn with a new one of --release, one host at a time, dropping
    no request: drain it in HAProxy, wait until its requests end, take it to maintenance,
    stop the old master gracefully, start the new one, wait until /healthz answers, put it
    back and wait until HAProxy sees it UP. Stops with exit 1 at the first host that does
    not come back (the others keep serving; that host stays out of rotation).

    The release's migrations run first, with the old release still serving: so they must
    be ones the old code works with (expand -> deploy -> contract, docs/operations.md)."""
    state = load_state()
    if state is None or not state.get("haproxy"):
        raise click.ClickException("no cluster is up")
    if migrate:
        migrate_schema(state, release)
    hosts = {host["name"]: host for host in state["hosts"]}
    chosen = [name.strip() for name in names.split(",")] if names else list(hosts)
    if unknown := [name for name in chosen if name not in hosts]:
        raise click.ClickException(f"no host {', '.join(unknown)}: {', '.join(hosts)}")
    admin = state["haproxy"]["admin_socket"]
    bound = longest_request_seconds() + drain_margin
    state["release"] = str(release)
    for name in chosen:
        hosts[name]["release"] = str(release)
        _replace_host(state, hosts[name], admin, bound)


def _replace_host(state: dict, host: dict, admin: str, bound: float) -> None:
    name, old_pid, started = host["name"], host["gunicorn_pid"], time.monotonic()
    haproxy_admin(admin, f"set server app_hosts/{name} state drain")

    def in_flight() -> int:
        return int(haproxy_servers(admin).get(name, {}).get("scur") or 0)

    try:
        servers.wait_until(lambda: in_flight() == 0, f"{name}'s requests", bound)
        left = 0
    except RuntimeError:
        # Past the bound the old master still gets SIGTERM: gunicorn lets what runs finish
        # for its graceful_timeout, then ends it; HAProxy answers that client 502.
        left = in_flight()
    drained = time.monotonic() - started
    # MAINT closes HAProxy's idle kept-alive connections to the host, which the old workers
    # would otherwise hold open for their keep-alive before they exit.
    haproxy_admin(admin, f"set server app_hosts/{name} state maint")
    servers.stop(old_pid)
    run_host(state, host)
    try:
        servers.wait_until(lambda: host_is_healthy(host) or not servers.is_alive(host["gunicorn_pid"]),
                           f"{name}'s /healthz", 60)
        if not servers.is_alive(host["gunicorn_pid"]):
            raise RuntimeError("its new gunicorn exited")
        haproxy_admin(admin, f"set server app_hosts/{name} state ready")
        servers.wait_until(lambda: haproxy_server_states(admin).get(name) == "UP", f"{name} UP in HAProxy", 30)
    except RuntimeError as error:
        raise click.ClickException(f"{name} did not come back: {error}; it stays out of rotation, the other hosts "
                                   f"serve (its log: {CLUSTER_DIR / (name + '.log')})") from None
    replaced = time.monotonic() - started
    note = f", {left} request(s) still running at the {bound:.0f} s bound" if left else ""
    click.echo(f"{name}: drained in {drained:.2f} s{note}; replaced (pid {old_pid} -> {host['gunicorn_pid']}) and "
               f"back in rotation in {replaced:.2f} s")


@cli.command()
@RELEASE_OPTION
@click.option("--revision", default="head", show_default=True, help="The revision to upgrade to.")
def migrate(release: Path, revision: str) -> None:
    """Apply the release's migrations to the cluster's database (alembic upgrade), straight
    to PostgreSQL, with --ha to the primary: a contract step after a rollout, say."""
    state = load_state()
    if state is None or not state.get("postgres") and not state.get("ha"):
        raise click.ClickException("no cluster is up")
    migrate_schema(state, release, revision)


@cli.command()
def down() -> None:
    """Stop everything `up` started, by PID, and remove its namespaces and links."""
    state = load_state()
    if state is None:
        click.echo("no cluster is up")
        return
    _tear_down(state)
    click.echo("cluster down")


def _tear_down(state: dict) -> None:
    """Gracefully, front to back: HAProxy stops listening and lets its requests finish
    (SIGUSR1, its soft stop), every host finishes what it holds (SIGTERM, gunicorn's
    graceful_timeout), then PgBouncer and PostgreSQL."""
    servers.stop((state.get("prometheus") or {}).get("pid"), grace=10)
    servers.stop((state.get("postgres_exporter") or {}).get("pid"), grace=5)
    servers.stop((state.get("pgbouncer_exporter") or {}).get("pid"), grace=5)
    shutil.rmtree(CLUSTER_DIR / "prometheus", ignore_errors=True)
    haproxy = (state.get("haproxy") or {}).get("pid")
    if servers.is_alive(haproxy):
        os.kill(haproxy, signal.SIGUSR1)
    for host in state["hosts"]:  # all at once: each drains its requests for up to 30 s
        if servers.is_alive(host["gunicorn_pid"]):
            os.kill(host["gunicorn_pid"], signal.SIGTERM)
    for host in state["hosts"]:
        servers.stop(host["gunicorn_pid"])
        shutil.rmtree(host["metrics_dir"], ignore_errors=True)
    servers.stop(haproxy, grace=5)
    if state.get("pgbouncer"):
        servers.stop(state["pgbouncer"]["pid"], grace=5)
    if state.get("replica"):
        embedded.stop(Path(state["replica"]["pgdata"]))
        shutil.rmtree(state["replica"]["pgdata"], ignore_errors=True)
    postgres = state.get("postgres") or {}
    if postgres.get("started"):
        embedded.stop(Path(postgres["pgdata"]))
    if state.get("ha"):
        ha.stop_all(state)
    Credentials(CLUSTER_DIR).remove()
    if state["namespaces"]:
        remove_network(Network(state["net"], namespaces=True), state["planned_hosts"],
                       state.get("planned_db_nodes", 0))
    state_path().unlink(missing_ok=True)


if __name__ == "__main__":
    cli()
