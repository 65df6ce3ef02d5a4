"""Prometheus (deploy/prometheus/: its config, recording and alert rules, the same everywhere)
and the exporters it scrapes besides the app hosts: HAProxy's own, PostgreSQL's (Debian's
prometheus-postgres-exporter), PgBouncer's (deploy/pgbouncer_exporter.py), Patroni's.
"""

import json
import math
import re

import click

from deploy import units
from deploy.haproxy import PATRONI_PORT, host_port
from deploy.inventory import Inventory
from deploy.layout import Layout, Need, Rendered
from deploy.pgbouncer import CA
from deploy.runtime import DEPLOY_DIR, State, log_tail, run_unit, save_state, wait_for
from greenflask import servers

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


# A scaled window is never shorter than this: two scrapes and evaluations (prometheus.yml: 2 s).
SHORTEST_WINDOW = 4
WINDOW = re.compile(r"(?<=for: )(\d+)([smh])\b|(?<=\[)(\d+)([smh])(?=\])")


def scaled(rules: str, factor: float) -> str:
    """`rules` with every `for:` and range window (`[1m]`) times `factor`, in whole seconds:
    the same alerts, firing sooner (a test's cluster). 1 leaves the text as it is."""
    if factor == 1:
        return rules

    def shorter(match: re.Match) -> str:
        number, unit = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
        seconds = int(number) * {"s": 1, "m": 60, "h": 3600}[unit]
        return f"{max(SHORTEST_WINDOW, math.ceil(seconds * factor))}s"

    return WINDOW.sub(shorter, rules)


def render(inventory: Inventory, layout: Layout) -> Rendered:
    monitor, pool = inventory.prometheus, inventory.pgbouncer
    host = Rendered(monitor.name)
    folder = "etc/prometheus/greenflask"
    for name in RULES:
        host.add(f"{folder}/{name}", scaled((DEPLOY_DIR / "prometheus" / name).read_text(), monitor.rule_windows))
    postgres_exporter = host_port(monitor.address, monitor.postgres_exporter_port)
    for name, text in targets(
            [(app.name, host_port(app.address, app.port)) for app in inventory.app_hosts],
            host_port(inventory.balancer.address, inventory.balancer.exporter_port), postgres_exporter,
            host_port(pool.address, pool.exporter_port) if pool else None,
            [(node.name, host_port(node.address, PATRONI_PORT)) for node in inventory.db_nodes]).items():
        host.add(f"{folder}/{name}", text)
    host.add_unit("prometheus.service", units.unit("Prometheus for greenflask", [
        ("User", monitor.user),
        ("ExecStart", f"/usr/bin/prometheus --config.file={layout.path(folder + '/prometheus.yml')} "
                      f"--storage.tsdb.path={layout.path('var/lib/prometheus/greenflask')} "
                      f"--web.listen-address={host_port(monitor.address, monitor.port)} "
                      f"--storage.tsdb.retention.time={monitor.retention}"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"), ("Restart", "always"), *units.BASELINE]))
    # PostgreSQL's exporter reads the primary: through PgBouncer's host's HAProxy with
    # db_nodes (so that it follows a failover), else the server itself (over its unix socket
    # where it names one, which needs no password).
    ca, password = layout.path("etc/prometheus/greenflask/tls/ca.crt"), layout.path(
        "etc/prometheus/greenflask/postgres.password")
    server = inventory.postgres
    if inventory.db_nodes:
        source = {"DATA_SOURCE_URI": f"{host_port(pool.address, pool.primary_port)}/postgres?sslmode=verify-full"
                                     f"&sslrootcert={ca}"}
    elif server.socket_dir:
        source = {"DATA_SOURCE_NAME": f"postgresql://postgres@:{server.port}/{server.database}"
                                      f"?host={server.socket_dir}&sslmode=disable"}
    else:
        tls = "disable" if server.address.is_loopback else f"verify-full&sslrootcert={ca}"
        source = {"DATA_SOURCE_URI": f"{host_port(server.address, server.port)}/{server.database}?sslmode={tls}"}
    if "DATA_SOURCE_URI" in source:
        source.update(DATA_SOURCE_USER="postgres", DATA_SOURCE_PASS_FILE=password)
        host.needs.append(Need(password, "the password of PostgreSQL's superuser, alone on one line",
                               owner=monitor.user, kind="superuser_password"))
    env_file = "etc/prometheus/greenflask/postgres-exporter.env"
    host.add(env_file, units.environment_text(source))
    host.add_unit("prometheus-postgres-exporter.service", units.unit("PostgreSQL's exporter for Prometheus", [
        ("User", monitor.user), ("EnvironmentFile", layout.path(env_file)),
        ("ExecStart", f"{EXPORTER} --web.listen-address={postgres_exporter}"),
        ("Restart", "always"), *units.BASELINE]))
    host.needs += [Need(ca, CA, 0o644, monitor.user, "ca"),
                   Need(layout.path("var/lib/prometheus"), "Prometheus's home (Debian's package makes it)", 0o755,
                        monitor.user, "folder")]
    return host


# --- the cluster's Prometheus -------------------------------------------------------------


def start(state: State, inventory: Inventory, root) -> None:
    """PgBouncer's exporter, PostgreSQL's and Prometheus, each from its rendered unit
    (`root(name)`: that host's root)."""
    def run(host: str, unit: str, key: str, address: str) -> int:
        pid = run_unit(root(host) / "etc/systemd/system" / unit, f"{key.replace('_', '-')}.log")
        state[key] = {"pid": pid, "address": address}
        save_state(state)
        wait_for(lambda: servers.status_of(f"http://{address}/metrics") == 200 or not servers.is_alive(pid), unit)
        if not servers.is_alive(pid):
            raise click.ClickException(f"{unit} exited: {log_tail(key.replace('_', '-') + '.log')}")
        return pid

    monitor, pool = inventory.prometheus, inventory.pgbouncer
    if pool is not None:
        run(pool.name, "greenflask-pgbouncer-exporter.service", "pgbouncer_exporter",
            host_port(pool.address, pool.exporter_port))
    run(monitor.name, "prometheus-postgres-exporter.service", "postgres_exporter",
        host_port(monitor.address, monitor.postgres_exporter_port))
    url = f"http://{host_port(monitor.address, monitor.port)}"
    pid = run_unit(root(monitor.name) / "etc/systemd/system/prometheus.service", "prometheus.log")
    state["prometheus"] = {"pid": pid, "url": url}
    save_state(state)
    wait_for(lambda: servers.status_of(url + "/-/ready") == 200 or not servers.is_alive(pid), "Prometheus")
    if not servers.is_alive(pid):
        raise click.ClickException(f"Prometheus exited: {log_tail('prometheus.log')}")
