"""`make bench`: the speed figures, printed as tables and written to BENCHMARKS.md.

Every figure is the median of BENCH_RUNS runs (default 3), and the runs of the things
compared are made in this invocation, alternating, so a ratio never mixes two moments.

1. concurrency efficiency (wall / ideal) for N = 5, 100, 1000 on both sleep routes, with
   1 s and 2 s sleeps, and the raw WSGI floor's /sleep/python/ for N = 100 and 1000;
2. the original design's pool (5 + 10 overflow, 30 s timeout) beside the defaults;
3. throughput with wrk of GET /todos/1, /healthz and /todos on the app and on the raw WSGI
   floor (bench/floor_wsgi.py), each ratio beside its goal (ROUTE_GOALS), and GET /todos on
   the app without metrics, on sync workers and on the aiohttp + asyncpg peer
   (bench/peer_aiohttp.py), with the CPU each server and PostgreSQL spend per request;
4. the load tester's own capacity: its closed loop against wrk's on the floor (its open loop
   against wrk2: bench/client.py, section 7).

Shorter runs for a quick look: BENCH_RUNS (3), BENCH_SECONDS (sleeps, "1,2"),
BENCH_ORIGINAL_SECONDS (5), BENCH_WRK_SECONDS (8), BENCH_OUTPUT (BENCHMARKS.md).
"""

import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from importlib import metadata
from pathlib import Path

import psutil
from sqlalchemy import text
from sqlalchemy.engine import make_url

import seed
from greenflask import PROJECT_DIR, embedded, servers
from greenflask.settings import Settings, Tools
from loadtester import burst, output
from loadtester.measure import client_session
from loadtester.report import Report, summarize

ROOT = PROJECT_DIR
TOOLS = Tools.from_env()
RUNS = TOOLS.bench_runs
# The issue allows 1 or 2 s sleeps; both are measured: a fixed cost per request weighs half as
# much against a 2 s sleep.
SLEEPS = TOOLS.bench_seconds
ORIGINAL_SLEEP = TOOLS.bench_original_seconds
WRK_SECONDS = TOOLS.bench_wrk_seconds
PROCESSES = "2"
LOG = Path(tempfile.gettempdir()) / "greenflask-bench.log"
FLOOR_APP = "bench.floor_wsgi:application"
# Section 3's routes, each against the floor's same route, with the share of the floor it
# must reach (issue 41; TechEmpower's Flask entry is at 0.38-0.42 on one row, 0.57 on JSON).
ROUTE_GOALS = {"/todos/1": 0.55, "/healthz": 0.6, "/todos": 0.55}
ORIGINAL_POOL = {"DB_POOL_SIZE": "5", "DB_MAX_OVERFLOW": "10", "DB_POOL_TIMEOUT": "30"}


# --- servers -------------------------------------------------------------------------------


@contextmanager
def server(worker_args: list[str], env: dict | None = None, wsgi_app: str = "app:app", ready_path: str = "/healthz",
           cwd: Path = ROOT):
    """A gunicorn on a free port, started in `cwd`, for the duration of the block, stopped by
    its PID. Yields its base URL and the master's PID."""
    port = servers.free_port()
    base_url = f"http://127.0.0.1:{port}"
    # The floor and the peer get a config of their own: none of the app's start-up hooks.
    config = None if wsgi_app == "app:app" else str(ROOT / "bench" / "gunicorn.conf.py")
    process = servers.start_gunicorn(port, worker_args, env or {}, LOG, wsgi_app=wsgi_app, config=config, cwd=cwd)
    try:
        servers.wait_until_ready(base_url, process, path=ready_path)
        yield base_url, process.pid
    finally:
        servers.stop(process.pid)


def libpq_dsn(url: str) -> str:
    """The same database as a libpq/asyncpg DSN (the embedded server's is a unix socket)."""
    parsed = make_url(url)
    host = parsed.query.get("host") or parsed.host or "localhost"
    parts = {"dbname": parsed.database, "user": parsed.username or "postgres", "host": host}
    if parsed.port:
        parts["port"] = parsed.port
    if parsed.password:
        parts["password"] = parsed.password
    return " ".join(f"{key}={value}" for key, value in parts.items())


def asyncpg_dsn(url: str) -> str:
    parsed = make_url(url)
    host = parsed.query.get("host")
    base = parsed.set(drivername="postgresql", query={}).render_as_string(hide_password=False)
    return f"{base}?host={host}" if host else base


# --- measuring -----------------------------------------------------------------------------


def burst_report(base_url: str, route: str, count: int, seconds: float) -> Report:
    url = f"{base_url}{burst.ROUTES[route]}?seconds={seconds:g}"

    async def run():
        async with client_session(120) as session:
            return await burst.fire(session, url, count)

    outcomes, wall = asyncio.run(run())
    return summarize(route, url, outcomes, wall, seconds)


def wrk(url: str, connections: int = 64, threads: int = 2, seconds: int = WRK_SECONDS) -> dict:
    """wrk -t2 -c64: requests/s, p99 latency (ms) and the number of requests."""
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", output)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    return {"rps": rps, "p99_ms": float(p99.group(1)) * scale, "non_2xx": int(errors.group(1)) if errors else 0,
            "requests": requests}


def cpu_by_pid(processes: list[psutil.Process]) -> dict[int, float]:
    """User + system CPU seconds each of these processes has used so far (skipping any gone)."""
    used = {}
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        used[process.pid] = times.user + times.system
    return used


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two snapshots; a process born in between counts from zero."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


def server_processes(server_pid: int) -> list[psutil.Process]:
    master = psutil.Process(server_pid)
    return [master, *master.children()]


def postgres_processes() -> list[psutil.Process]:
    """Every PostgreSQL process on this machine: the servers and their backends."""
    return [process for process in psutil.process_iter(["name"]) if process.info["name"] == "postgres"]


def wrk_with_cpu(url: str, server_pid: int) -> dict:
    """wrk's figures plus the CPU µs per request spent by the server's processes and PostgreSQL's
    (new backends, opened by a pool during the run, included)."""
    server_before = cpu_by_pid(server_processes(server_pid))
    database_before = cpu_by_pid(postgres_processes())
    figures = wrk(url)
    server_seconds = cpu_used(server_before, cpu_by_pid(server_processes(server_pid)))
    database_seconds = cpu_used(database_before, cpu_by_pid(postgres_processes()))
    requests = max(figures["requests"], 1)
    figures["server_us"] = server_seconds * 1e6 / requests
    figures["postgres_us"] = database_seconds * 1e6 / requests
    return figures


def alternate(started: dict[str, tuple[str, int]], routes: tuple[str, ...]) -> dict[tuple[str, str], dict]:
    """Each route of each started server under wrk in turn, RUNS rounds alternating (so a
    ratio never mixes two moments), after a warm-up that opens every pool's connections:
    the medians per (route, server name)."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for base_url, _ in started.values():
        for route in routes:
            wrk(base_url + route, seconds=2)
    for _ in range(RUNS):
        for route in routes:
            for name, (base_url, pid) in started.items():
                runs.setdefault((route, name), []).append(wrk_with_cpu(base_url + route, pid))
    return {key: {"rps": statistics.median(run["rps"] for run in results),
                  "p99_ms": statistics.median(run["p99_ms"] for run in results),
                  "non_2xx": sum(run["non_2xx"] for run in results),
                  "server_us": statistics.median(run["server_us"] for run in results),
                  "postgres_us": statistics.median(run["postgres_us"] for run in results)}
            for key, results in runs.items()}


def loadtest_closed_loop(url: str, connections: int = 64) -> float:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "loadtest.py", "-c", str(connections), "-d", str(WRK_SECONDS),
                   "/todos", "--url", url, "--json", out.name]
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())["reports"][0]["requests_per_second"]


# --- the four sections ---------------------------------------------------------------------


def concurrency_efficiency(url: str) -> list[dict]:
    """The app's bursts, and the raw WSGI floor's /sleep/python/ beside them: what this
    machine (and the load tester on the same cores) allows any server of this stack."""
    counts = (5, 100, 1000)
    runs: dict[tuple, list[Report]] = {}
    floor_env = {"BENCH_DSN": libpq_dsn(url), "BENCH_POOL_SIZE": "100"}
    with server(["-k", "gevent"]) as (base_url, _), \
            server(["-k", "gevent"], floor_env, FLOOR_APP, "/todos") as (floor_url, _):
        burst_report(base_url, "postgres", 100, 0)  # open the pool's connections once
        burst_report(floor_url, "python", 100, 0)
        for _ in range(RUNS):
            for seconds in SLEEPS:
                for count in counts:
                    for route in burst.ROUTES:
                        report = burst_report(base_url, route, count, seconds)
                        runs.setdefault((seconds, count, route), []).append(report)
                    if count > 5:
                        report = burst_report(floor_url, "python", count, seconds)
                        runs.setdefault((seconds, count, "python, raw WSGI floor"), []).append(report)
    rows = []
    for (seconds, count, route), reports in runs.items():
        middle = sorted(reports, key=lambda report: report.wall)[len(reports) // 2]
        rows.append({
            "seconds": seconds, "n": count, "route": route, "wall": middle.wall, "ratio": middle.wall / seconds,
            "statuses": middle.statuses, "errors": middle.errors, "waves": middle.waves,
            "ok_waves": middle.ok_waves, "p50": middle.latency["p50"], "max": middle.latency["max"],
        })
    return rows


def original_pool() -> list[dict]:
    configs = {"original pool 5 + 10, 30 s": ORIGINAL_POOL, "defaults 100 + 0, 3 s": {}}
    results: dict[str, list[Report]] = {name: [] for name in configs}
    for _ in range(RUNS):
        for name, env in configs.items():
            with server(["-k", "gevent"], env) as (base_url, _):
                results[name].append(burst_report(base_url, "postgres", 100, ORIGINAL_SLEEP))
    rows = []
    for name, reports in results.items():
        middle = sorted(reports, key=lambda report: report.wall)[len(reports) // 2]
        rows.append({"config": name, "wall": middle.wall, "statuses": middle.statuses, "waves": middle.ok_waves})
    return rows


APP = "app, gevent (this project)"
FLOOR = "raw WSGI + psycopg2 + psycogreen (floor)"


def throughput(url: str) -> dict[tuple[str, str], dict]:
    """Each route of ROUTE_GOALS on the app and on the floor (the same JSON bodies, checked),
    and GET /todos on the app without metrics, on sync workers and on the aiohttp + asyncpg
    peer; all alternating in one run. The medians by (route, server)."""
    dsn = {"BENCH_DSN": libpq_dsn(url)}
    workers = ["-k", "gevent", "-w", PROCESSES]
    candidates = {
        APP: (workers, {}, "app:app", "/healthz"),
        FLOOR: (workers, dsn, FLOOR_APP, "/todos"),
        "app, gevent, METRICS=0": (workers, {"METRICS": "0"}, "app:app", "/healthz"),
        "app, sync workers": (["-w", PROCESSES], {}, "app:app", "/healthz"),
        "aiohttp + asyncpg (peer)": (
            ["-k", "aiohttp.GunicornWebWorker", "-w", PROCESSES],
            {"BENCH_DSN": asyncpg_dsn(url)}, "bench.peer_aiohttp:create_app", "/todos"),
    }
    with ExitStack() as stack:
        started = {name: stack.enter_context(server(args, env, app, ready)) for name, (args, env, app, ready) in
                   candidates.items()}
        pair = {name: started[name] for name in (APP, FLOOR)}
        for route in ROUTE_GOALS:
            bodies = {name: _body(base + route) for name, (base, _) in pair.items()}
            if len(set(bodies.values())) != 1:
                raise SystemExit(f"the app's and the floor's {route} bodies differ: {bodies}")
        figures = alternate(pair, tuple(ROUTE_GOALS))
        others = {name: started[name] for name in candidates if name not in pair}
        figures.update(alternate(others, ("/todos",)))
    return figures


def client_capacity(url: str) -> dict:
    """The load tester's closed loop against wrk on the fastest server here (the floor)."""
    env = {"BENCH_DSN": libpq_dsn(url)}
    args = ["-k", "gevent", "-w", PROCESSES]
    runs: dict[str, list[float]] = {"wrk -t2 -c64": [], "wrk -t1 -c64": [], "loadtest.py -c 64": []}
    with server(args, env, FLOOR_APP, "/todos") as (base_url, _):
        for _ in range(RUNS):
            runs["wrk -t2 -c64"].append(wrk(base_url + "/todos")["rps"])
            runs["wrk -t1 -c64"].append(wrk(base_url + "/todos", threads=1)["rps"])
            runs["loadtest.py -c 64"].append(loadtest_closed_loop(base_url))
    return {"closed": {name: statistics.median(values) for name, values in runs.items()}}


def _body(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


# --- report --------------------------------------------------------------------------------


def replace_section(target: Path, heading: str, text: str) -> None:
    """Write `text` in place of the section of `target` that starts with `heading` (up to the
    next `## ` heading), or at its end: each benchmark owns its sections of BENCHMARKS.md."""
    existing = target.read_text() if target.exists() else ""
    if heading in existing:
        start = existing.index(heading)
        following = existing.find("\n## ", start + len(heading))
        rest = existing[following + 1:] if following != -1 else ""
        existing = existing[:start] + text.rstrip("\n") + "\n" + ("\n" + rest if rest else "")
    else:
        existing = existing.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    target.write_text(existing)


def publish(heading: str, text: str) -> None:
    """Print a benchmark's section and write it into BENCHMARKS.md (BENCH_OUTPUT)."""
    print(text)
    replace_section(TOOLS.bench_output, heading, text)
    print(f"written to {TOOLS.bench_output}")


def machine_facts(url: str) -> list[str]:
    engine = embedded.script_engine(url)
    with engine.connect() as conn:
        server_version = conn.scalar(text("SHOW server_version"))
    engine.dispose()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("[")[0].strip()
    packages = ", ".join(f"{name} {metadata.version(name)}" for name in
                         ("Flask", "SQLAlchemy", "psycopg2-binary", "psycogreen", "gevent", "gunicorn", "aiohttp",
                          "asyncpg"))
    return [
        f"- {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}; {packages}",
        f"- PostgreSQL {server_version} ({'DATABASE_URL' if Settings.from_env().database_url else 'embedded'})",
        f"- {wrk_version}; every figure the median of {RUNS} runs, compared runs alternating",
    ]


def statuses_text(statuses: dict, errors: dict | None = None) -> str:
    shown = [f"{count} x {status}" for status, count in statuses.items()]
    shown += [f"{count} x {kind}" for kind, count in (errors or {}).items()]
    return ", ".join(shown)


def render(facts, efficiency, original, speed, client) -> str:
    lines = ["# Benchmarks", "", f"Made by `make bench` on {time.strftime('%Y-%m-%d')}.", "", *facts, ""]
    lines += ["## 1. Concurrency efficiency (default configuration, 1 gevent worker)", "",
              "| sleep | N | route | wall | wall / ideal | answers | waves of 2xx | latency p50 / max |",
              "|---|---|---|---|---|---|---|---|"]
    for row in efficiency:
        lines.append(f"| {row['seconds']:g} s | {row['n']} | {row['route']} | {row['wall']:.2f} s | "
                     f"{row['ratio']:.3f} | {statuses_text(row['statuses'], row['errors'])} | "
                     f"{output.describe_waves(row['ok_waves'])} | "
                     f"{row['p50']:.2f} / {row['max']:.2f} s |")
    lines += ["", f"## 2. The original design's pool, N = 100 on /sleep/postgres/, {ORIGINAL_SLEEP:g} s sleeps", "",
              "| pool | wall | answers | waves of 2xx |", "|---|---|---|---|"]
    for row in original:
        lines.append(f"| {row['config']} | {row['wall']:.2f} s | {statuses_text(row['statuses'])} | "
                     f"{output.describe_waves(row['waves'])} |")
    lines += ["", f"## 3. Throughput route by route against the floor, wrk -t2 -c64 -d{WRK_SECONDS}s, "
              f"{PROCESSES} processes each", "",
              "The app as shipped (metrics, request ids, the loop-block detector and the green wait callback on) "
              "and the floor (bench/floor_wsgi.py: raw WSGI + psycopg2 + psycogreen, the same JSON bodies) on "
              "the same database, alternating. GET /todos/1 is TechEmpower's single-row test, /healthz a JSON "
              "answer with no query (their /json), /todos a page of 50 rows.", "",
              "| route | app req/s | floor req/s | of the floor | goal | p99 app / floor | "
              "CPU per request, server / PostgreSQL: app | floor |", "|---|---|---|---|---|---|---|---|"]
    for route, goal in ROUTE_GOALS.items():
        app, floor = speed[route, APP], speed[route, FLOOR]
        ratio = app["rps"] / floor["rps"]
        lines.append(f"| GET {route} | {app['rps']:,.0f} | {floor['rps']:,.0f} | {ratio:.2f} | "
                     f"{goal:.2f}: {'met' if ratio >= goal else 'missed'} | "
                     f"{app['p99_ms']:.1f} / {floor['p99_ms']:.1f} ms | "
                     f"{app['server_us']:.0f} / {app['postgres_us']:.0f} µs | "
                     f"{floor['server_us']:.0f} / {floor['postgres_us']:.0f} µs |")
    answered_otherwise = sum(speed[route, name]["non_2xx"] for route in ROUTE_GOALS for name in (APP, FLOOR))
    lines += ["", f"Answers other than 2xx in these runs: {answered_otherwise}."]
    lines += ["", "GET /todos on other servers (each alternating with the others, the same run):", "",
              "| server | req/s | p99 | non-2xx | CPU per request: server / PostgreSQL |", "|---|---|---|---|---|"]
    for (route, name), row in speed.items():
        if route == "/todos":
            lines.append(f"| {name} | {row['rps']:,.0f} | {row['p99_ms']:.1f} ms | {row['non_2xx']} | "
                         f"{row['server_us']:.0f} / {row['postgres_us']:.0f} µs |")
    with_metrics, without = speed["/todos", APP], speed["/todos", "app, gevent, METRICS=0"]
    lines += ["", f"Cost of the Prometheus metrics on GET /todos: {1 - with_metrics['rps'] / without['rps']:.1%} of "
              f"the throughput ({with_metrics['server_us'] - without['server_us']:.0f} µs of worker CPU per request; "
              "the two did not run in the same round, so a few per cent either way is noise)."]
    lines += ["", "## 4. The load tester's own capacity (closed loop, 64 workers, against the floor)", "",
              "| client | req/s | loadtest.py / this |", "|---|---|---|"]
    closed = client["closed"]
    for name, rps in closed.items():
        lines.append(f"| {name} | {rps:,.0f} | {closed['loadtest.py -c 64'] / rps:.2f} |")
    lines += ["", "The open loop's highest rate on schedule, from 1 and 2 processes beside wrk2: section 7 "
              "(`make bench-client`)."]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    url = embedded.database_url(Settings.from_env())
    seed.seed(embedded.script_engine(url), reset=True)
    print(f"benchmarking against {make_url(url).render_as_string(hide_password=True)}; server log: {LOG}", flush=True)
    facts = machine_facts(url)
    print("1/4 concurrency efficiency ...", flush=True)
    efficiency = concurrency_efficiency(url)
    print("2/4 the original pool ...", flush=True)
    original = original_pool()
    print("3/4 throughput ...", flush=True)
    speed = throughput(url)
    print("4/4 the load tester's capacity ...", flush=True)
    client = client_capacity(url)
    report = render(facts, efficiency, original, speed, client)
    print(report)
    target = TOOLS.bench_output
    existing = target.read_text() if target.exists() else ""
    notes = existing[existing.index("## Notes"):] if "## Notes" in existing else ""
    target.write_text(report + ("\n" + notes if notes else ""))
    print(f"written to {target}")


if __name__ == "__main__":
    main()
