"""HAProxy: the balancer in front of the app hosts (deploy/haproxy.cfg), and, with Patroni,
the router in front of the database nodes (deploy/haproxy-postgres.cfg); their admin socket.

The config texts are made here for both the render (deploy/render.py) and the cluster.
"""

import csv
import io
import socket
import subprocess
from pathlib import Path
from string import Template

import click

from deploy import units
from deploy.inventory import Balancer, Inventory
from deploy.layout import Layout, Need, Rendered
from deploy.runtime import DEPLOY_DIR, State, run_unit, save_state

EXECUTABLE = "/usr/sbin/haproxy"
PATRONI_PORT = 8008


def balancer_config(bind: str, exporter_bind: str, admin_socket: str, hosts: list[tuple[str, str, int]],
                    max_body_bytes: int) -> str:
    """deploy/haproxy.cfg with these values and a `server` line per (name, address, port)."""
    text = Template((DEPLOY_DIR / "haproxy.cfg").read_text()).substitute(
        bind=bind, exporter_bind=exporter_bind, admin_socket=admin_socket, max_body_bytes=max_body_bytes)
    return text + "".join(f"    server {name} {address}:{port}\n" for name, address, port in hosts)


def database_config(admin_socket: str, primary_bind: str, replicas_bind: str, nodes: list[tuple[str, str]],
                    postgres_port: int = 5432) -> str:
    """deploy/haproxy-postgres.cfg with a `server` line per (name, address) in both sections."""
    lines = "".join(f"    server {name} {address}:{postgres_port} check port {PATRONI_PORT}\n"
                    for name, address in nodes)
    return Template((DEPLOY_DIR / "haproxy-postgres.cfg").read_text()).substitute(
        admin_socket=admin_socket, primary_bind=primary_bind, replicas_bind=replicas_bind, servers=lines)


def host_port(address: object, port: int) -> str:
    """ADDRESS:PORT, an IPv6 address in brackets."""
    text = str(address)
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def unit(description: str, config: str) -> str:
    """HAProxy in master-worker mode, telling systemd when it is ready (Type=notify); a reload
    (USR2) re-reads the config and hands the listening sockets to new workers."""
    return units.unit(description, [
        ("Type", "notify"),
        ("ExecStartPre", f"{EXECUTABLE} -c -q -f {config}"),
        ("ExecStart", f"{EXECUTABLE} -Ws -f {config}"),
        ("ExecReload", f"{EXECUTABLE} -c -q -f {config}"),
        ("ExecReload", "/bin/kill -USR2 $MAINPID"),
        ("KillMode", "mixed"),
        ("Restart", "always"),
        *units.BASELINE,
    ])


def render_balancer(inventory: Inventory, layout: Layout) -> Rendered:
    balancer = inventory.balancer
    host = Rendered(balancer.name)
    config = "etc/haproxy/haproxy.cfg"
    host.add(config, balancer_config(
        host_port(balancer.address, balancer.port), host_port(balancer.address, balancer.exporter_port),
        layout.path("run/haproxy/admin.sock"),
        [(app.name, str(app.address), app.port) for app in inventory.app_hosts], inventory.app.max_body_bytes))
    host.add_unit("haproxy.service", unit("HAProxy in front of the greenflask app hosts", layout.path(config)))
    host.needs.append(Need(layout.path("run/haproxy"), "its admin socket's folder", 0o755, kind="folder"))
    return host


def render_database_router(inventory: Inventory, layout: Layout, host: Rendered) -> None:
    """On PgBouncer's host, with db_nodes: the HAProxy that sends PgBouncer's connections
    to Patroni's primary and to its replicas."""
    pool = inventory.pgbouncer
    config = "etc/haproxy/haproxy-postgres.cfg"
    host.add(config, database_config(
        layout.path("run/haproxy-postgres/admin.sock"), host_port(pool.address, pool.primary_port),
        host_port(pool.address, pool.replicas_port), [(node.name, str(node.address)) for node in inventory.db_nodes]))
    host.add_unit("haproxy-postgres.service",
                  unit("HAProxy in front of the Patroni nodes (primary and replicas)", layout.path(config)))
    host.needs.append(Need(layout.path("run/haproxy-postgres"), "its admin socket's folder", 0o755, kind="folder"))


# --- the cluster's balancer ---------------------------------------------------------------


def start_balancer(state: State, balancer: Balancer, unit: Path, admin_socket: Path) -> None:
    """The balancer from its rendered unit (its ExecStartPre checks the config first)."""
    pid = run_unit(unit, "haproxy.log")
    state["haproxy"] = {"pid": pid, "url": f"http://{host_port(balancer.address, balancer.port)}",
                        "admin_socket": str(admin_socket),
                        "exporter": host_port(balancer.address, balancer.exporter_port)}
    save_state(state)


def check(executable: str, config: Path) -> None:
    """`haproxy -c`: stop with HAProxy's own words when it refuses the config."""
    checked = subprocess.run([executable, "-c", "-q", "-f", str(config)], capture_output=True, text=True)
    if checked.returncode != 0:
        raise click.ClickException(f"{config.name}: {checked.stderr.strip()}")


# --- the admin socket ------------------------------------------------------------------


def admin(admin_socket: str, command: str) -> str:
    """One command on HAProxy's admin socket; its answer ("" when HAProxy does not answer)."""
    try:
        with socket.socket(socket.AF_UNIX) as connection:
            connection.settimeout(2)
            connection.connect(admin_socket)
            connection.sendall(command.encode() + b"\n")
            return b"".join(iter(lambda: connection.recv(65536), b"")).decode()
    except OSError:
        return ""


def server_rows(admin_socket: str, backend: str = "app_hosts") -> dict[str, dict]:
    """{server name: its `show stat` row in `backend`} (status "UP", "DOWN", "DRAIN", ...;
    scur: requests or connections in flight; stot: sent so far)."""
    rows = csv.DictReader(io.StringIO(admin(admin_socket, "show stat").lstrip("# ")))
    return {row["svname"]: row for row in rows if row["pxname"] == backend
            and row["svname"] not in ("BACKEND", "FRONTEND")}


def server_states(admin_socket: str, backend: str = "app_hosts") -> dict[str, str]:
    """{server name: "UP" | "DOWN" | ...} in `backend`, from HAProxy's admin socket."""
    return {name: row["status"] for name, row in server_rows(admin_socket, backend).items()}
