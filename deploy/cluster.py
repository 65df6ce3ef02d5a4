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
`up` writes these hosts as an inventory and renders it (deploy/localhosts.py, the same
render as real hosts get), and every part runs its rendered unit (deploy/runtime.py's
run_unit: there is no systemd here).
What `up` starts is written to CLUSTER_DIR/state.json as it goes; `down` stops each by
its PID and removes the namespaces and links, also after an `up` that failed half-way.
CLUSTER_NET (default 10.77) picks the networks, so two clusters can run side by side.
`up` removes the namespaces and bridges of its CLUSTER_NET that a cluster killed before
`down` left, unless a process still runs in one (then that network is a live cluster's).
"""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import click
from sqlalchemy.engine import make_url

from deploy import apphosts, credentials, ha, haproxy, localhosts, monitoring, pgbouncer, postgres
from deploy.credentials import APP_ROLE, Credentials
from deploy.network import (
    Network,
    ip,
    make_bridges,
    make_db_namespace,
    make_host_namespace,
    remove_network,
    remove_stale_network,
)
from deploy.rollout import longest_request_seconds, replace_host
from deploy.runtime import CLUSTER_DIR, CLUSTER_NET, State, load_state, program, save_state, state_path, wait_for
from greenflask import PROJECT_DIR, embedded, servers
from greenflask.settings import Settings

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
@click.option("--monitoring", "with_monitoring", is_flag=True,
              help="Prometheus (deploy/prometheus/) scraping the hosts and HAProxy, with the alert rules.")
@click.option("--replica", is_flag=True,
              help="A streaming replica of the embedded PostgreSQL for the hosts' reads (DATABASE_READ_URL).")
@click.option("--ha", "ha_nodes", is_flag=True,
              help="PostgreSQL run by Patroni on --db-nodes nodes (etcd, synchronous replication, failover), "
                   "behind HAProxy; reads from the replicas.")
@click.option("--db-nodes", default=3, show_default=True, type=click.IntRange(2, 5), help="With --ha: nodes.")
@RELEASE_OPTION
def up(hosts: int, workers: int, port: int, pgbouncer_pool: int, direct: bool, with_monitoring: bool,
       replica: bool, ha_nodes: bool, db_nodes: int, release: Path) -> None:
    """Start PostgreSQL, PgBouncer, the app hosts and HAProxy (and Prometheus); print the balancer's URL last."""
    settings = Settings.from_env()
    if load_state():
        raise click.ClickException(f"a cluster is already up ({state_path()}): python -m deploy.cluster down")
    if not direct:
        program("pgbouncer")
    program("haproxy")
    if with_monitoring:
        program("prometheus", "prometheus")
        program("prometheus-postgres-exporter", "prometheus-postgres-exporter")
    if replica and (direct or settings.database_url):
        raise click.ClickException("--replica needs the embedded PostgreSQL and PgBouncer: no DATABASE_URL, "
                                   "no --direct")
    if ha_nodes:
        if direct or replica or settings.database_url or os.geteuid() != 0:
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
        _bring_up(state, settings, network, hosts, workers, port, pgbouncer_pool, direct, replica, db_nodes,
                  with_monitoring)
        if with_monitoring:
            click.echo(f"Prometheus: {state['prometheus']['url']}, pid {state['prometheus']['pid']}")
    except BaseException:
        click.echo(f"up failed; stopping what started (logs in {CLUSTER_DIR})", err=True)
        _tear_down(state)
        raise
    click.echo(f"{hosts} hosts x {workers} workers, {'straight to PostgreSQL' if direct else 'through PgBouncer'}; "
               "python -m deploy.cluster status | down")
    click.echo(state["haproxy"]["url"])


def _bring_up(state: State, settings: Settings, network: Network, hosts: int, workers: int, port: int,
              pgbouncer_pool: int, direct: bool, replica: bool, db_nodes: int, with_monitoring: bool) -> None:
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
    metrics_dirs = [str(apphosts.metrics_folder(network, number)) for number in range(1, hosts + 1)]

    def render(server, replica_url) -> tuple:
        """This cluster as an inventory, rendered (deploy/localhosts.py)."""
        inventory = localhosts.inventory(settings, network, port, hosts, workers, pgbouncer_pool, server, replica_url,
                                         not direct, db_nodes, metrics_dirs, ha.postgres_version() if db_nodes else 15,
                                         with_monitoring)
        rendered = localhosts.write(inventory, Path(state["release"]))
        state["rendered"] = str(localhosts.folder())
        save_state(state)
        return inventory, rendered

    if db_nodes:
        credentials.make_certificates(files, {**tls_names, **ha.certificate_names(network, db_nodes)}, ha.RUN_AS)
        inventory, rendered = render(None, None)
        ha.make_secrets(files)
        localhosts.install_needs(rendered, files)
        superuser = ha.start(state, inventory, files, network, localhosts.host_root)
        database_url = make_url(embedded.ensure_database(superuser.render_as_string(hide_password=False),
                                                         embedded.DATABASE))
        click.echo(f"PostgreSQL: {db_nodes} nodes run by Patroni (etcd {state['ha']['etcd']['url']}), primary "
                   f"{ha.primary(state)}, synchronous replication; HAProxy {state['ha']['router']}:"
                   f"{state['ha']['primary_port']} (primary), :{state['ha']['replicas_port']} (replicas)")
    else:
        database_url = postgres.start(state, settings.database_url)
        click.echo(f"PostgreSQL: {state['postgres']['url']}")
        if not direct:
            credentials.make_certificates(files, tls_names, pgbouncer.run_as_user(database_url))
    postgres.seed(Path(state["release"]), database_url, pgbouncer=not direct)
    replica_url = None
    if replica:
        replica_url = postgres.start_replica(state, database_url)
        click.echo(f"replica: {state['replica']['pgdata']} (streaming from the primary), pid {state['replica']['pid']}")
    app_url, app_secret = pgbouncer.make_app_role(database_url, files)
    if db_nodes:
        ha.wait_until_replicated(state)
    else:
        inventory, rendered = render(app_url if direct else database_url, replica_url)
        # PostgreSQL's exporter reads the superuser's password from a file (none over a socket).
        credentials.write_private(files.superuser_password, database_url.password or "")
    state["passfile"] = str(files.app_passfile)
    save_state(state)
    click.echo(f"app role: {APP_ROLE}, its password in {state['passfile']} (mode 600)")
    if not direct:
        pgbouncer.write_pgbouncer_secrets(files, app_url, app_secret, inventory.pgbouncer.user)
    localhosts.install_needs(rendered, files)
    click.echo(f"rendered: {state['rendered']} (the inventory of these hosts, one folder each)")
    if not direct:
        pgbouncer.start(state, inventory.pgbouncer, localhosts.unit(localhosts.POOL, "pgbouncer.service"), files)
        click.echo(f"PgBouncer: {state['pgbouncer']['address']} (transaction mode, {pgbouncer_pool} server "
                   "connections; SCRAM and TLS required)")
    for number in range(1, hosts + 1):
        apphosts.start(state, network, number, localhosts.unit(f"host{number}", "greenflask.service"))
    for host in state["hosts"]:
        wait_for(lambda host=host: apphosts.is_healthy(host), f"{host['name']} ({apphosts.url(host)})", within=60)
        click.echo(f"{host['name']}: {apphosts.url(host)} gunicorn pid {host['gunicorn_pid']}")
    haproxy.start_balancer(state, inventory.balancer, localhosts.unit(localhosts.BALANCER, "haproxy.service"),
                           localhosts.host_root(localhosts.BALANCER) / "run/haproxy/admin.sock")
    admin_socket = state["haproxy"]["admin_socket"]
    wait_for(lambda: set(haproxy.server_states(admin_socket).values()) == {"UP"}, "HAProxy")
    click.echo(f"HAProxy: pid {state['haproxy']['pid']}, every host UP")
    if with_monitoring:
        monitoring.start(state, inventory, localhosts.host_root)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object (hosts, pgbouncer, haproxy, postgres).")
def status(as_json: bool) -> None:
    """What runs, by PID, and which hosts are healthy."""
    state = load_state()
    if state is None:
        raise click.ClickException("no cluster is up")
    states = haproxy.server_states(state["haproxy"]["admin_socket"]) if state.get("haproxy") else {}
    report = {
        "passfile": state.get("passfile"),
        "rendered": state.get("rendered"),
        "hosts": [{"name": host["name"], "address": host["address"], "gunicorn_pid": host["gunicorn_pid"],
                   "healthy": apphosts.is_healthy(host), "haproxy": states.get(host["name"]),
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
    pgbouncer.admin(state["pgbouncer"], "PAUSE")
    try:
        old, new = ha.switchover(state, candidate)
        wait_for(lambda: haproxy.server_states(admin, "postgres_primary").get(new) == "UP"
                 and haproxy.server_states(admin, "postgres_primary").get(old) != "UP",
                 f"HAProxy to route writes to {new}")
    finally:
        pgbouncer.admin(state["pgbouncer"], "RESUME")
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
        pgbouncer.run(state, online=True)
    else:
        if not state["postgres"]["embedded"]:
            raise click.ClickException("PostgreSQL is DATABASE_URL's server: restart it with its own tools")
        pgdata = Path(state["postgres"]["pgdata"])
        database = make_url(state["postgres"]["url"]).database
        pgbouncer.admin(state["pgbouncer"], f"PAUSE {database}")  # returns once no transaction runs
        try:
            embedded.stop(pgdata)
            embedded.start(pgdata)
            state["postgres"]["pid"] = embedded.server_pid(pgdata)
            save_state(state)
        finally:
            pgbouncer.admin(state["pgbouncer"], f"RESUME {database}")
    click.echo(f"{part} restarted in {time.monotonic() - started:.2f} s")




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
    settings = Settings.from_env()
    state = load_state()
    if state is None or not state.get("haproxy"):
        raise click.ClickException("no cluster is up")
    if migrate:
        postgres.migrate_schema(state, release, settings.database_url)
    hosts = {host["name"]: host for host in state["hosts"]}
    chosen = [name.strip() for name in names.split(",")] if names else list(hosts)
    if unknown := [name for name in chosen if name not in hosts]:
        raise click.ClickException(f"no host {', '.join(unknown)}: {', '.join(hosts)}")
    admin = state["haproxy"]["admin_socket"]
    bound = longest_request_seconds(settings) + drain_margin
    state["release"] = str(release)
    for name in chosen:
        hosts[name]["release"] = str(release)
        replace_host(state, hosts[name], admin, bound)




@cli.command()
@RELEASE_OPTION
@click.option("--revision", default="head", show_default=True, help="The revision to upgrade to.")
def migrate(release: Path, revision: str) -> None:
    """Apply the release's migrations to the cluster's database (alembic upgrade), straight
    to PostgreSQL, with --ha to the primary: a contract step after a rollout, say."""
    state = load_state()
    if state is None or not state.get("postgres") and not state.get("ha"):
        raise click.ClickException("no cluster is up")
    postgres.migrate_schema(state, release, Settings.from_env().database_url, revision)


@cli.command()
def down() -> None:
    """Stop everything `up` started, by PID, and remove its namespaces and links."""
    state = load_state()
    if state is None:
        click.echo("no cluster is up")
        return
    _tear_down(state)
    click.echo("cluster down")


def _tear_down(state: State) -> None:
    """Gracefully, front to back: HAProxy stops listening and lets its requests finish
    (SIGUSR1, its soft stop), every host finishes what it holds (SIGTERM, gunicorn's
    graceful_timeout), then PgBouncer and PostgreSQL."""
    servers.stop((state.get("prometheus") or {}).get("pid"), grace=10)
    servers.stop((state.get("postgres_exporter") or {}).get("pid"), grace=5)
    servers.stop((state.get("pgbouncer_exporter") or {}).get("pid"), grace=5)
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
    shutil.rmtree(localhosts.folder(), ignore_errors=True)
    if state["namespaces"]:
        remove_network(Network(state["net"], namespaces=True), state["planned_hosts"],
                       state.get("planned_db_nodes", 0))
    state_path().unlink(missing_ok=True)


if __name__ == "__main__":
    cli()
