"""PostgreSQL that can lose its primary and no acknowledged write (`up --ha`): etcd, Patroni
and HAProxy, the field's standard recipe.

    PgBouncer -> HAProxy POOL:PRIMARY  (asks each node's Patroni GET /primary) -> the primary
              -> HAProxy POOL:REPLICAS (GET /replica)                         -> the replicas
    dbN: Patroni (REST API dbN:8008) running PostgreSQL dbN:5432, in a namespace of its own
    etcd on the db network's bridge: where Patroni keeps the leader key

Install: `apt-get install etcd-server patroni postgresql` (Debian's packages; Patroni runs
Debian's PostgreSQL binaries as the `postgres` user, since both refuse root).

One etcd member, not three: on one machine three members would die together with it, and
the faults this cluster is for are a database node's (its host killed, its link cut). A
real deployment runs three or five, each on a host of its own, and names them all in
`etcd3.hosts`. The choices of timing and durability are in deploy/patroni.yml.
"""

import contextlib
import json
import os
import pwd
import signal
import urllib.error
import urllib.request
from pathlib import Path
from string import Template

import click
import psycopg2
from sqlalchemy.engine import URL

from deploy import credentials, haproxy, units
from deploy.credentials import Credentials
from deploy.haproxy import host_port
from deploy.inventory import DbNode, Etcd, Inventory
from deploy.layout import Layout, Need, Rendered
from deploy.network import Network, ip
from deploy.runtime import (
    CLUSTER_DIR,
    DEPLOY_DIR,
    NodeState,
    State,
    log_tail,
    program,
    run_unit,
    save_state,
    wait_for,
)
from greenflask import servers

PACKAGES = "etcd-server patroni postgresql"
RUN_AS = "postgres"
ETCD_PORT = 2379
PATRONI_PORT = haproxy.PATRONI_PORT
POSTGRES_PORT = 5432


def check_ready() -> None:
    """Stop with the install line when a part is missing, or with the folder to open when
    RUN_AS cannot reach CLUSTER_DIR (its nodes' data lives there)."""
    for name in ("etcd", "patroni"):
        program(name, PACKAGES)
    bin_dir()
    try:
        pwd.getpwnam(RUN_AS)
    except KeyError:
        raise click.ClickException(f"no user {RUN_AS!r} to run PostgreSQL: apt-get install {PACKAGES}") from None
    closed = [folder for folder in CLUSTER_DIR.parents if folder.exists() and not folder.stat().st_mode & 0o001]
    if closed:
        raise click.ClickException(f"{RUN_AS} cannot reach CLUSTER_DIR {CLUSTER_DIR}: {closed[0]} is closed to "
                                   "others (chmod o+x it, or choose another CLUSTER_DIR)")


def bin_dir() -> Path:
    """Debian's newest PostgreSQL binaries (/usr/lib/postgresql/N/bin) with pg_rewind."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_rewind"), key=lambda path: int(path.parts[-3]))
    if not found:
        raise click.ClickException(f"PostgreSQL's server binaries are not installed: apt-get install {PACKAGES}")
    return found[-1].parent


def postgres_version() -> int:
    """The major version of bin_dir()'s PostgreSQL (/usr/lib/postgresql/N/bin)."""
    return int(bin_dir().parts[-2])


def node_names(count: int) -> list[str]:
    return [f"db{number}" for number in range(1, count + 1)]


def certificate_names(network: Network, count: int) -> dict[str, list[str]]:
    """Each node's certificate names its own address and PgBouncer's, where PgBouncer reaches
    it through HAProxy (verify-full checks the name it connected to)."""
    return {name: [network.db_address(number), network.pgbouncer_address()]
            for number, name in enumerate(node_names(count), 1)}


# --- start ---------------------------------------------------------------------------


def make_secrets(files: Credentials) -> None:
    """New passwords for the superuser, replication and pg_rewind: Patroni's environment file
    (the same for every node), and the superuser's passfile and password file."""
    passwords = {role: credentials.new_password() for role in ("superuser", "replication", "rewind")}
    credentials.write_private(files.patroni_env, units.environment_text(secrets_environment(passwords)))
    credentials.write_private(files.superuser_passfile, credentials.passfile("postgres", passwords["superuser"]))
    credentials.write_private(files.superuser_password, passwords["superuser"])


def start(state: State, inventory: Inventory, files: Credentials, network: Network, root) -> URL:
    """etcd, the Patroni nodes and their HAProxy (on PgBouncer's host), each from its rendered
    unit (`root(name)`: that host's root); returns, once a primary serves, the superuser's URL
    of the `postgres` database through HAProxy's primary port."""
    pool = inventory.pgbouncer
    state["ha"] = {"etcd": None, "nodes": [], "haproxy": None, "router": str(pool.address),
                   "primary_port": pool.primary_port, "replicas_port": pool.replicas_port}
    member = inventory.etcd[0]
    client = f"http://{host_port(member.address, member.client_port)}"
    pid = run_unit(root(member.name) / "etc/systemd/system/etcd.service", "etcd.log")
    state["ha"]["etcd"] = {"pid": pid, "url": client}
    save_state(state)
    wait_for(lambda: servers.status_of(f"{client}/health") == 200 or not servers.is_alive(pid), "etcd")
    if not servers.is_alive(pid):
        raise click.ClickException(f"etcd exited: {log_tail('etcd.log')}")
    for number, node in enumerate(inventory.db_nodes, 1):
        home = root(node.name)
        entry = {"name": node.name, "address": str(node.address), "namespace": network.db_namespace(number),
                 "config": str(home / "etc/patroni/config.yml"),
                 "unit": str(home / "etc/systemd/system/patroni.service"),
                 "data_dir": str(home / f"var/lib/postgresql/{inventory.postgres_version}/greenflask"),
                 "home": str(home / "var/lib/postgresql"), "patroni_pid": None}
        state["ha"]["nodes"].append(entry)
        run_node(state, entry)
    router = root(pool.name) / "etc/systemd/system/haproxy-postgres.service"
    state["ha"]["haproxy"] = {"pid": run_unit(router, "haproxy-postgres.log"),
                              "admin_socket": str(root(pool.name) / "run/haproxy-postgres/admin.sock")}
    save_state(state)
    url = superuser_url(state, files)
    wait_for(lambda: primary(state) is not None and accepts(url), "a Patroni primary behind HAProxy", within=120)
    return url


def superuser_url(state: State, files: Credentials) -> URL:
    """The superuser's URL of the `postgres` database on the primary, through HAProxy's
    primary port: TLS verified against the cluster's CA, the password in its passfile."""
    return URL.create("postgresql", username="postgres", host=state["ha"]["router"], port=state["ha"]["primary_port"],
                      database="postgres",
                      query={"sslmode": "verify-full", "sslrootcert": str(files.ca_cert),
                             "passfile": str(files.superuser_passfile)})


def etcd_environment(name: str, data_dir: str, client: str, peer: str, members: dict[str, str]) -> dict[str, str]:
    """One etcd member's configuration, as etcd reads it from ETCD_* variables: `client` and
    `peer` its URLs, `members` {name: peer URL} of every member (the initial cluster)."""
    return {"ETCD_NAME": name, "ETCD_DATA_DIR": data_dir, "ETCD_LISTEN_CLIENT_URLS": client,
            "ETCD_ADVERTISE_CLIENT_URLS": client, "ETCD_LISTEN_PEER_URLS": peer,
            "ETCD_INITIAL_ADVERTISE_PEER_URLS": peer,
            "ETCD_INITIAL_CLUSTER": ",".join(f"{member}={url}" for member, url in members.items()),
            "ETCD_INITIAL_CLUSTER_STATE": "new", "ETCD_INITIAL_CLUSTER_TOKEN": "greenflask"}


def patroni_config(name: str, address: str, etcd_hosts: list[str], data_dir: str, bin_dir: str, pgpass: str,
                   socket_dir: str, ca_file: str, cert_file: str, key_file: str, clients: list[str]) -> str:
    """deploy/patroni.yml for one node; `clients`: the networks let in (a pg_hba line each)."""
    hba = "".join(f"    - hostssl replication replicator {network} scram-sha-256\n"
                  f"    - hostssl all all {network} scram-sha-256\n" for network in clients)
    return Template((DEPLOY_DIR / "patroni.yml").read_text()).substitute(
        name=name, address=address, etcd=",".join(etcd_hosts), data_dir=data_dir, bin_dir=bin_dir, pgpass=pgpass,
        socket_dir=socket_dir, ca_file=ca_file, cert_file=cert_file, key_file=key_file, hba=hba.rstrip("\n"))


def secrets_environment(passwords: dict) -> dict[str, str]:
    """The node's passwords, as Patroni reads them from its environment."""
    return {f"PATRONI_{role.upper()}_PASSWORD": passwords[role] for role in ("superuser", "replication", "rewind")}


def run_node(state: State, node: NodeState) -> None:
    """Patroni for `node` from its rendered unit, in its namespace, as RUN_AS: the unit's
    ExecStartPre (`patroni --validate-config`) first."""
    env = {"HOME": node["home"], "USER": RUN_AS, "LOGNAME": RUN_AS}
    node["patroni_pid"] = run_unit(Path(node["unit"]), f"{node['name']}.log", node["namespace"], env=env)
    node["validated"] = "patroni --validate-config: ok"
    save_state(state)


def wait_until_replicated(state: State, within: float = 120) -> None:
    """Until every node runs, one is a synchronous standby, and no replica lags: what the
    primary has (the app's role, the schema) is on every node before the hosts start."""

    def replicated() -> bool:
        seen = members(state)
        return (len(seen) == len(state["ha"]["nodes"]) and all(member.get("state") == "running" for member in seen)
                and any(member.get("role") == "sync_standby" for member in seen)
                and all(member.get("lag") in (None, 0) for member in seen if member.get("role") != "leader"))

    wait_for(replicated, "every node running and replicated", within)


def accepts(url: URL) -> bool:
    """Whether a connection to `url` (TLS, the superuser's passfile) is let in now."""
    try:
        psycopg2.connect(url.render_as_string(hide_password=False), connect_timeout=2).close()
        return True
    except psycopg2.OperationalError:
        return False


# --- the render ----------------------------------------------------------------------


def render_node(inventory: Inventory, layout: Layout, node: DbNode) -> Rendered:
    """A database node: Patroni (which runs PostgreSQL), its config and its passwords' file."""
    host = Rendered(node.name)
    pool = inventory.pgbouncer
    tls = {name: layout.path(f"etc/patroni/tls/{name}") for name in ("ca.crt", f"{node.name}.crt", f"{node.name}.key")}
    clients = [f"{other.address}/{other.address.max_prefixlen}" for other in (*inventory.db_nodes, pool)]
    clients += [str(network) for network in inventory.database_clients]
    config = "etc/patroni/config.yml"
    host.add(config, patroni_config(
        node.name, str(node.address), [host_port(member.address, member.client_port) for member in inventory.etcd],
        layout.path(f"var/lib/postgresql/{inventory.postgres_version}/greenflask"),
        f"/usr/lib/postgresql/{inventory.postgres_version}/bin", layout.path("var/lib/postgresql/patroni.pgpass"),
        layout.path("run/postgresql"), tls["ca.crt"], tls[f"{node.name}.crt"], tls[f"{node.name}.key"], clients))
    secrets = layout.path("etc/patroni/secrets.env")
    host.add_unit("patroni.service", units.unit("Patroni: PostgreSQL of greenflask, with failover", [
        ("Type", "simple"), ("User", RUN_AS), ("Group", RUN_AS),
        ("EnvironmentFile", secrets),
        # Patroni's own check of its config (it wants etcd up and this node's ports free).
        ("ExecStartPre", f"/usr/bin/patroni --validate-config {layout.path(config)}"),
        ("ExecStart", f"/usr/bin/patroni {layout.path(config)}"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        # Patroni stops PostgreSQL itself; killing only Patroni lets it do so cleanly.
        ("KillMode", "process"), ("TimeoutStopSec", "60"), ("Restart", "on-failure"),
        ("RuntimeDirectory", "postgresql"), ("RuntimeDirectoryPreserve", "yes"), *units.BASELINE],
        after=("network-online.target", "etcd.service")))
    host.needs += [
        Need(secrets, "PATRONI_SUPERUSER_PASSWORD, PATRONI_REPLICATION_PASSWORD and PATRONI_REWIND_PASSWORD "
                      "(the same on every node)", owner=RUN_AS, kind="patroni_secrets"),
        Need(tls["ca.crt"], "the deployment's CA certificate (ca.crt)", 0o644, RUN_AS, "ca"),
        Need(tls[f"{node.name}.crt"], f"its certificate, naming {node.address} and {pool.address}", 0o644, RUN_AS,
             f"cert:{node.name}"),
        Need(tls[f"{node.name}.key"], "its certificate's key", owner=RUN_AS, kind=f"key:{node.name}"),
        Need(layout.path("var/lib/postgresql"), "PostgreSQL's home (Debian's package makes it)", 0o755, RUN_AS,
             "folder"),
        Need(layout.path(f"var/lib/postgresql/{inventory.postgres_version}"), "where the data folder goes", 0o700,
             RUN_AS, "folder"),
        Need(layout.path("run/postgresql"), "the unix socket's folder (RuntimeDirectory=)", 0o755, RUN_AS, "folder"),
    ]
    return host


def render_etcd(inventory: Inventory, layout: Layout, member: Etcd) -> Rendered:
    """One etcd member, its configuration in an environment file."""
    host = Rendered(member.name)
    members = {other.name: f"http://{host_port(other.address, other.peer_port)}" for other in inventory.etcd}
    env_file = "etc/etcd/greenflask.env"
    host.add(env_file, units.environment_text(etcd_environment(
        member.name, layout.path("var/lib/etcd/greenflask"), f"http://{host_port(member.address, member.client_port)}",
        members[member.name], members)))
    host.add_unit("etcd.service", units.unit("etcd: where Patroni keeps greenflask's leader key", [
        ("Type", "notify"), ("User", "etcd"), ("EnvironmentFile", layout.path(env_file)),
        ("ExecStart", "/usr/bin/etcd"), ("Restart", "on-failure"), ("LimitNOFILE", "65536"), *units.BASELINE]))
    host.needs.append(Need(layout.path("var/lib/etcd"), "etcd's home (Debian's package makes it)", 0o700, "etcd",
                           "folder"))
    return host


# --- what runs -----------------------------------------------------------------------


def patroni_api(node: NodeState, path: str, body: dict | None = None, timeout: float = 2.0) -> dict | None:
    """A GET (or, with `body`, a POST) to the node's Patroni REST API: its JSON, or None
    when the node does not answer."""
    request = urllib.request.Request(f"http://{node['address']}:{PATRONI_PORT}{path}",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            text = answer.read().decode()
    except urllib.error.HTTPError as error:
        text = error.read().decode()
    except OSError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"message": text}


def members(state: State) -> list[dict]:
    """Patroni's view of the cluster (GET /cluster of the first node that answers)."""
    for node in state["ha"]["nodes"]:
        if servers.is_alive(node["patroni_pid"]) and (answer := patroni_api(node, "/cluster")):
            return answer.get("members", [])
    return []


def primary(state: State) -> str | None:
    return next((member["name"] for member in members(state) if member.get("role") == "leader"
                 and member.get("state") == "running"), None)


def postgres_pid(node: NodeState) -> int | None:
    """The node's postmaster, from postmaster.pid, while it runs."""
    try:
        pid = int((Path(node["data_dir"]) / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if servers.is_alive(pid) else None


def report(state: State) -> dict:
    """`status --json`'s part: `primary` and `db_nodes` (name, role, postgres pid, lag)."""
    seen = {member["name"]: member for member in members(state)}
    nodes = []
    for node in state["ha"]["nodes"]:
        member = seen.get(node["name"], {})
        nodes.append({"name": node["name"], "address": node["address"], "role": member.get("role", "down"),
                      "state": member.get("state", "stopped"), "postgres_pid": postgres_pid(node),
                      "patroni_pid": node["patroni_pid"] if servers.is_alive(node["patroni_pid"]) else None,
                      "lag": member.get("lag"), "validated": node.get("validated")})
    leader = next((node["name"] for node in nodes if node["role"] == "leader" and node["state"] == "running"), None)
    return {"primary": leader, "db_nodes": nodes,
            "etcd": {**state["ha"]["etcd"], "running": servers.is_alive(state["ha"]["etcd"]["pid"])}}


def node_named(state: State, name: str) -> dict:
    nodes = {node["name"]: node for node in state["ha"]["nodes"]}
    if name not in nodes:
        raise click.ClickException(f"no database node {name!r}: {', '.join(nodes)}")
    return nodes[name]


# --- faults and operations -------------------------------------------------------------


def kill(state: State, name: str) -> list[int]:
    """SIGKILL every process in the node's namespace (Patroni, PostgreSQL and its children):
    what a host that loses power leaves. Returns the PIDs killed."""
    node = node_named(state, name)
    pids = [int(pid) for pid in ip("netns", "pids", node["namespace"]).split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(servers.is_alive(pid) for pid in pids), f"{name}'s processes to die", within=10)
    return pids


def revive(state: State, name: str) -> None:
    """Start the node's Patroni again, as its host coming back: a node that was the primary
    finds another leader in etcd and rejoins as its replica, `pg_rewind` first if its
    timeline went its own way."""
    node = node_named(state, name)
    if servers.is_alive(node["patroni_pid"]):
        raise click.ClickException(f"{name}'s Patroni is running (pid {node['patroni_pid']})")
    run_node(state, node)


def switchover(state: State, candidate: str | None) -> tuple[str, str]:
    """Patroni's planned switchover to `candidate` (else its synchronous standby): the old
    primary stops cleanly and follows the new one. Returns (old, new)."""
    current = primary(state)
    if current is None:
        raise click.ClickException("no primary to switch over from")
    if candidate is None:
        candidate = next((member["name"] for member in members(state) if member.get("role") == "sync_standby"), None)
    if candidate is None or candidate == current:
        raise click.ClickException(f"no other node to switch over to (primary {current})")
    answer = patroni_api(node_named(state, current), "/switchover", {"leader": current, "candidate": candidate},
                         timeout=60)
    wait_for(lambda: primary(state) == candidate, f"{candidate} to become the primary ({answer})", within=60)
    return current, candidate


def stop_all(state: State) -> None:
    """HAProxy, each Patroni (which stops its PostgreSQL), then etcd; by PID."""
    ha = state.get("ha") or {}
    servers.stop((ha.get("haproxy") or {}).get("pid"), grace=5)
    nodes = ha.get("nodes", [])
    for node in nodes:  # SIGTERM to all first: each stops its PostgreSQL at once
        if servers.is_alive(node["patroni_pid"]):
            os.kill(node["patroni_pid"], signal.SIGTERM)
    for node in nodes:
        servers.stop(node["patroni_pid"], grace=30)
        if pid := postgres_pid(node):  # a PostgreSQL whose Patroni was killed
            servers.stop(pid, grace=10)
    servers.stop((ha.get("etcd") or {}).get("pid"), grace=5)
