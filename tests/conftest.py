"""Real parts only: a real PostgreSQL (embedded, or DATABASE_URL when set) and real gunicorn
processes on free ports, each stopped by its PID when its test or module ends."""

import asyncio
import contextlib
import dataclasses
import functools
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from sqlalchemy import make_url, text

import db
import seed
from app import create_app
from greenflask import PROJECT_DIR, embedded, servers
from greenflask.settings import Settings
from loadtester import burst as loadtest_burst
from loadtester.measure import client_session

ROOT = PROJECT_DIR

TEST_DATABASE = "greenflask_test"  # one per pytest-xdist worker: greenflask_test_gw0, ...
# The machine's own PostgreSQL allows 100 connections: keep each test server's pool small.
TEST_POOL_SIZE = "25"


def pytest_report_header(config):
    return f"database: {'DATABASE_URL' if Settings.from_env().database_url else 'embedded PostgreSQL'}"


# --- lanes ---------------------------------------------------------------------------------
# `make test` runs the suite as lanes side by side (pytest-xdist, -n 4 with the scheduler
# below): each lane's modules one after another in one worker. Most of the suite's time is
# waits (HAProxy's checks, Patroni's ttl, gunicorn's reloads, sleeps that prove concurrency),
# and the lanes wait on different things. The long lanes go first, longest first; every other
# module is a lane of its own that the first free worker takes. The modules whose figures are
# timings (knees, waves, a 2 s Ctrl-C) are one lane where the clusters run beside them, so no
# two of them run at once on a machine that is busy with the clusters; where the clusters'
# programs are absent (their lanes skip at once) they are two lanes, spread over the workers
# the clusters leave free. A plain `pytest` runs everything in one process, as before.
LANES = {
    "ha": ("test_ha.py", "test_security.py", "test_contract.py"),
    "cluster": ("test_cluster.py",),
    "search": ("test_capacity.py", "test_interrupt.py", "test_scale.py", "test_faults.py"),
    "load": ("test_loadtest.py", "test_reliability.py", "test_service.py"),
}
RANK = {name: rank for rank, name in enumerate(LANES)}


@functools.cache
def lane_of() -> dict[str, str]:
    clusters_run = os.geteuid() == 0 and not_installed("pgbouncer", "haproxy") is None
    together = {"load": "search"} if clusters_run else {}
    return {module: together.get(lane, lane) for lane, modules in LANES.items() for module in modules}


def lane(nodeid: str) -> str:
    """A test's lane: its module's, or its module itself when that is in no lane."""
    module = nodeid.split("::")[0].rsplit("/", 1)[-1]
    return lane_of().get(module, module)


def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduling with a lane as the scope: a lane goes whole to one worker, in
    the order collected (below). (Its own --dist loadgroup does not group under pytest 9.2,
    which keeps node ids elsewhere.)"""
    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return lane(nodeid)

    config.option.loadscopereorder = False
    return Lanes(config, log)


def pytest_collection_modifyitems(items):
    """The lanes first, in LANES' order (a stable sort: each module's tests keep theirs); the
    tests that use the database are marked for .ci/run's DATABASE_URL pass."""
    items.sort(key=lambda item: RANK.get(lane(item.nodeid), len(RANK)))
    for item in items:
        if "database_url" in item.fixturenames:
            item.add_marker(pytest.mark.database)


def pytest_configure(config):
    config.addinivalue_line("markers", "database: uses the test database (DATABASE_URL's, or the embedded one)")
    if not hasattr(config, "workerinput"):  # the one process that outlives every worker
        config.embedded_was_running = embedded.is_running()


def pytest_unconfigure(config):
    """An embedded server the tests had to start is stopped at the very end (by the run's
    first process, after every worker is done with it)."""
    if not hasattr(config, "workerinput") and not config.embedded_was_running and embedded.is_running():
        embedded.stop()


@pytest.fixture(scope="session")
def database_url(request):
    """DATABASE_URL when set; else a test database on the embedded server (not the demo's).
    When the lanes run side by side each worker has a database of its own on that server:
    DATABASE_URL's name (or greenflask_test) and the worker's, created if missing (so
    DATABASE_URL's role needs CREATEDB there)."""
    worker = getattr(request.config, "workerinput", {}).get("workerid")
    if url := Settings.from_env().database_url:
        return embedded.ensure_database(url, f"{make_url(url).database}_{worker}") if worker else url
    return embedded.ensure_database(embedded.start(), TEST_DATABASE + (f"_{worker}" if worker else ""))


@pytest.fixture(scope="session")
def engine(database_url):
    engine = embedded.script_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def seeded(engine):
    """The table as `python seed.py --reset` leaves it: the 50 seed todos."""
    seed.seed(engine, count=50, reset=True)
    return engine


def row_count(engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(text("SELECT count(*) FROM todos"))


def busy_connections(engine, application_name: str) -> int:
    """Server-side sessions of one test server that are running or holding a transaction."""
    with engine.connect() as conn:
        return conn.scalar(
            text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name AND state <> 'idle'"),
            {"name": application_name},
        )


def open_connections(engine, application_name: str) -> int:
    with engine.connect() as conn:
        return conn.scalar(
            text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"), {"name": application_name}
        )


# --- HTTP --------------------------------------------------------------------------------


class Answer:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Answer {self.status} {self.body[:200]!r}>"


def request(url: str, method: str = "GET", body=None, headers=None, timeout: float = 30) -> Answer:
    """One plain HTTP request; a dict body is sent as JSON, an iterable one chunked when the
    headers say Transfer-Encoding: chunked."""
    parts = urlsplit(url)
    headers = dict(headers or {})
    if isinstance(body, dict | list):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    elif isinstance(body, str):
        body = body.encode()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        chunked = headers.get("Transfer-Encoding") == "chunked"
        connection.request(method, path, body=body, headers=headers, encode_chunked=chunked)
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def send_many(method: str, url: str, bodies: list, timeout: float = 60, headers: dict | None = None) -> list[Answer]:
    """One concurrent request per body (None: no body), each answer with its headers."""

    async def one(session, body):
        try:
            async with session.request(method, url, json=body, headers=headers) as response:
                answered = {key.lower(): value for key, value in response.headers.items()}
                return Answer(response.status, answered, await response.read())
        except (aiohttp.ClientError, TimeoutError) as error:
            return Answer(0, {}, repr(error).encode())

    async def run():
        async with client_session(timeout) as session:
            return await asyncio.gather(*(one(session, body) for body in bodies))

    return asyncio.run(run())


def burst(url: str, count: int, timeout: float = 60):
    """`count` concurrent GETs with the load tester's own code; (outcomes, wall seconds)."""

    async def run():
        async with client_session(timeout) as session:
            return await loadtest_burst.fire(session, url, count)

    return asyncio.run(run())


def assert_error(answer, status: int, code: str | None = None):
    assert answer.status == status, answer
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert error["status"] == status
    if code:
        assert error["code"] == code
    for leak in (b"Traceback", b"SELECT", b"psycopg2", b"sqlalchemy"):
        assert leak not in answer.body


class InProcess:
    """The app in this process through Flask's test client, against the real test database:
    the fast layer for validation and error shapes. `get` answers like `Server.get`."""

    def __init__(self, app):
        self.client = app.test_client()

    def get(self, path: str, method: str = "GET", body=None, headers=None) -> Answer:
        headers = dict(headers or {})
        if isinstance(body, dict | list):
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        response = self.client.open(path, method=method, data=body, headers=headers)
        return Answer(response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.get_data())


@pytest.fixture(scope="session")
def client(database_url):
    app = create_app(dataclasses.replace(Settings.from_env(), database_url=database_url, pool_size=2))
    yield InProcess(app)
    db.engines(app).dispose()


# --- the load tester, as a user runs it -----------------------------------------------------


def run_loadtest(*args: str, env: dict | None = None, shell_limit: str | None = None,
                 timeout: float = 180) -> subprocess.CompletedProcess:
    """`python loadtest.py ARGS` in the project folder, under `ulimit SHELL_LIMIT` when given."""
    command = [sys.executable, "loadtest.py", *args]
    if shell_limit:
        command = ["bash", "-c", f'ulimit {shell_limit} && exec "$@"', "loadtest", *command]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def loadtest_report(url: str, *args: str, timeout: float = 180) -> dict:
    """`python loadtest.py ARGS --url URL --quiet --json FILE`: its first report."""
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    try:
        ran = run_loadtest(*args, "--url", url, "--quiet", "--json", str(out), timeout=timeout)
        assert out.stat().st_size, f"loadtest.py wrote no report (exit {ran.returncode}): {ran.stdout}{ran.stderr}"
        return json.loads(out.read_text())["reports"][0]
    finally:
        out.unlink()


# --- the cluster (deploy/cluster.py), as a user runs it ---------------------------------------

CLUSTER = [sys.executable, "-m", "deploy.cluster"]


# The Debian package of each program that pip does not bring (.ci/run installs them all).
PACKAGE_OF = {"pgbouncer": "pgbouncer", "haproxy": "haproxy", "etcd": "etcd-server", "patroni": "patroni",
              "prometheus": "prometheus", "promtool": "prometheus",
              "prometheus-postgres-exporter": "prometheus-postgres-exporter", "systemd-analyze": "systemd",
              "pg_rewind": "postgresql", "postgres": "postgresql"}


def program(name: str) -> str | None:
    """The path of a program on PATH or in /usr/sbin (or an absolute path), if it can be run."""
    if name.startswith("/"):
        return name if os.access(name, os.X_OK) else None
    return shutil.which(name) or shutil.which(name, path="/usr/sbin")


def not_installed(*programs: str) -> str | None:
    """One line naming the packages to install for the `programs` that are missing; None when none is."""
    missing = [name for name in programs if not program(name)]
    packages = dict.fromkeys(PACKAGE_OF.get(Path(name).name, name) for name in missing)
    return f"not installed: apt-get install {' '.join(packages)}" if packages else None


def cluster_marks(*programs: str, install: str | None = None) -> list:
    """A cluster module's skips: each of `programs` missing (one line naming the install
    command, `install` or the programs' packages), or not root (namespaces need root)."""
    missing = not_installed(*programs)
    return [pytest.mark.skipif(bool(missing), reason=f"not installed: apt-get install {install}" if install
                               else str(missing)),
            pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]


@contextlib.contextmanager
def cluster_environment(net: str):
    """The environment a test module's cluster commands run with: CLUSTER_NET `net` (not the
    default, so a user's cluster may run beside), a temporary state folder, an embedded
    PostgreSQL of the module's own (never DATABASE_URL's), and short bounds so that faults
    show within a test's time."""
    folder = Path(tempfile.mkdtemp(prefix="greenflask-cluster-test-"))
    folder.chmod(0o755)  # PgBouncer and PostgreSQL run as another user, and reach their files in it
    pgdata = folder / "pgdata"
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env.update(CLUSTER_HOST_ENV, CLUSTER_DIR=str(folder / "state"), CLUSTER_NET=net, EMBEDDED_PGDATA=str(pgdata))
    try:
        yield env
    finally:
        embedded.stop(pgdata)
        shutil.rmtree(folder, ignore_errors=True)


CLUSTER_HOST_ENV = {"DB_CONNECT_TIMEOUT": "1", "DB_POOL_SIZE": "20", "DB_STATEMENT_TIMEOUT": "10000",
                    # --monitoring's alerts fire in seconds (test_monitoring checks these rules too)
                    "CLUSTER_RULE_WINDOWS": "0.25"}


def run_cluster(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLUSTER, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def cluster_status(env: dict) -> dict:
    answer = run_cluster(env, "status", "--json")
    assert answer.returncode == 0, answer.stderr
    return json.loads(answer.stdout)


@contextlib.contextmanager
def cluster_up(env: dict, *args: str):
    """`up ARGS` on a free port (its balancer URL), then `down`, whatever happened between."""
    started = run_cluster(env, "up", *args, "--port", str(servers.free_port()))
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        yield started.stdout.strip().splitlines()[-1]
    finally:
        stopped = run_cluster(env, "down")
        assert stopped.returncode == 0, stopped.stderr
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        prefix = "gf" + env["CLUSTER_NET"].split(".")[1] + "-"
        assert prefix not in namespaces, "down removed the namespaces"


def get_json(url: str) -> dict:
    answer = request(url, timeout=5)
    assert 200 <= answer.status < 300, answer
    return answer.json()


def post_json(url: str, body: dict) -> dict:
    answer = request(url, "POST", body, timeout=5)
    assert 200 <= answer.status < 300, answer
    return answer.json()


def release_before(path: str, into: Path) -> Path | None:
    """The code as it was just before the commit that added `path` (git archive of its
    parent), in `into`: the release a rollout replaces. None where there is no such
    history (a checkout without .git, or a shallow one)."""
    try:
        added = subprocess.run(["git", "-C", str(PROJECT_DIR), "log", "--format=%H", "--diff-filter=A", "--", path],
                               capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        added = []
    if not added:
        return None
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(PROJECT_DIR), "archive", f"{added[-1]}^"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


WRITES_PER_SECOND = 20


def writes(url: str, seconds: float, tag: str, rate: int = WRITES_PER_SECOND) -> list[dict]:
    """`rate` POSTs a second for `seconds`, each with its own Idempotency-Key and
    sent again after a 503 (Retry-After) until a 201, for at most 40 s. One record per
    write: its key, its attempts (sent at, status, error code) and the id it got."""
    started = time.monotonic()

    async def one(session, number: int) -> dict:
        await asyncio.sleep(number / rate)
        key, record = str(uuid.uuid4()), {"attempts": [], "id": None}
        record["key"] = key
        while time.monotonic() - started < seconds + 40:
            sent = time.monotonic() - started
            try:
                async with session.post(url + "/todos", json={"title": f"{tag} {number}"},
                                        headers={"Idempotency-Key": key}) as response:
                    body = await response.json(content_type=None)
                    status, retry_after = response.status, float(response.headers.get("Retry-After", 1))
            except (aiohttp.ClientError, TimeoutError) as error:
                record["attempts"].append((sent, type(error).__name__, None))
                await asyncio.sleep(1)
                continue
            record["attempts"].append((sent, status, (body.get("error") or {}).get("code")))
            if status == 201:
                record["id"] = body["id"]
                return record
            if status != 503:
                return record
            await asyncio.sleep(retry_after)
        return record

    async def run():
        async with client_session(30) as session:
            return await asyncio.gather(*(one(session, number) for number in range(int(seconds * rate))))

    return asyncio.run(run())


# --- servers -----------------------------------------------------------------------------


class Server:
    def __init__(self, process, base_url: str, application_name: str, log_path: Path):
        self.process, self.base_url = process, base_url
        self.application_name, self.log_path = application_name, log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, path: str) -> str:
        return self.base_url + path

    def get(self, path: str, **kwargs) -> Answer:
        return request(self.url(path), **kwargs)

    def stats(self) -> dict:
        return self.get("/stats").json()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        servers.stop(self.pid)


@pytest.fixture(scope="session")
def start_server(database_url, tmp_path_factory):
    """Factory: start gunicorn with some env and args; every server is stopped by PID at the end
    of the session at the latest (tests and module fixtures stop theirs sooner)."""
    started: list[Server] = []

    def start(*worker_args: str, env: dict | None = None, database: str | None = None, ready: bool = True) -> Server:
        port = servers.free_port()
        name = f"gf-test-{port}"
        log_path = tmp_path_factory.mktemp("server") / "gunicorn.log"
        overrides = {
            "DATABASE_URL": database or database_url,
            "DB_APPLICATION_NAME": name,
            "DB_POOL_SIZE": TEST_POOL_SIZE,
            **(env or {}),
        }
        process = servers.start_gunicorn(port, list(worker_args), overrides, log_path)
        server = Server(process, f"http://127.0.0.1:{port}", name, log_path)
        started.append(server)
        if ready:
            wait_until_answering(server)
        return server

    yield start
    for server in started:
        server.stop()


def wait_until_answering(server: Server, within: float = 30) -> None:
    """Ready when /stats answers (it needs no database, so a server whose DB is down counts)."""
    try:
        servers.wait_until_ready(server.base_url, server.process, within, path="/stats")
    except RuntimeError as error:
        raise RuntimeError(f"{error}:\n{server.log()}") from None


@pytest.fixture(scope="module")
def green_server(start_server, database_url, engine):
    """The default mode: gunicorn app:app -k gevent, wait callback on (auto)."""
    seed.seed(engine, count=50, reset=True)
    server = start_server("-k", "gevent")
    yield server
    server.stop()


class in_background(threading.Thread):  # noqa: N801 (used as a function)
    """Run `function(*args)` in a thread; `.result` waits for it and is its return value, or
    raises what it raised (a plain Thread would print that and leave no result)."""

    def __init__(self, function, *args):
        super().__init__(daemon=True)
        self._call, self._value, self._error = (lambda: function(*args)), None, None
        self.start()

    def run(self) -> None:
        try:
            self._value = self._call()
        except BaseException as error:  # handed to whoever reads .result
            self._error = error

    @property
    def result(self):
        self.join()
        if self._error is not None:
            raise self._error
        return self._value


def wait_for_new_worker(server, old_pid: int, within: float = 20) -> int | None:
    """The pid /stats reports once a worker other than `old_pid` answers; None if none does."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            pid = server.stats()["pid"]
            if pid != old_pid:
                return pid
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return None


# --- figures for RELIABILITY.md ------------------------------------------------------------

_FIGURES: list[tuple[str, str]] = []


@pytest.fixture
def figure(request):
    """Record what a test measured; printed at the end of the run (copied into RELIABILITY.md)."""

    def record(text: str) -> None:
        _FIGURES.append((request.node.name, text))

    return record


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("measured")
        for name, text in _FIGURES:
            terminalreporter.write_line(f"{name}: {text}")

