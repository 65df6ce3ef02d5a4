"""Prometheus (deploy/prometheus/: its config, recording and alert rules, the same everywhere)
and the exporters it scrapes besides the app hosts: HAProxy's own, PostgreSQL's (Debian's
prometheus-postgres-exporter), PgBouncer's (deploy/pgbouncer_exporter.py), Patroni's.
"""

import json
import shutil
import sys

import click
from sqlalchemy.engine import make_url

from deploy import units
from deploy.credentials import Credentials
from deploy.haproxy import PATRONI_PORT, host_port
from deploy.inventory import Inventory
from deploy.layout import Layout, Need, Rendered
from deploy.pgbouncer import CA
from deploy.runtime import CLUSTER_DIR, DEPLOY_DIR, State, log_tail, program, save_state, spawn, wait_for
from greenflask import embedded, servers

RULES = ("prometheus.yml", "alerts.yml", "recording.yml")
EXPORTER = "/usr/bin/prometheus-postgres-exporter"


def targets(app_hosts: list[tuple[str, str]], haproxy: str, postgres: str, pgbouncer: str | None,
            patroni: list[tuple[str, str]]) -> dict[str, str]:
    """The files of prometheus.yml's file_sd (targets/*.json): each app host with a `host`
    label, each Patroni node with a `node` label, one target per exporter."""
    def group(pairs: list[tuple[str, str]], label: str) -> str:
        return json.dumps([{"targets": [address], "labels": {label: name}} for name, address in pairs], indent=2)

    return {"targets/greenflask.json": group(app_hosts, "host"),
            "targets/haproxy.json": json.dumps([{"targets": [haproxy]}]),
            "targets/postgres.json": json.dumps([{"targets": [postgres]}]),
            "targets/pgbouncer.json": json.dumps([{"targets": [pgbouncer]}] if pgbouncer else []),
            "targets/patroni.json": group(patroni, "node")}


def render(inventory: Inventory, layout: Layout) -> Rendered:
    monitor, pool = inventory.prometheus, inventory.pgbouncer
    host = Rendered(monitor.name)
    folder = "etc/prometheus/greenflask"
    for name in RULES:
        host.add(f"{folder}/{name}", (DEPLOY_DIR / "prometheus" / name).read_text())
    postgres_exporter = host_port(monitor.address, monitor.postgres_exporter_port)
    for name, text in targets(
            [(app.name, host_port(app.address, app.port)) for app in inventory.app_hosts],
            host_port(inventory.balancer.address, inventory.balancer.exporter_port), postgres_exporter,
            host_port(pool.address, pool.exporter_port) if pool else None,
            [(node.name, host_port(node.address, PATRONI_PORT)) for node in inventory.db_nodes]).items():
        host.add(f"{folder}/{name}", text)
    host.add_unit("prometheus.service", units.unit("Prometheus for greenflask", [
        ("User", "prometheus"),
        ("ExecStart", f"/usr/bin/prometheus --config.file={layout.path(folder + '/prometheus.yml')} "
                      f"--storage.tsdb.path={layout.path('var/lib/prometheus/greenflask')} "
                      f"--web.listen-address={host_port(monitor.address, monitor.port)} "
                      f"--storage.tsdb.retention.time={monitor.retention}"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"), ("Restart", "always"), *units.BASELINE]))
    # PostgreSQL's exporter reads the primary: through PgBouncer's host's HAProxy with
    # db_nodes (so that it follows a failover), else the server itself.
    ca, password = layout.path("etc/prometheus/greenflask/tls/ca.crt"), layout.path(
        "etc/prometheus/greenflask/postgres.password")
    if inventory.db_nodes:
        source = f"{host_port(pool.address, pool.primary_port)}/postgres?sslmode=verify-full&sslrootcert={ca}"
    else:
        server = inventory.postgres
        tls = "disable" if server.address.is_loopback else f"verify-full&sslrootcert={ca}"
        source = f"{host_port(server.address, server.port)}/{server.database}?sslmode={tls}"
    env_file = "etc/prometheus/greenflask/postgres-exporter.env"
    host.add(env_file, units.environment_text({"DATA_SOURCE_URI": source, "DATA_SOURCE_USER": "postgres",
                                                "DATA_SOURCE_PASS_FILE": password}))
    host.add_unit("prometheus-postgres-exporter.service", units.unit("PostgreSQL's exporter for Prometheus", [
        ("User", "prometheus"), ("EnvironmentFile", layout.path(env_file)),
        ("ExecStart", f"{EXPORTER} --web.listen-address={postgres_exporter}"),
        ("Restart", "always"), *units.BASELINE]))
    host.needs += [Need(ca, CA, 0o644, "prometheus", "ca"),
                   Need(password, "the password of PostgreSQL's superuser, alone on one line", owner="prometheus",
                        kind="superuser_password")]
    return host


# --- the cluster's Prometheus -------------------------------------------------------------


def start_postgres_exporter(state: State, database_url: str | None) -> str:
    """Debian's prometheus-postgres-exporter for the primary (its connection string in the
    environment, not in argv; with --ha, through HAProxy's primary port, so that it follows
    a failover, its password read from a file); the address it serves on."""
    executable = program("prometheus-postgres-exporter", "prometheus-postgres-exporter")
    if state.get("ha"):
        files = Credentials(CLUSTER_DIR)
        env = {"DATA_SOURCE_URI": f"{state['ha']['router']}:{state['ha']['primary_port']}/postgres?sslmode=verify-full"
                                  f"&sslrootcert={files.ca_cert}",
               "DATA_SOURCE_USER": "postgres", "DATA_SOURCE_PASS_FILE": str(files.superuser_password)}
    else:
        url = make_url(database_url or embedded.embedded_url())
        query = {"sslmode": "disable", **url.query} if "sslmode" not in url.query else dict(url.query)
        env = {"DATA_SOURCE_NAME": url.set(drivername="postgresql", query=query).render_as_string(hide_password=False)}
    address = f"127.0.0.1:{servers.free_port()}"
    pid = spawn([executable, f"--web.listen-address={address}"], "postgres-exporter.log", env)
    state["postgres_exporter"] = {"pid": pid, "address": address}
    save_state(state)
    return address


def start_pgbouncer_exporter(state: State) -> str:
    """deploy/pgbouncer_exporter.py for this cluster's PgBouncer; the address it serves on."""
    address = f"127.0.0.1:{servers.free_port()}"
    pgbouncer = state["pgbouncer"]
    pid = spawn([sys.executable, "-m", "deploy.pgbouncer_exporter", "--listen", address, "--pgbouncer",
                 pgbouncer["address"], "--passfile", pgbouncer["admin_passfile"], "--ca", pgbouncer["ca"]],
                "pgbouncer-exporter.log")
    state["pgbouncer_exporter"] = {"pid": pid, "address": address}
    save_state(state)
    wait_for(lambda: servers.status_of(f"http://{address}/metrics") == 200 or not servers.is_alive(pid),
             "the PgBouncer exporter")
    return address


def start_prometheus(state: State, database_url: str | None) -> None:
    """Prometheus with deploy/prometheus/ as it is, scraping every host's /metrics on its own
    address and HAProxy's exporter; the targets are files it reads (file_sd)."""
    executable = program("prometheus", "prometheus")
    folder = CLUSTER_DIR / "prometheus"
    (folder / "targets").mkdir(parents=True, exist_ok=True)
    for name in ("prometheus.yml", "alerts.yml", "recording.yml"):
        shutil.copy(DEPLOY_DIR / "prometheus" / name, folder / name)
    postgres = start_postgres_exporter(state, database_url)
    pgbouncer = start_pgbouncer_exporter(state) if state.get("pgbouncer") else None
    nodes = [(node["name"], f"{node['address']}:{PATRONI_PORT}") for node in (state.get("ha") or {}).get("nodes", [])]
    for name, text in targets([(host["name"], f"{host['address']}:{host['port']}") for host in state["hosts"]],
                              state["haproxy"]["exporter"], postgres, pgbouncer, nodes).items():
        (folder / name).write_text(text)
    url = f"http://127.0.0.1:{servers.free_port()}"
    pid = spawn([executable, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
                 f"--web.listen-address={url.removeprefix('http://')}", "--storage.tsdb.retention.time=1d"],
                "prometheus.log")
    state["prometheus"] = {"pid": pid, "url": url}
    save_state(state)
    wait_for(lambda: servers.status_of(url + "/-/ready") == 200 or not servers.is_alive(pid), "Prometheus")
    if not servers.is_alive(pid):
        raise click.ClickException(f"Prometheus exited: {log_tail('prometheus.log')}")
