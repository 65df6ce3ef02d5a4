"""`make bench`, section 6: how cost grows with the number of requests at once.

N = 100, 1,000, 3,000 and 10,000 concurrent GETs of 2 s sleeps on both routes, against the
app (`gunicorn app:app -k gevent`, the defaults) and the raw WSGI floor given the same
gunicorn settings, with 1 and 2 workers; each (workers, N) on freshly started servers, so
that the memory a burst adds is measured from the same start. For each: wall ÷ ideal, the
answers, the waves of 2xx and the wall the load tester names for them, the worker CPU per
request, and the worker memory (RSS) per 1,000 open connections. One row more shows
gunicorn's own defaults (1,000 connections per worker, backlog 2,048, keep-alive 2 s) at N = 3,000: the
wall the defaults here move.

    python -m bench.scale       # this section alone, written into BENCHMARKS.md
"""

import asyncio
import contextlib
import threading
import time

import psutil

from bench.suite import FLOOR_APP, RUNS, libpq_dsn, publish, server, server_processes
from greenflask import embedded, limits
from greenflask.settings import Server, Settings
from loadtester import burst, output, walls
from loadtester.measure import client_session, probe
from loadtester.report import Report, summarize

SECTION = "## 6. How cost grows: N at once, 1 and 2 workers"
COUNTS = (100, 1000, 3000, 10_000)
SECONDS = 2.0
GUNICORN_DEFAULTS = {"GUNICORN_WORKER_CONNECTIONS": "1000", "GUNICORN_BACKLOG": "2048", "GUNICORN_KEEPALIVE": "2"}


class PeakMemory:
    """The highest summed RSS of a server's workers while the block runs, sampled every 50 ms."""

    def __init__(self, server_pid: int):
        self.server_pid, self.peak, self._done = server_pid, 0, threading.Event()

    def workers_rss(self) -> int:
        total = 0
        for process in server_processes(self.server_pid)[1:]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_info().rss
        return total

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            self.peak = max(self.peak, self.workers_rss())

    def __enter__(self):
        self.before = self.workers_rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._done.set()
        self._thread.join()


def measure(base_url: str, pid: int, route: str, count: int) -> dict:
    """One burst of `count` × SECONDS on `route`: the report, worker CPU per request, and
    worker MB per 1,000 open connections (the peak RSS over the burst, less before it)."""
    url = f"{base_url}{burst.ROUTES[route]}?seconds={SECONDS:g}"

    async def run():
        stats = await probe(base_url)
        async with client_session(120) as session:
            outcomes, wall = await burst.fire(session, url, count)
        return stats, outcomes, wall

    workers = server_processes(pid)[1:]
    cpu_before, client_before = _cpu(workers), _cpu([psutil.Process()])
    with PeakMemory(pid) as memory:
        stats, outcomes, wall = asyncio.run(run())
    cpu, client = _cpu(workers) - cpu_before, _cpu([psutil.Process()]) - client_before
    report = summarize(route, url, outcomes, wall, SECONDS)
    report.wall_named = walls.name_walls(report, stats)
    return {"report": report, "cpu_us": cpu * 1e6 / count, "client_us": client * 1e6 / count,
            "mb_per_1000": (memory.peak - memory.before) / 2**20 / count * 1000}


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def warm(base_url: str) -> None:
    """Open the pools' connections once: the first burst after a start would pay for them."""
    url = f"{base_url}/sleep/postgres/?seconds=0.2"

    async def run():
        async with client_session(60) as session:
            await burst.fire(session, url, 200)

    asyncio.run(run())


def rows_for(workers: int, count: int, url: str, env: dict | None = None, floor: bool = True) -> list[dict]:
    """Both routes at `count`, on fresh servers (the app's and, with `floor`, the floor's)."""
    args = ["-k", "gevent", "-w", str(workers)]
    floor_env = {"BENCH_DSN": libpq_dsn(url), "BENCH_POOL_SIZE": str(Settings.from_env().pool_size), **(env or {})}
    runs: dict[tuple, list[dict]] = {}
    for _ in range(RUNS):
        targets = [("app", args, env or {}, "app:app", "/healthz")]
        if floor:
            targets.append(("floor", args, floor_env, FLOOR_APP, "/todos"))
        for name, worker_args, server_env, wsgi_app, ready in targets:
            with server(worker_args, server_env, wsgi_app, ready) as (base_url, pid):
                warm(base_url)
                for route in burst.ROUTES:
                    runs.setdefault((name, route), []).append(measure(base_url, pid, route, count))
    rows = []
    for route in burst.ROUTES:
        app = _median_run(runs[("app", route)])
        row = {"workers": workers, "n": count, "route": route, "app": app}
        if floor:
            row["floor"] = _median_run(runs[("floor", route)])
        rows.append(row)
    return rows


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda run: run["report"].wall)[len(runs) // 2]


def render(rows: list[dict], defaults: list[dict]) -> str:
    server_settings = Server.from_env()
    lines = [SECTION, "", f"Made by `python -m bench.scale` (part of `make bench`) on {time.strftime('%Y-%m-%d')}: "
             f"N concurrent GETs of {SECONDS:g} s sleeps from one aiohttp client on the same 2 cores, against "
             f"`gunicorn app:app -k gevent` with the defaults (GUNICORN_WORKER_CONNECTIONS "
             f"{server_settings.worker_connections}, GUNICORN_BACKLOG {server_settings.backlog}, GUNICORN_KEEPALIVE "
             f"{server_settings.keepalive} s, DB_POOL_SIZE "
             f"{Settings.from_env().pool_size}, DB_POOL_TIMEOUT {Settings.from_env().pool_timeout:g} s) and the raw "
             "WSGI floor under the same gunicorn settings; fresh servers for each N, the median of "
             f"{RUNS} run(s). CPU and memory are the workers' (the master's excluded).", "",
             "| workers | route | N | app wall ÷ ideal | floor wall ÷ ideal | app ÷ floor | app answers | "
             "app waves of 2xx | wall named | worker CPU per request, app / floor | client CPU per request | "
             "worker MB per 1,000 open connections, app / floor |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows + defaults:
        app, floor = row["app"], row.get("floor")
        report = app["report"]
        floor_ratio = f"{floor['report'].wall / SECONDS:.2f}" if floor else "-"
        of_floor = f"{report.wall / floor['report'].wall:.2f}" if floor else "-"
        cpu = f"{app['cpu_us']:.0f} / {floor['cpu_us']:.0f} µs" if floor else f"{app['cpu_us']:.0f} µs"
        memory = f"{app['mb_per_1000']:.1f} / {floor['mb_per_1000']:.1f}" if floor else f"{app['mb_per_1000']:.1f}"
        label = row["workers"] if floor else f"{row['workers']}, gunicorn's defaults"
        codes = f" ({', '.join(f'{code}' for code in report.error_codes)})" if report.error_codes else ""
        lines.append(f"| {label} | {row['route']} | {row['n']:,} | {report.wall / SECONDS:.2f} | {floor_ratio} | "
                     f"{of_floor} | {_answers(report)}{codes} | {output.describe_waves(report.ok_waves)} | "
                     f"{report.wall_named or '-'} | {cpu} | {app['client_us']:.0f} µs | {memory} |")
    lines.append("")
    return "\n".join(lines)


def _answers(report: Report) -> str:
    shown = [f"{count} x {status}" for status, count in report.statuses.items()]
    return ", ".join(shown + [f"{count} x {kind}" for kind, count in report.errors.items()])


def main() -> None:
    limits.raise_open_files(max(COUNTS) + limits.SPARE + 1000)
    url = embedded.database_url(Settings.from_env())
    rows = []
    for workers in (1, 2):
        for count in COUNTS:
            print(f"6. {workers} worker(s), N = {count:,} ...", flush=True)
            rows += rows_for(workers, count, url)
    print("6. gunicorn's defaults, N = 3,000 ...", flush=True)
    defaults = [row for row in rows_for(1, 3000, url, GUNICORN_DEFAULTS, floor=False) if row["route"] == "python"]
    publish(SECTION, render(rows, defaults))


if __name__ == "__main__":
    main()
