"""Starting and stopping gunicorn for the load tester, the tests and the benchmarks.

Every server started here is stopped by its PID (`stop`), never by name.

    python servers.py wait http://127.0.0.1:8000    # until /healthz answers 200 (scripts/demo.sh)
"""

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

PROJECT_DIR = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_gunicorn(
    port: int,
    worker_args: list[str],
    env_overrides: dict,
    log_path: Path,
    wsgi_app: str = "app:app",
    config: str | None = None,
    cwd: Path = PROJECT_DIR,
) -> subprocess.Popen:
    """gunicorn `wsgi_app` on 127.0.0.1:`port`, started in `cwd` (the project folder: it reads
    gunicorn.conf.py there unless `config` names another); the caller stops it with `stop`."""
    env = {**os.environ, **env_overrides}
    command = [sys.executable, "-m", "gunicorn", wsgi_app, "-b", f"127.0.0.1:{port}", *worker_args]
    if config:
        command += ["-c", config]
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT)


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


def wait_until_ready(
    base_url: str, process: subprocess.Popen | None = None, within: float = 30.0, path: str = "/healthz"
) -> None:
    """Return once GET `path` answers 200; raise RuntimeError if the process exits or time runs out."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode}")
        if status_of(base_url + path) == 200:
            return
        time.sleep(0.1)
    raise RuntimeError(f"server at {base_url} not ready after {within:.0f} s")


def stop(process: subprocess.Popen, grace: float = 35.0) -> int:
    """SIGTERM by PID, then SIGKILL if it has not exited after `grace` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "wait":
        sys.exit("usage: python servers.py wait BASE_URL")
    try:
        wait_until_ready(sys.argv[2].rstrip("/"))
    except RuntimeError as error:
        sys.exit(str(error))
