"""What every part of the cluster shares: where it keeps its files, how it starts a program
and waits for it, and the state file that `down` reads to stop everything by PID."""

import json
import shutil
from pathlib import Path

import click

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


def load_state() -> dict | None:
    return json.loads(state_path().read_text()) if state_path().exists() else None


def save_state(state: dict) -> None:
    state_path().write_text(json.dumps(state, indent=2))
