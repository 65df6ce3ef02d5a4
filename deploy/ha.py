"""PostgreSQL that can lose its primary and no acknowledged write (`up --ha`): etcd, Patroni
and HAProxy, the field's standard recipe.

    PgBouncer -> HAProxy 127.0.0.1:PRIMARY  (asks each node's Patroni GET /primary) -> the primary
              -> HAProxy 127.0.0.1:REPLICAS (GET /replica)                         -> the replicas
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
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from string import Template

import click
import psycopg2
from sqlalchemy.engine import URL

from deploy import credentials
from deploy.credentials import Credentials
from deploy.network import Network, ip
from deploy.runtime import CLUSTER_DIR, DEPLOY_DIR, log_tail, program, save_state, spawn, wait_for
from greenflask import servers

PACKAGES = "etcd-server patroni postgresql"
RUN_AS = "postgres"
ETCD_PORT = 2379
PATRONI_PORT = 8008
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


def folder() -> Path:
    return CLUSTER_DIR / "ha"


def node_names(count: int) -> list[str]:
    return [f"db{number}" for number in range(1, count + 1)]


def certificate_names(network: Network, count: int) -> dict[str, list[str]]:
    """Each node's certificate names its own address and 127.0.0.1, where PgBouncer reaches
    it through HAProxy (verify-full checks the name it connected to)."""
    return {name: [network.db_address(number), "127.0.0.1"] for number, name in enumerate(node_names(count), 1)}


# --- start ---------------------------------------------------------------------------


def start(state: dict, network: Network, count: int, files: Credentials) -> URL:
    """etcd, `count` Patroni nodes and their HAProxy; returns, once a primary serves, the
    superuser's URL of the `postgres` database through HAProxy's primary port."""
    home = folder()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.chown(home, RUN_AS)
    passwords = {role: credentials.new_password() for role in ("superuser", "replication", "rewind")}
    credentials.write_private(files.superuser_passfile, credentials.passfile("postgres", passwords["superuser"]))
    credentials.write_private(files.superuser_password, passwords["superuser"])
    state["ha"] = {"etcd": None, "nodes": [], "haproxy": None, "primary_port": servers.free_port(),
                   "replicas_port": servers.free_port()}
    start_etcd(state, network)
    for number, name in enumerate(node_names(count), 1):
        node = {"name": name, "address": network.db_address(number), "namespace": network.db_namespace(number),
                "config": str(home / f"{name}.yml"), "data_dir": str(home / name), "patroni_pid": None}
        write_node_config(node, state["ha"]["etcd"]["url"], network, files, passwords)
        state["ha"]["nodes"].append(node)
        run_node(state, node)
    start_haproxy(state)
    url = superuser_url(state, files)
    wait_for(lambda: primary(state) is not None and accepts(url), "a Patroni primary behind HAProxy", within=120)
    return url


def superuser_url(state: dict, files: Credentials) -> URL:
    """The superuser's URL of the `postgres` database on the primary, through HAProxy's
    primary port: TLS verified against the cluster's CA, the password in its passfile."""
    return URL.create("postgresql", username="postgres", host="127.0.0.1", port=state["ha"]["primary_port"],
                      database="postgres",
                      query={"sslmode": "verify-full", "sslrootcert": str(files.ca_cert),
                             "passfile": str(files.superuser_passfile)})


def start_etcd(state: dict, network: Network) -> None:
    """One etcd member on the db network's bridge address (see the module's docstring)."""
    executable = program("etcd", PACKAGES)
    address = network.bridge_address("db")
    data = folder() / "etcd"
    peer = f"http://127.0.0.1:{servers.free_port()}"
    client = f"http://{address}:{ETCD_PORT}"
    command = [executable, "--name", "etcd1", "--data-dir", str(data), "--listen-client-urls", client,
               "--advertise-client-urls", client, "--listen-peer-urls", peer,
               "--initial-advertise-peer-urls", peer, "--initial-cluster", f"etcd1={peer}",
               "--initial-cluster-state", "new"]
    state["ha"]["etcd"] = {"pid": spawn(command, "etcd.log"), "url": client}
    save_state(state)
    wait_for(lambda: servers.status_of(f"{client}/health") == 200 or not servers.is_alive(state["ha"]["etcd"]["pid"]),
             "etcd")
    if not servers.is_alive(state["ha"]["etcd"]["pid"]):
        raise click.ClickException(f"etcd exited: {log_tail('etcd.log')}")


def write_node_config(node: dict, etcd_url: str, network: Network, files: Credentials, passwords: dict) -> None:
    """deploy/patroni.yml for `node`, mode 600, owned by the user Patroni runs as."""
    name = node["name"]
    run_dir = folder() / f"{name}-run"
    run_dir.mkdir(mode=0o700, exist_ok=True)
    shutil.chown(run_dir, RUN_AS)
    text = Template((DEPLOY_DIR / "patroni.yml").read_text()).substitute(
        name=name, address=node["address"], etcd=etcd_url.removeprefix("http://"), data_dir=node["data_dir"],
        bin_dir=bin_dir(), pgpass=folder() / f"{name}.pgpass", socket_dir=run_dir, ca_file=files.ca_cert,
        cert_file=files.cert(name), key_file=files.key(name), db_network=f"{network.bridge_address('db')}/24",
        superuser_password=passwords["superuser"], replication_password=passwords["replication"],
        rewind_password=passwords["rewind"])
    credentials.write_private(Path(node["config"]), text, RUN_AS)


def run_node(state: dict, node: dict) -> None:
    """Patroni for `node` in its namespace, as RUN_AS (setpriv execs: the PID is Patroni's)."""
    command = ["ip", "netns", "exec", node["namespace"], "setpriv", f"--reuid={RUN_AS}", f"--regid={RUN_AS}",
               "--init-groups", "--reset-env", program("patroni", PACKAGES), node["config"]]
    node["patroni_pid"] = spawn(command, f"{node['name']}.log")
    save_state(state)


def start_haproxy(state: dict) -> None:
    """HAProxy's two TCP ports in front of the nodes (deploy/haproxy-postgres.cfg)."""
    executable = program("haproxy")
    ha = state["ha"]
    admin_socket = CLUSTER_DIR / "haproxy-postgres.sock"
    lines = "".join(f"    server {node['name']} {node['address']}:{POSTGRES_PORT} check port {PATRONI_PORT}\n"
                    for node in ha["nodes"])
    config = CLUSTER_DIR / "haproxy-postgres.cfg"
    config.write_text(Template((DEPLOY_DIR / "haproxy-postgres.cfg").read_text()).substitute(
        admin_socket=admin_socket, primary_bind=f"127.0.0.1:{ha['primary_port']}",
        replicas_bind=f"127.0.0.1:{ha['replicas_port']}", servers=lines))
    checked = subprocess.run([executable, "-c", "-q", "-f", str(config)], capture_output=True, text=True)
    if checked.returncode != 0:
        raise click.ClickException(f"haproxy-postgres.cfg: {checked.stderr.strip()}")
    ha["haproxy"] = {"pid": spawn([executable, "-db", "-f", str(config)], "haproxy-postgres.log"),
                     "admin_socket": str(admin_socket)}
    save_state(state)


def wait_until_replicated(state: dict, within: float = 120) -> None:
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


# --- what runs -----------------------------------------------------------------------


def patroni_api(node: dict, path: str, body: dict | None = None, timeout: float = 2.0) -> dict | None:
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


def members(state: dict) -> list[dict]:
    """Patroni's view of the cluster (GET /cluster of the first node that answers)."""
    for node in state["ha"]["nodes"]:
        if servers.is_alive(node["patroni_pid"]) and (answer := patroni_api(node, "/cluster")):
            return answer.get("members", [])
    return []


def primary(state: dict) -> str | None:
    return next((member["name"] for member in members(state) if member.get("role") == "leader"
                 and member.get("state") == "running"), None)


def postgres_pid(node: dict) -> int | None:
    """The node's postmaster, from postmaster.pid, while it runs."""
    try:
        pid = int((Path(node["data_dir"]) / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if servers.is_alive(pid) else None


def report(state: dict) -> dict:
    """`status --json`'s part: `primary` and `db_nodes` (name, role, postgres pid, lag)."""
    seen = {member["name"]: member for member in members(state)}
    nodes = []
    for node in state["ha"]["nodes"]:
        member = seen.get(node["name"], {})
        nodes.append({"name": node["name"], "address": node["address"], "role": member.get("role", "down"),
                      "state": member.get("state", "stopped"), "postgres_pid": postgres_pid(node),
                      "patroni_pid": node["patroni_pid"] if servers.is_alive(node["patroni_pid"]) else None,
                      "lag": member.get("lag")})
    leader = next((node["name"] for node in nodes if node["role"] == "leader" and node["state"] == "running"), None)
    return {"primary": leader, "db_nodes": nodes,
            "etcd": {**state["ha"]["etcd"], "running": servers.is_alive(state["ha"]["etcd"]["pid"])}}


def node_named(state: dict, name: str) -> dict:
    nodes = {node["name"]: node for node in state["ha"]["nodes"]}
    if name not in nodes:
        raise click.ClickException(f"no database node {name!r}: {', '.join(nodes)}")
    return nodes[name]


# --- faults and operations -------------------------------------------------------------


def kill(state: dict, name: str) -> list[int]:
    """SIGKILL every process in the node's namespace (Patroni, PostgreSQL and its children):
    what a host that loses power leaves. Returns the PIDs killed."""
    node = node_named(state, name)
    pids = [int(pid) for pid in ip("netns", "pids", node["namespace"]).split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(servers.is_alive(pid) for pid in pids), f"{name}'s processes to die", within=10)
    return pids


def revive(state: dict, name: str) -> None:
    """Start the node's Patroni again, as its host coming back: a node that was the primary
    finds another leader in etcd and rejoins as its replica, `pg_rewind` first if its
    timeline went its own way."""
    node = node_named(state, name)
    if servers.is_alive(node["patroni_pid"]):
        raise click.ClickException(f"{name}'s Patroni is running (pid {node['patroni_pid']})")
    run_node(state, node)


def switchover(state: dict, candidate: str | None) -> tuple[str, str]:
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


def stop_all(state: dict) -> None:
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
    shutil.rmtree(folder(), ignore_errors=True)
