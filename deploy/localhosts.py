"""The one-machine cluster as an inventory: its namespaces' addresses are the hosts, rendered
by deploy/render.py into CLUSTER_DIR/rendered/<host>/ (each host's root), and each file of
NEEDS put there from the cluster's own secrets (deploy/credentials.py), as an operator
would on real hosts. The cluster then starts every part from its rendered unit
(runtime.run_unit).
"""

import getpass
import os
import shutil
import sys
from ipaddress import ip_address
from pathlib import Path

from sqlalchemy.engine import URL

from deploy import inventory as model
from deploy import pgbouncer as pgbouncer_part
from deploy import render
from deploy.credentials import Credentials
from deploy.layout import Rendered
from deploy.network import SUBNETS, Network
from deploy.runtime import CLUSTER_DIR, user_exists
from greenflask import servers
from greenflask.settings import Settings, Tools

BALANCER, POOL = "balancer", "pgbouncer"


def folder() -> Path:
    return CLUSTER_DIR / "rendered"


def host_root(name: str) -> Path:
    return folder() / name


def unit(name: str, service: str) -> Path:
    """The rendered unit `service` of host `name`."""
    return host_root(name) / "etc/systemd/system" / service


def inventory(settings: Settings, network: Network, port: int, hosts: int, workers: int, pool_size: int,
              server: URL | None, replica: URL | None, pgbouncer: bool, db_nodes: int,
              metrics_dirs: list[str], postgres_version: int = 15, monitoring: bool = False) -> model.Inventory:
    """The inventory of this machine's cluster. `server`: the database (None with db_nodes);
    PgBouncer and the database router listen on the back bridge (127.0.0.2 when not root)."""
    data: dict = {
        "balancer": {"name": BALANCER, "address": "127.0.0.1", "port": port, "exporter_port": servers.free_port()},
        "app_hosts": [{"name": f"host{number}", "address": network.host_address(number, "front"),
                       "workers": workers, "metrics_dir": metrics_dirs[number - 1]} for number in range(1, hosts + 1)],
        "app": {"pool_size": settings.pool_size, "max_overflow": settings.max_overflow,
                "statement_timeout_ms": settings.statement_timeout_ms, "max_body_bytes": settings.max_body_bytes},
        "postgres_version": postgres_version,
    }
    if pgbouncer:
        data["pgbouncer"] = {"name": POOL, "address": network.pgbouncer_address(),
                             "port": 6432 if network.namespaces else servers.free_port(), "pool_size": pool_size,
                             "user": pgbouncer_part.run_as_user(server) or getpass.getuser(),
                             "exporter_port": servers.free_port(),
                             "primary_port": servers.free_port(), "replicas_port": servers.free_port()}
    if monitoring:  # on a loopback address of its own; run as PgBouncer is (the socket's owner)
        data["prometheus"] = {"name": "prometheus", "address": "127.0.0.3", "port": servers.free_port(),
                              "postgres_exporter_port": servers.free_port(),
                              "user": pgbouncer_part.run_as_user(server) or getpass.getuser(),
                              "rule_windows": Tools.from_env().cluster_rule_windows}
    if db_nodes:
        data["db_nodes"] = [{"name": f"db{number}", "address": network.db_address(number)}
                            for number in range(1, db_nodes + 1)]
        data["etcd"] = [{"name": "etcd1", "address": network.bridge_address("db"), "peer_port": servers.free_port()}]
        data["database_clients"] = [f"{network.net}.{SUBNETS['db']}.0/24"]
    else:
        data["postgres"] = postgres_of(server, replica)
    return model.parse(data)


def postgres_of(server: URL, replica: URL | None) -> dict:
    """The inventory's `postgres` for a URL: over its unix socket when it names one."""
    def one(url: URL) -> dict:
        socket_dir = url.query.get("host")
        address = url.host if url.host and _is_address(url.host) else "127.0.0.1"
        return {"name": "postgres", "address": address, "port": url.port or 5432, "database": url.database,
                "socket_dir": socket_dir}
    return {**one(server), "replica": one(replica) if replica is not None else None}


def _is_address(text: str) -> bool:
    try:
        ip_address(text)
        return True
    except ValueError:
        return False


def write(inventory: model.Inventory, release: Path) -> list[Rendered]:
    """Render the inventory into CLUSTER_DIR/rendered (its inventory.yml beside the hosts):
    the app at `release`, its virtualenv this Python's."""
    hosts = render.render(inventory, str(folder() / "{name}"), str(release), venv=sys.prefix)
    shutil.rmtree(folder(), ignore_errors=True)
    render.write(hosts, folder())
    (folder() / "inventory.yml").write_text(model.dump(inventory))
    return hosts


def install_needs(hosts: list[Rendered], files: Credentials) -> None:
    """Each host's NEEDS from the cluster's own secrets: copied, with the mode NEEDS names and
    its owner where that user exists here (root otherwise), and the folders made."""
    sources = {"ca": files.ca_cert, "app_passfile": files.app_passfile, "auth_file": files.auth_file,
               "admin_passfile": files.admin_passfile, "superuser_password": files.superuser_password,
               "patroni_secrets": files.patroni_env}
    for host in hosts:
        for need in host.needs:
            path = Path(need.path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if need.kind == "folder":
                path.mkdir(mode=need.mode, exist_ok=True)
            else:
                kind, _, server = need.kind.partition(":")
                source = {"cert": files.cert, "key": files.key}[kind](server) if server else sources.get(kind)
                if source is None or not source.exists():
                    continue  # not made in this mode (no CA with --direct, say)
                shutil.copyfile(source, path)
            path.chmod(need.mode)
            if os.geteuid() == 0 and user_exists(need.owner):
                shutil.chown(path, need.owner, need.owner)
