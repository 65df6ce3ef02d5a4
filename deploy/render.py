"""Every config file and systemd unit of a deployment, one folder per host, from one inventory.

    python -m deploy.render INVENTORY.yml --out DIR [--root ROOT] [--prefix APP_DIR]

DIR/<host>/ holds that host's files as they lie under ROOT (default /): copy it there
(`rsync -a DIR/app1/ root@app1:/`) and enable its units in the order DIR/<host>/UNITS
names. DIR/<host>/NEEDS lists the files the render does not write (secrets,
certificates), each with its mode and owner. ROOT may hold `{name}`, the host's name,
for several hosts on one machine (the cluster gives each its own). docs/deployment.md
is the runbook; deploy/inventory.py the inventory's keys.
"""

import shutil
import sys
from pathlib import Path, PurePosixPath

import click

from deploy import apphosts, ha, haproxy, monitoring, pgbouncer
from deploy.inventory import Inventory, InventoryError, load
from deploy.layout import Layout, Rendered

DEFAULT_PREFIX = "/opt/greenflask"


def render(inventory: Inventory, root: str = "/", prefix: str = DEFAULT_PREFIX, venv: str | None = None
           ) -> list[Rendered]:
    """What every host of `inventory` runs, its paths under `root` (`{name}` replaced); the
    app at `prefix`, its virtualenv `venv` (PREFIX/.venv)."""

    def layout(name: str) -> Layout:
        return Layout(PurePosixPath(root.replace("{name}", name)), PurePosixPath(prefix),
                      PurePosixPath(venv or f"{prefix}/.venv"))

    hosts = [haproxy.render_balancer(inventory, layout(inventory.balancer.name))]
    hosts += [apphosts.render(inventory, layout(host.name), host) for host in inventory.app_hosts]
    if inventory.pgbouncer:
        hosts.append(pgbouncer.render(inventory, layout(inventory.pgbouncer.name)))
    hosts += [ha.render_node(inventory, layout(node.name), node) for node in inventory.db_nodes]
    hosts += [ha.render_etcd(inventory, layout(member.name), member) for member in inventory.etcd]
    if inventory.prometheus:
        hosts.append(monitoring.render(inventory, layout(inventory.prometheus.name)))
    return hosts


def write(hosts: list[Rendered], out: Path) -> None:
    """DIR/<host>/ for each host (an earlier render's removed first), its UNITS and NEEDS."""
    for host in hosts:
        folder = out / host.name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        host.write(folder)
        (folder / "UNITS").write_text("".join(f"{name}\n" for name in host.units))


@click.command()
@click.argument("inventory_path", metavar="INVENTORY.yml", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Where to write.")
@click.option("--root", default="/", show_default=True, help="Where the files lie on each host ({name}: its name).")
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="Where the app is installed on each host.")
def main(inventory_path: Path, out: Path, root: str, prefix: str) -> None:
    """Render the inventory: one folder per host (see the module's docstring)."""
    if not root.startswith("/") or not prefix.startswith("/"):
        raise click.UsageError("--root and --prefix are absolute paths")
    try:
        inventory = load(inventory_path)
    except InventoryError as error:
        click.echo(f"{inventory_path}: {error}", err=True)
        sys.exit(2)
    hosts = render(inventory, root, prefix)
    write(hosts, out)
    for host in hosts:
        click.echo(f"{host.name}: {', '.join(host.units)}; {len(host.files)} files, {len(host.needs)} to put there "
                   f"({out / host.name / 'NEEDS'})")


if __name__ == "__main__":
    main()
