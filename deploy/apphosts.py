"""The app hosts: `gunicorn app:app -k gevent` with the app's settings in its environment, for
the render (an EnvironmentFile and a hardened unit per host) and for the cluster.
"""

import os
from pathlib import Path

from sqlalchemy.engine import URL

from deploy import units
from deploy.credentials import APP_ROLE
from deploy.haproxy import host_port
from deploy.inventory import AppHost, Inventory, Postgres
from deploy.layout import Layout, Need, Rendered
from deploy.network import Network
from deploy.pgbouncer import CA, replica_database
from deploy.runtime import CLUSTER_DIR, HostState, State, run_unit, save_state
from greenflask import servers

PORT = 8000
RUN_AS = "greenflask"


def environment(name: str, database_url: URL, read_url: URL | None, pgbouncer: bool, passfile: str,
                metrics_dir: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The app's settings of one host (docs/reference.md): no password, which is in PGPASSFILE."""
    env = {"DATABASE_URL": database_url.render_as_string(hide_password=False),
           "DB_PGBOUNCER": "1" if pgbouncer else "0", "HOST_NAME": name, "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
           "PGPASSFILE": passfile}
    if read_url is not None:
        env["DATABASE_READ_URL"] = read_url.render_as_string(hide_password=False)
    return {**env, **(extra or {})}


def database_urls(inventory: Inventory, ca: str) -> tuple[URL, URL | None]:
    """The app's DATABASE_URL and DATABASE_READ_URL: PgBouncer's (TLS verified against `ca`),
    or without PgBouncer the server's own (over its socket, or the network with TLS)."""
    if (pool := inventory.pgbouncer) is not None:
        url = URL.create("postgresql", username=APP_ROLE, host=str(pool.address), port=pool.port,
                         database="greenflask", query={"sslmode": "verify-full", "sslrootcert": ca})
        reads = inventory.db_nodes or inventory.postgres.replica
        return url, url.set(database=replica_database(url)) if reads else None

    def direct(server: Postgres) -> URL:
        if server.socket_dir:
            return URL.create("postgresql", username=APP_ROLE, database=server.database, port=server.port,
                              query={"host": server.socket_dir})
        query = {} if server.address.is_loopback else {"sslmode": "verify-full", "sslrootcert": ca}
        return URL.create("postgresql", username=APP_ROLE, host=str(server.address), port=server.port,
                          database=server.database, query=query)

    server = inventory.postgres
    return direct(server), direct(server.replica) if server.replica else None


def render(inventory: Inventory, layout: Layout, app_host: AppHost) -> Rendered:
    app = inventory.app
    host = Rendered(app_host.name)
    ca, passfile = layout.path("etc/greenflask/tls/ca.crt"), layout.path("etc/greenflask/secrets/app.pgpass")
    database_url, read_url = database_urls(inventory, ca)
    settings = {"DB_POOL_SIZE": str(app.pool_size), "DB_MAX_OVERFLOW": str(app.max_overflow),
                "DB_STATEMENT_TIMEOUT": str(app.statement_timeout_ms), "MAX_BODY_BYTES": str(app.max_body_bytes),
                **app.environment}
    env_file = "etc/greenflask/greenflask.env"
    metrics_dir = app_host.metrics_dir or layout.path("run/greenflask/metrics")
    host.add(env_file, units.environment_text(environment(
        app_host.name, database_url, read_url, inventory.pgbouncer is not None, passfile, metrics_dir, settings)))
    host.add_unit("greenflask.service", units.unit("greenflask: gunicorn app:app -k gevent", [
        ("User", RUN_AS), ("Group", RUN_AS),
        ("WorkingDirectory", str(layout.prefix)),
        ("EnvironmentFile", layout.path(env_file)),
        ("ExecStart", f"{layout.program('gunicorn')} app:app -k gevent -w {app_host.workers} "
                      f"-b {host_port(app_host.address, app_host.port)}"),
        # HUP: new workers with the code and settings as they are now; TERM lets requests finish.
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("KillMode", "mixed"), ("TimeoutStopSec", "40"), ("Restart", "always"),
        # gunicorn.conf.py keeps the workers' metrics files here; systemd makes it, empty, at each start.
        ("RuntimeDirectory", "greenflask"),
        ("ReadWritePaths", layout.path("run/greenflask")),
        *units.HARDENED,
    ]))
    host.needs += [Need(ca, CA, 0o644, RUN_AS, "ca"),
                   Need(passfile, f"a libpq passfile of {APP_ROLE} (PGPASSFILE)", owner=RUN_AS, kind="app_passfile")]
    return host


# --- the cluster's hosts ------------------------------------------------------------------


def start(state: State, network: Network, number: int, unit: Path) -> None:
    """App host `number` from its rendered unit, in its namespace."""
    name = f"host{number}"
    host = {"name": name, "address": network.host_address(number, "front"), "port": PORT, "gunicorn_pid": None,
            "release": state["release"], "namespace": network.namespace(number) if network.namespaces else None,
            "metrics_dir": str(metrics_folder(network, number)), "unit": str(unit)}
    state["hosts"].append(host)
    run(state, host)


def run(state: State, host: HostState) -> None:
    """Start the host's gunicorn as its unit says, in its release's folder (the code it runs,
    as if installed at the prefix); the rest of the environment (DB_* settings the unit does
    not set) is this process's now."""
    host["gunicorn_pid"] = run_unit(Path(host["unit"]), f"{host['name']}.log", host["namespace"],
                                    cwd=Path(host["release"]))
    save_state(state)


def metrics_folder(network: Network, number: int) -> Path:
    """In memory where there is /dev/shm (every request writes to these files)."""
    parent = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else CLUSTER_DIR
    return parent / f"greenflask-cluster-{network.prefix}-host{number}-metrics"


def url(host: HostState, path: str = "") -> str:
    return f"http://{host['address']}:{host['port']}{path}"


def is_healthy(host: HostState) -> bool:
    return servers.is_alive(host["gunicorn_pid"]) and servers.status_of(url(host, "/healthz")) == 200
