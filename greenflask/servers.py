"""Starting, waiting for and stopping processes by PID: the one way the load tester, the
tests, the benchmarks and the cluster do it. Nothing is ever stopped by name.

    python -m greenflask.servers wait http://127.0.0.1:8000    # until /healthz answers 200
"""

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import click

from greenflask import PROJECT_DIR


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spawn(command: list[str], log_path: Path, env: dict | None = None, cwd: Path = PROJECT_DIR,
          detach: bool = False) -> subprocess.Popen:
    """Start `command` in `cwd` with `env` added to this environment, its output appended to
    `log_path`. `detach`: in a session of its own, so that it outlives the caller (the
    cluster's processes, which `down` stops by their PIDs)."""
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(command, cwd=cwd, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=detach)


def gunicorn_command(bind: str, worker_args: list[str], wsgi_app: str = "app:app",
                     config: str | None = None) -> list[str]:
    """`gunicorn WSGI_APP -b BIND ...` (the script beside this Python), as a user types it;
    gunicorn reads gunicorn.conf.py from its working folder unless `config` names another.
    Not `python -m gunicorn`: a binary upgrade (USR2) re-executes the master as
    `python .../gunicorn/__main__.py`, where `import http` finds gunicorn's own and fails."""
    script = Path(sys.executable).with_name("gunicorn")
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "gunicorn"]
    command = [*launcher, wsgi_app, "-b", bind, *worker_args]
    return command + ["-c", config] if config else command


def start_gunicorn(port: int, worker_args: list[str], env: dict, log_path: Path, wsgi_app: str = "app:app",
                   config: str | None = None, cwd: Path = PROJECT_DIR) -> subprocess.Popen:
    """gunicorn `wsgi_app` on 127.0.0.1:`port`; the caller stops it with `stop(process.pid)`."""
    return spawn(gunicorn_command(f"127.0.0.1:{port}", worker_args, wsgi_app, config), log_path, env, cwd)


def status_of(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of a GET, or None when nothing answers."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request("GET", parts.path or "/")
        response = connection.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        connection.close()


def port_open(address: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((address, port)) == 0


def wait_until(check, what: str, within: float = 30.0) -> None:
    """Return once `check()` is true; raise RuntimeError naming `what` when time runs out."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready after {within:.0f} s")


def wait_until_ready(base_url: str, process: subprocess.Popen | None = None, within: float = 30.0,
                     path: str = "/healthz") -> None:
    """Return once GET `path` answers 200; raise RuntimeError if the process exits or time runs out."""

    def ready() -> bool:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode}")
        return status_of(base_url + path) == 200

    wait_until(ready, f"server at {base_url}", within)


def is_alive(pid: int | None) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    if not pid:
        return False
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child that exited
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def stop(pid: int | None, grace: float = 35.0) -> None:
    """SIGTERM by PID, then SIGKILL if it has not exited after `grace` seconds (gunicorn's
    graceful_timeout is 30 s: its requests get to finish)."""
    if not is_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_alive(pid):
        os.kill(pid, signal.SIGKILL)
        while is_alive(pid):
            time.sleep(0.05)


@click.group()
def cli() -> None:
    """Process helpers for scripts."""


@cli.command()
@click.argument("base_url")
@click.option("--within", default=30.0, show_default=True, type=click.FloatRange(min=0), help="Seconds.")
def wait(base_url: str, within: float) -> None:
    """Wait until BASE_URL/healthz answers 200 (exit 1 after --within seconds)."""
    try:
        wait_until_ready(base_url.rstrip("/"), within=within)
    except RuntimeError as error:
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    cli()
