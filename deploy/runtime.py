"""What every part of the cluster shares: where it keeps its files, how it starts a program
and waits for it, and the state file that `down` reads to stop everything by PID."""

import json
import os
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import TypedDict

import click

from deploy import units
from greenflask import PROJECT_DIR, servers
from greenflask.settings import Tools

DEPLOY_DIR = Path(__file__).resolve().parent
_TOOLS = Tools.from_env()
CLUSTER_DIR = _TOOLS.cluster_dir
CLUSTER_NET = _TOOLS.cluster_net
INSTALL_HINT = "apt-get install pgbouncer haproxy  (Debian's packages)"


def program(name: str, package: str | None = None) -> str:
    """The path of `name` (Debian puts PgBouncer and HAProxy in /usr/sbin, which a user's PATH may lack)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if not found:
        hint = f"apt-get install {package}  (Debian's package)" if package else INSTALL_HINT
        raise click.ClickException(f"{name} is not installed: {hint}")
    return found


# --- processes -----------------------------------------------------------------------


def spawn(command: list[str], log_name: str, env: dict | None = None, cwd: Path = PROJECT_DIR) -> int:
    """Start `command` detached in `cwd`, its output in CLUSTER_DIR; return its PID. It
    outlives this script: `down` stops it by that PID."""
    return servers.spawn(command, CLUSTER_DIR / log_name, env, cwd=cwd, detach=True).pid


def run_unit(unit: Path, log_name: str, namespace: str | None = None, cwd: Path | None = None,
             env: dict | None = None, args: list[str] | None = None) -> int:
    """Start what a rendered systemd unit runs, as systemd would, since there is none here: its
    ExecStartPre lines first (each must succeed), then its ExecStart with its environment
    (and `env`), as its User where that user exists on this machine (setpriv), in `namespace`
    (ip netns exec; both exec, so the PID is the program's); `args` go right after the
    program; `cwd` instead of its WorkingDirectory. Returns that PID."""
    command = units.command(unit)
    cwd = cwd or command.working_directory or PROJECT_DIR
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    user_env = {}
    if command.user and os.geteuid() == 0 and user_exists(command.user):
        prefix += ["setpriv", f"--reuid={command.user}", f"--regid={command.user}", "--init-groups"]
        # What systemd's User= sets too: libpq, say, looks in HOME for its files.
        user_env = {"HOME": pwd.getpwnam(command.user).pw_dir, "USER": command.user, "LOGNAME": command.user}
    environment = {**os.environ, **user_env, **command.env, **(env or {})}
    for before in command.before:
        done = subprocess.run([*prefix, *before], capture_output=True, text=True, cwd=cwd, env=environment)
        if done.returncode != 0:
            raise click.ClickException(f"{unit.name}: {' '.join(before)}: {(done.stdout + done.stderr).strip()}")
    argv = [command.argv[0], *(args or []), *command.argv[1:]]
    return spawn([*prefix, *argv], log_name, {**user_env, **command.env, **(env or {})}, cwd=cwd)


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def wait_for(check, what: str, within: float = 30.0) -> None:
    try:
        servers.wait_until(check, what, within)
    except RuntimeError as error:
        raise click.ClickException(f"{error} (logs in {CLUSTER_DIR})") from None


def log_tail(name: str, characters: int = 500) -> str:
    path = CLUSTER_DIR / name
    return path.read_text(errors="replace")[-characters:] if path.exists() else "(no log)"


# --- state ---------------------------------------------------------------------------


def state_path() -> Path:
    return CLUSTER_DIR / "state.json"


class HostState(TypedDict):
    """One app host: its address, its gunicorn, the release it runs, its rendered unit."""

    name: str
    address: str
    port: int
    gunicorn_pid: int | None
    release: str
    namespace: str | None
    metrics_dir: str
    unit: str


class PgBouncerState(TypedDict):
    pid: int | None
    address: str  # ADDRESS:PORT
    pool_size: int
    unit: str
    admin_user: str
    admin_passfile: str
    ca: str


class HAProxyState(TypedDict):
    pid: int
    url: str  # the public side
    admin_socket: str
    exporter: str  # ADDRESS:PORT of its Prometheus frontend


class ServerState(TypedDict, total=False):
    """A process of its own: PostgreSQL, its replica, Prometheus, an exporter."""

    pid: int | None
    address: str
    url: str
    pgdata: str
    embedded: bool
    started: bool  # by `up` (else it ran before, and `down` leaves it running)


class NodeState(TypedDict, total=False):
    """With --ha, one database node (deploy/ha.py)."""

    name: str
    address: str
    namespace: str
    config: str
    unit: str
    home: str  # its HOME (PostgreSQL's: var/lib/postgresql under its root)
    data_dir: str
    patroni_pid: int | None
    validated: str


class HaState(TypedDict):
    etcd: ServerState | None
    nodes: list[NodeState]
    haproxy: ServerState | None  # the database's router: pid and admin_socket
    router: str  # the address it listens on (PgBouncer's host)
    primary_port: int
    replicas_port: int


class State(TypedDict, total=False):
    """CLUSTER_DIR/state.json: what `up` started, which `down` stops by PID."""

    net: str
    namespaces: bool
    hosts: list[HostState]
    planned_hosts: int
    planned_db_nodes: int
    ha: HaState | None
    passfile: str | None
    postgres: ServerState | None
    replica: ServerState | None
    pgbouncer: PgBouncerState | None
    haproxy: HAProxyState | None
    prometheus: ServerState | None
    postgres_exporter: ServerState | None
    pgbouncer_exporter: ServerState | None
    release: str
    rendered: str


def load_state() -> State | None:
    return json.loads(state_path().read_text()) if state_path().exists() else None


def save_state(state: State) -> None:
    state_path().write_text(json.dumps(state, indent=2))
