"""Fire concurrent requests and show whether the server answered them at once, or in waves.

    python loadtest.py 100                       # 100 concurrent GETs per sleep route
    python loadtest.py 20 --seconds 1 --routes postgres
    python loadtest.py -c 64 -d 10 /todos        # closed loop, like wrk
    python loadtest.py --rate 500 -d 10 /todos   # open loop on a fixed schedule, like wrk2 -R
    python loadtest.py --matrix 5 --seconds 1    # the original README's three modes, one table
    python loadtest.py --find-capacity --slo p99=50ms /todos   # the highest rate that meets the SLO

Exit status: 0 when every request got a 2xx, 1 when any did not, 2 when the server cannot
be reached (or the command line is wrong).

Libraries: aiohttp (one ClientSession, no connection limit) sends the requests; rich draws
the progress bar, tables and colour; percentiles come from an HDR histogram (`hdrhistogram`,
the structure wrk2 and vegeta use); click reads the command line, as in every script here.
`--json FILE` writes one shape for every mode: {"mode", "url", "all_ok", "reports", "matrix"}.
"""

import asyncio
import itertools
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import click
from hdrh.histogram import HdrHistogram
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from greenflask import PROJECT_DIR, limits, servers
from greenflask.settings import Tools

ROUTES = {"python": "/sleep/python/", "postgres": "/sleep/postgres/"}
PROGRESS_BAR_ABOVE = 200
PERCENTILES = {"p50": 50, "p90": 90, "p99": 99, "p999": 99.9}
# How late asyncio's timers may fire (epoll counts whole milliseconds).
SLEEP_OVERSHOOT = 0.0015
# The closed loop pauses this long after a connection error instead of retrying at once.
ERROR_BACKOFF = 0.05
# The open loop counts a send as late when it left more than this behind its schedule.
LATE_SEND = 0.001
START_HINT = "start it with: gunicorn app:app -k gevent   (after: python seed.py)"
# The original README's figures, N=5, 5 s sleeps: (python, postgres, SUM TOTAL) per mode.
ORIGINAL = {"sync": (25.09, 25.05, 50.15), "gevent": (5.08, 25.06, 30.14), "gevent+green": (5.04, 5.03, 10.07)}
MODES = {
    # mode: (gunicorn worker args, PSYCOGREEN ("" = unset: auto), routes that run concurrently)
    "sync": ([], "", ()),
    "gevent": (["-k", "gevent"], "0", ("python",)),
    "gevent+green": (["-k", "gevent"], "1", ("python", "postgres")),
}

console = Console(highlight=False, soft_wrap=True)


class ServerUnreachable(Exception):
    pass


def ensure_open_files(connections: int) -> None:
    """Raise this process's soft limit on open files to hold `connections` sockets at once,
    as far as the hard limit allows; stop with one line naming `ulimit -n` when it cannot."""
    needed = connections + limits.SPARE
    soft, hard = limits.raise_open_files(needed)
    if soft < needed:
        raise NotEnoughOpenFiles(f"{connections} connections need {needed} open files and this shell allows "
                                 f"{soft} (hard limit {hard}): raise it first, e.g. `ulimit -n {needed}`")


class NotEnoughOpenFiles(Exception):
    pass


class MatrixSetupFailed(Exception):
    """--matrix could not seed the database or start a server: a one-line reason, exit 2."""


# --- measuring ---------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request: when it completed (s after the run started), its status or error, its
    latency from the moment it was sent, and (open loop) how late it was sent."""

    done_at: float
    latency: float
    status: int | None
    error: str | None = None
    late: float = 0.0
    code: str | None = None  # a 4xx/5xx's error code, from the project's JSON error body

    @property
    def corrected(self) -> float:
        """Latency from the moment it was meant to be sent: what a user arriving on time waits."""
        return self.latency + self.late


def error_kind(error: BaseException) -> str:
    """Group client errors the way wrk and hey users think of them."""
    if isinstance(error, asyncio.TimeoutError):
        return "timeout"
    if isinstance(error, aiohttp.ClientConnectorError):
        return "refused"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "disconnected"
    if isinstance(error, aiohttp.ClientOSError | ConnectionResetError):
        return "reset"
    if isinstance(error, aiohttp.ClientPayloadError):
        return "payload"
    return type(error).__name__


def client_session(timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=timeout),
        auto_decompress=False,
    )


async def probe(base_url: str) -> dict | None:
    """Whether the server is up (any HTTP answer, even a 404, means it is; a refused
    connection does not), and its GET /stats (its limits), or None from a server without.
    On connections of its own, closed before the run, so that every request of a burst
    starts alike (a kept-alive one would answer first and look like a wave of its own)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3)) as session:
        try:
            async with session.get(base_url + "/healthz") as response:
                await response.read()
        except (TimeoutError, aiohttp.ClientConnectionError) as error:
            raise ServerUnreachable(f"cannot reach {base_url} ({error_kind(error)})") from None
        try:
            async with session.get(base_url + "/stats") as response:
                return await response.json() if response.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None


async def fetch(session: aiohttp.ClientSession, url: str, started: float, intended: float | None = None) -> Outcome:
    """One GET, the one request function of every mode. `intended`: when the schedule wanted it sent."""
    sent = time.perf_counter()
    code = None
    try:
        async with session.get(url) as response:
            body = await response.read()
            status, error = response.status, None
            if status >= 400:
                code = error_code(body)
    except (TimeoutError, aiohttp.ClientError, OSError) as caught:
        status, error = None, error_kind(caught)
    now = time.perf_counter()
    late = max(0.0, sent - intended) if intended is not None else 0.0  # up to SLEEP_OVERSHOOT early counts as on time
    return Outcome(done_at=now - started, latency=now - sent, status=status, error=error, late=late, code=code)


def error_code(body: bytes) -> str | None:
    """`pool_exhausted` from `{"error": {"code": "pool_exhausted", ...}}`; None from any other body."""
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


async def burst(session, url: str, count: int, on_outcome=None) -> tuple[list[Outcome], float]:
    """Send `count` GETs at once; return every outcome (in completion order) and the wall time."""
    started = time.perf_counter()
    tasks = [asyncio.ensure_future(fetch(session, url, started)) for _ in range(count)]
    outcomes = []
    for next_done in asyncio.as_completed(tasks):
        outcome = await next_done
        outcomes.append(outcome)
        if on_outcome:
            on_outcome(outcome)
    return outcomes, time.perf_counter() - started


def find_waves(done_times: list[float], gap: float) -> list[int]:
    """Sizes of the groups of completions separated by more than `gap` seconds."""
    waves: list[int] = []
    previous = None
    for moment in sorted(done_times):
        if previous is None or moment - previous > gap:
            waves.append(0)
        waves[-1] += 1
        previous = moment
    return waves


def wave_gap(seconds: float) -> float:
    """Completions more than a quarter of a sleep apart belong to different waves."""
    return max(0.05, seconds / 4)


def percentiles(values: list[float]) -> dict:
    """min, p50, p90, p99, p99.9 and max in seconds, from an HDR histogram (1 µs to 1 h, 3
    significant digits): the percentiles wrk2 and vegeta report, at a fixed cost per value."""
    if not values:
        return {}
    histogram = HdrHistogram(1, 3_600_000_000, 3)
    for value in values:
        histogram.record_value(max(1, round(value * 1e6)))
    figures = {"min": histogram.get_min_value()}
    figures |= {name: histogram.get_value_at_percentile(at) for name, at in PERCENTILES.items()}
    figures["max"] = histogram.get_max_value()
    return {name: microseconds / 1e6 for name, microseconds in figures.items()}


@dataclass
class Report:
    """Every figure of one route's burst, one closed-loop or one open-loop run; what --json writes."""

    name: str
    url: str
    requests: int
    wall: float
    ideal: float | None
    statuses: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    error_codes: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)
    requests_per_second: float = 0.0
    concurrency: float = 0.0
    efficiency: float | None = None
    waves: list = field(default_factory=list)
    ok_waves: list = field(default_factory=list)
    done_times: list = field(default_factory=list)
    wall_named: str | None = None  # which of the server's limits the waves match
    # The open loop's: the rate asked and achieved, sends more than LATE_SEND late, and the
    # latency from the intended send time (corrected) beside the one from the actual send.
    rate_asked: float | None = None
    rate_achieved: float | None = None
    late_sends: int | None = None
    latency_corrected: dict = field(default_factory=dict)
    latency_service: dict = field(default_factory=dict)
    client_behind: bool = False  # the open loop stopped sending: this client could not keep the rate

    @property
    def all_ok(self) -> bool:
        return not self.errors and all(200 <= int(status) < 300 for status in self.statuses)


def tally(values) -> dict:
    """Counts by value, in value order (statuses, error kinds, time slices)."""
    return dict(sorted(Counter(values).items()))


def summarize(name: str, url: str, outcomes: list[Outcome], wall: float, seconds: float | None = None,
              rate: float | None = None, send_window: float | None = None) -> Report:
    """The one summary of every mode: `seconds` (the sleep) for a burst's waves and
    efficiency, `rate` and `send_window` for an open loop's schedule figures."""
    latencies = [outcome.latency for outcome in outcomes]
    done_times = sorted(outcome.done_at for outcome in outcomes)
    report = Report(
        name=name,
        url=url,
        requests=len(outcomes),
        wall=wall,
        ideal=seconds,
        statuses=tally(o.status for o in outcomes if o.status is not None),
        errors=tally(o.error for o in outcomes if o.error),
        error_codes=tally(o.code for o in outcomes if o.code),
        latency=percentiles(latencies),
        requests_per_second=len(outcomes) / wall if wall else 0.0,
        concurrency=sum(latencies) / wall if wall else 0.0,
    )
    if seconds is not None:
        gap = wave_gap(seconds)
        report.efficiency = min(seconds / wall, 1.0) if wall and seconds else None
        report.waves = find_waves(done_times, gap)
        report.ok_waves = find_waves([o.done_at for o in outcomes if o.status and 200 <= o.status < 300], gap)
        report.done_times = done_times
    if rate is not None:
        report.rate_asked = rate
        report.rate_achieved = len(outcomes) / send_window if send_window else 0.0
        report.late_sends = sum(outcome.late > LATE_SEND for outcome in outcomes)
        report.latency_corrected = percentiles([outcome.corrected for outcome in outcomes])
        report.latency_service = report.latency
    return report


def name_the_wall(waves: list[int], stats: dict | None, route: str) -> str | None:
    """Which of the server's limits a burst's waves of 2xx match, from its GET /stats:
    'waves of 1000: the worker's connection limit (GUNICORN_WORKER_CONNECTIONS 1000)'.
    None for one wave, or a server without /stats. A wave may come split in two by a few
    early answers, so the sums of neighbours count too."""
    if len(waves) < 2 or not stats:
        return None
    sizes = set(waves) | {first + second for first, second in itertools.pairwise(waves)}
    connections, pool = stats.get("connections") or {}, stats.get("pool") or {}
    workers = connections.get("workers") or 1
    per = f" x {workers} workers" if workers > 1 else ""
    candidates = []
    if connections.get("limit") == 1:
        candidates.append((workers, f"the sync worker answers one request at a time{per}"))
    elif connections.get("limit"):
        candidates.append((connections["limit"] * workers,
                           f"the worker's connection limit (GUNICORN_WORKER_CONNECTIONS {connections['limit']}{per})"))
    if route == "postgres" and not stats.get("wait_callback"):
        candidates.append((workers, f"pg_sleep blocks the worker: no wait callback (PSYCOGREEN){per}"))
    if route == "postgres" and pool.get("size"):
        most = pool["size"] + pool.get("max_overflow", 0)
        candidates.append((most * workers, f"the pool (DB_POOL_SIZE {pool['size']} + DB_MAX_OVERFLOW "
                                           f"{pool.get('max_overflow', 0)}{per})"))
    for size, name in candidates:
        if any(abs(seen - size) <= max(2, size // 100) for seen in sizes):
            return f"waves of {size}: {name}"
    known = ", ".join(f"{size}" for size, _ in candidates) or "none"
    if stats.get("pgbouncer"):
        return (f"waves of about {max(waves)}: none of the app's limits ({known}); behind PgBouncer, its "
                "default_pool_size?")
    return (f"uneven waves, none of the server's limits ({known}): answers spread by CPU, the server's and this "
            "client's (docs/scaling.md)")


def name_the_503s(error_codes: dict, stats: dict | None) -> str | None:
    """'503 pool_exhausted x 297: waited past DB_POOL_TIMEOUT (3 s) for one of the pool's 100 connections'."""
    count = error_codes.get("pool_exhausted")
    pool = (stats or {}).get("pool")
    if not count or not pool:
        return None
    return (f"pool_exhausted x {count}: waited past DB_POOL_TIMEOUT ({pool['timeout']:g} s) for one of the "
            f"pool's {pool['size']} connections")


def name_the_disconnects(errors: dict, stats: dict | None) -> str | None:
    """Connections the server closed unanswered: gunicorn's gevent worker gives a connection's
    request `keepalive` seconds to arrive once it starts reading, and closes it after."""
    count = errors.get("disconnected")
    keepalive = ((stats or {}).get("connections") or {}).get("keepalive")
    if not count or keepalive is None:
        return None
    return (f"disconnected x {count}: closed unanswered, their request not read within gunicorn's keepalive "
            f"({keepalive} s, GUNICORN_KEEPALIVE)")


def name_walls(report: "Report", stats: dict | None) -> str | None:
    """The limits a burst met, from its waves, its 503s and its disconnects, in one line; None for none."""
    named = [name_the_wall(report.ok_waves, stats, report.name), name_the_503s(report.error_codes, stats),
             name_the_disconnects(report.errors, stats)]
    return "; ".join(name for name in named if name) or None


# --- printing ----------------------------------------------------------------------------


def response_line(outcome: Outcome) -> str:
    """The original client's line: '\t@  5.03s got response [200]'."""
    what = f"got response [{outcome.status}]" if outcome.status is not None else f"got error [{outcome.error}]"
    return f"\t@ {outcome.done_at:5.2f}s {what}"


def print_summary(report: Report) -> None:
    statuses = "  ".join(f"{status} x {count}" for status, count in report.statuses.items())
    if report.error_codes:
        statuses += f" ({', '.join(f'{code} x {count}' for code, count in report.error_codes.items())})"
    errors = "  ".join(f"{kind} x {count}" for kind, count in report.errors.items())
    colour = "green" if report.all_ok else "red"
    errors_shown = f"   [red]errors: {errors}[/]" if errors else ""
    console.print(f"  [bold]answers[/]   [{colour}]{statuses or '-'}[/]{errors_shown}")
    if report.rate_asked is not None:
        print_schedule(report)
        return
    if report.latency:
        figures = "  ".join(f"{key} {report.latency[key]:.3f}" for key in ("min", "p50", "p90", "p99", "max"))
        console.print(f"  [bold]latency[/]   {figures} s")
    line = f"  [bold]rate[/]      {report.requests_per_second:.1f} req/s   concurrency {report.concurrency:.1f}"
    if report.efficiency is not None:
        line += f"   efficiency {report.efficiency:.2f} (ideal {report.ideal:.2f} s, observed {report.wall:.2f} s)"
    console.print(line)
    if report.ideal:
        line = f"  [bold]waves[/]     {describe_waves(report.waves)}"
        if report.ok_waves != report.waves:
            line += f"; of the 2xx answers: {describe_waves(report.ok_waves)}"
        console.print(line)
    if report.wall_named:
        console.print(f"  [bold]wall[/]      {report.wall_named}")


def print_schedule(report: Report) -> None:
    """The open loop's own lines: the schedule kept or not, and latency both ways."""
    late_share = report.late_sends / report.requests if report.requests else 0.0
    colour = "red" if late_share >= 0.01 else "green"
    console.print(f"  [bold]rate[/]      asked {report.rate_asked:.1f}/s, achieved {report.rate_achieved:.1f}/s;"
                  f" [{colour}]late sends (> {LATE_SEND * 1000:.0f} ms behind schedule) {report.late_sends}"
                  f" ({late_share:.1%})[/]")
    for label, figures in (("corrected", report.latency_corrected), ("service", report.latency_service)):
        shown = "  ".join(f"{key} {figures[key]:.4f}" for key in ("p50", "p90", "p99", "p999", "max"))
        console.print(f"  [bold]{label:<9}[/] {shown} s")
    console.print("  corrected: from the intended send time (what a user arriving on schedule waits);"
                  " service: from the actual send")


def describe_waves(waves: list[int]) -> str:
    """'1 wave: 100', '3 waves of 3', '4 waves: 100, 100, 100, 97'."""
    if len(waves) > 1 and len(set(waves)) == 1:
        return f"{len(waves)} waves of {waves[0]}"
    word = "wave" if len(waves) == 1 else "waves"
    return f"{len(waves)} {word}: {', '.join(map(str, waves))}"


def timeline_width(wall: float, slices: int = 40) -> float:
    return max(wall / slices, 0.01)


def timeline_rows(done_times: list[float], width: float) -> list[tuple[float, int]]:
    """Completions per time slice of `width` s, non-empty slices only: the waves, at a glance."""
    counts = tally(int(moment / width) for moment in done_times)
    return [((index + 1) * width, count) for index, count in counts.items()]


def print_timeline(report: Report, bar_width: int = 40) -> None:
    width = timeline_width(report.wall)
    rows = timeline_rows(report.done_times, width)
    if not rows:
        return
    most = max(count for _, count in rows)
    console.print(f"  [bold]timeline[/]  completions per {width:.2f} s slice, by the time it ends")
    for until, count in rows:
        bar = "█" * max(1, round(count / most * bar_width))
        console.print(f"  {until:8.2f}s [cyan]{bar}[/] {count}")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(reports: list[Report], path: str) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(len(reports), 1, figsize=(8, 3 * len(reports)), squeeze=False)
    for axis, report in zip(axes[:, 0], reports, strict=True):
        axis.scatter(report.done_times, range(1, len(report.done_times) + 1), s=6)
        axis.set_title(f"{report.name}: {report.requests} requests, waves {report.waves}")
        axis.set_xlabel("completed at (s)")
        axis.set_ylabel("request (by completion)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    console.print(f"timeline plot written to {path}")


def plot_open_loop(report: Report, outcomes: list[Outcome], path: str) -> None:
    """Latency over time, corrected and service, by intended send time; and the percentile
    curve on a log scale of 1 / (1 - percentile), the HdrHistogram plotter's picture."""
    plt = _pyplot()
    figure, (over_time, curve) = plt.subplots(2, 1, figsize=(9, 7))
    sent = [outcome.done_at - outcome.latency - outcome.late for outcome in outcomes]
    for label, values in (("corrected", [o.corrected for o in outcomes]), ("service", [o.latency for o in outcomes])):
        over_time.scatter(sent, [value * 1000 for value in values], s=3, label=label)
        ordered = sorted(values)
        shares = [(index + 0.5) / len(ordered) for index in range(len(ordered))]
        curve.plot([1 / (1 - share) for share in shares], [value * 1000 for value in ordered], label=label)
    over_time.set(title=f"{report.name} on {report.url}", xlabel="intended send time (s)", ylabel="latency (ms)",
                  yscale="log")
    curve.set(xscale="log", yscale="log", xlabel="percentile", ylabel="latency (ms)")
    ticks = [2, 10, 100, 1000, 10_000]
    curve.set_xticks(ticks, [f"{100 - 100 / tick:g}%" for tick in ticks])
    for axis in (over_time, curve):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    console.print(f"latency plot written to {path}")


def plot_capacity(steps: "list[Step]", best: "Step | None", percentile: str, slo: float, url: str, path: str) -> None:
    """Each step's rate against its corrected percentile, the SLO line and the knee."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(9, 5))
    for met, colour, label in ((True, "tab:green", "meets"), (False, "tab:red", "misses")):
        chosen = [step for step in steps if step.met is met and step.latency != float("inf")]
        axis.scatter([step.rate for step in chosen], [step.latency * 1000 for step in chosen], color=colour,
                     label=label, zorder=3)
    axis.axhline(slo * 1000, color="tab:gray", linestyle="--", label=f"SLO {percentile} <= {_ms(slo)}")
    if best is not None:
        axis.axvline(best.rate, color="tab:blue", linestyle=":", label=f"knee: {best.rate:,.0f} req/s")
    axis.set(xscale="log", yscale="log", xlabel="rate asked (req/s)", ylabel=f"{percentile}, corrected (ms)",
             title=f"capacity search on {url}")
    from matplotlib.ticker import ScalarFormatter

    for scale in (axis.xaxis, axis.yaxis):
        scale.set_major_formatter(ScalarFormatter())
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    console.print(f"capacity plot written to {path}")


# --- the three modes of running ----------------------------------------------------------


async def run_routes(base_url: str, count: int, seconds: float, routes: list[str], timeout: float, quiet: bool):
    """What the original client did, plus a summary per route."""
    reports = []
    stats = await probe(base_url)
    async with client_session(timeout) as session:
        for name in routes:
            url = f"{base_url}{ROUTES[name]}?seconds={seconds:g}"
            print(f"Sending {count} requests for {url}...", flush=True)
            outcomes, wall = await _burst_with_output(session, url, count, quiet)
            print(f"\t= {wall:5.2f}s TOTAL", flush=True)
            report = summarize(name, url, outcomes, wall, seconds)
            report.wall_named = name_walls(report, stats)
            if not quiet:
                print_summary(report)
                print_timeline(report)
            reports.append(report)
    print("------------------------------------------")
    print(f"SUM TOTAL = {sum(report.wall for report in reports):.2f}s", flush=True)
    return reports


async def _burst_with_output(session, url: str, count: int, quiet: bool):
    if quiet:
        return await burst(session, url, count)
    if count <= PROGRESS_BAR_ABOVE:
        return await burst(session, url, count, lambda outcome: print(response_line(outcome), flush=True))
    columns = (*Progress.get_default_columns()[:2], BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("responses", total=count)
        return await burst(session, url, count, lambda outcome: progress.advance(task))


async def closed_loop(base_url: str, path: str, concurrency: int, duration: float, timeout: float) -> Report:
    """`concurrency` workers each send the next GET as soon as the last answered, for
    `duration` seconds. Nothing is printed per request: the client must not be the bottleneck."""
    url = base_url + path
    outcomes: list[Outcome] = []

    async def worker(session, started, deadline):
        while time.perf_counter() < deadline:
            outcome = await fetch(session, url, started)
            outcomes.append(outcome)
            if outcome.error:
                await asyncio.sleep(ERROR_BACKOFF)  # a refused connection must not spin the loop

    await probe(base_url)
    async with client_session(timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session, started, started + duration) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return summarize(f"closed loop c={concurrency}", url, outcomes, wall)


async def open_loop(base_url: str, path: str, rate: float, duration: float, timeout: float,
                    quiet: bool = False, give_up_behind: float | None = None) -> tuple[Report, list[Outcome]]:
    """Send `rate` GETs a second for `duration` seconds on a fixed schedule, whatever the
    answers, with no cap on requests in flight (each ends by `timeout` at the latest), like
    wrk2 -R or vegeta -rate. Each request records how late it left, so the latency from its
    intended send time is known too: a server that stalls cannot make the client send less
    and so hide the stall ("coordinated omission"). With `give_up_behind`, sending stops once
    the client is that far behind its schedule (it cannot keep the rate: the report says so)."""
    url = base_url + path
    interval = 1 / rate
    count = max(1, round(rate * duration))
    tasks: list[asyncio.Task] = []
    await probe(base_url)
    async with client_session(timeout) as session:
        with Progress(TextColumn("{task.description}"), console=console, transient=True, disable=quiet) as progress:
            line = progress.add_task("", total=count)
            started, behind = time.perf_counter(), False
            for index in range(count):
                intended = started + index * interval
                # The loop's timers wake up to a millisecond late: wake early, send on time.
                if (wait := intended - time.perf_counter() - SLEEP_OVERSHOOT) > 0:
                    await asyncio.sleep(wait)
                elif give_up_behind is not None and -wait > give_up_behind:
                    behind = True
                    break
                tasks.append(asyncio.create_task(fetch(session, url, started, intended)))
                if index % max(1, round(rate / 4)) == 0:  # four updates a second
                    progress.update(line, description=_progress_line(tasks, index + 1, count))
            send_window = time.perf_counter() - started
            outcomes = list(await asyncio.gather(*tasks))
            wall = time.perf_counter() - started
    report = summarize(f"open loop {rate:g}/s", url, outcomes, wall, rate=rate, send_window=send_window)
    report.client_behind = behind
    return report, outcomes


# --- the capacity search ------------------------------------------------------------------

SLO_FORMS = "p50, p90, p99 or p999 = a number and ms or s, e.g. p99=50ms or p999=1.5s"
ERRORS_ALLOWED = 0.01  # a step with this share of non-2xx answers or client errors misses
LATE_ALLOWED = 0.01  # ... and one with this share of late sends says nothing of the server
# A send counts as late for a step's verdict past this or a fifth of the SLO, whichever is less:
# asyncio's timers on a busy machine leave a few ms behind, which the corrected latency counts.
STEP_LATE = 0.010
GIVE_UP_BEHIND = 0.25  # seconds behind schedule after which a step stops: the client cannot keep it
CLOSE_ENOUGH = 0.1  # the bisection stops when the gap between a met and a missed rate is this share


def parse_slo(text: str) -> tuple[str, float]:
    """'p99=50ms' -> ('p99', 0.05); anything else is a usage error naming the accepted forms."""
    match = re.fullmatch(r"(p50|p90|p99|p999)=(\d+(?:\.\d+)?)(ms|s)", text.strip())
    if not match or float(match.group(2)) <= 0:
        raise click.BadParameter(f"{text!r} is not an SLO: use {SLO_FORMS}")
    return match.group(1), float(match.group(2)) / (1000 if match.group(3) == "ms" else 1)


@dataclass
class Step:
    """One open-loop step of the search and its verdict."""

    rate: float
    achieved: float
    latency: float  # corrected, at the SLO's percentile
    errors: float  # share of non-2xx answers and client errors
    late: float  # share of sends more than min(STEP_LATE, SLO / 5) behind schedule
    client_behind: bool
    verdict: str

    @property
    def met(self) -> bool:
        return self.verdict == "meets"


def judge(report: Report, outcomes: list[Outcome], percentile: str, slo: float) -> Step:
    failed = report.requests - sum(count for status, count in report.statuses.items() if 200 <= int(status) < 300)
    errors = failed / report.requests if report.requests else 1.0
    late_bound = min(STEP_LATE, slo / 5)
    late = sum(outcome.late > late_bound for outcome in outcomes) / len(outcomes) if outcomes else 1.0
    latency = report.latency_corrected.get(percentile, float("inf"))
    if report.client_behind or late >= LATE_ALLOWED:
        verdict = "client behind"
    elif errors >= ERRORS_ALLOWED:
        verdict = f"errors {errors:.1%}"
    elif latency > slo:
        verdict = f"misses {percentile}"
    else:
        verdict = "meets"
    return Step(report.rate_asked, report.rate_achieved or 0.0, latency, errors, late, report.client_behind
                or late >= LATE_ALLOWED, verdict)


def next_rate(steps: list[Step], start: float, max_rate: float) -> float | None:
    """Double while every step met the SLO; then bisect between the highest rate that met it
    and the lowest that missed; None when the search is over."""
    met = [step.rate for step in steps if step.met]
    missed = [step.rate for step in steps if not step.met]
    if any(step.client_behind for step in steps) or (missed and not met):
        return None
    low = max(met)
    above = [rate for rate in missed if rate > low]
    if not above:
        return min(low * 2, max_rate) if low < max_rate else None
    high = min(above)
    if high - low <= max(1.0, low * CLOSE_ENOUGH):
        return None
    return float(round((low + high) / 2))


async def find_capacity(base_url: str, path: str, percentile: str, slo: float, duration: float, timeout: float,
                        start: float, max_rate: float, max_seconds: float, steps: list, reports: list,
                        on_step) -> None:
    """Open-loop steps until the knee is found, appending to `steps` and `reports` as it
    goes (so that a Ctrl-C keeps what was found); never past `max_seconds` in all. A step
    whose sends were late, though the client never fell behind for good, runs once more."""
    began, rate, retried = time.monotonic(), min(start, max_rate), set()
    while rate is not None and time.monotonic() - began + duration + timeout <= max_seconds:
        report, outcomes = await open_loop(base_url, path, rate, duration, timeout, quiet=True,
                                           give_up_behind=GIVE_UP_BEHIND)
        step = judge(report, outcomes, percentile, slo)
        if step.client_behind and not report.client_behind and rate not in retried:
            # Late sends without falling behind for good (a pause of this process): once more.
            retried.add(rate)
            continue
        reports.append(report)
        steps.append(step)
        on_step(step)
        rate = next_rate(steps, start, max_rate)


def capacity_answer(steps: list[Step], percentile: str, slo: float) -> tuple[Step | None, str]:
    """The highest rate that met the SLO, and the line that says it (or why there is none)."""
    met = [step for step in steps if step.met]
    best = max(met, key=lambda step: step.rate) if met else None
    behind = next((step for step in steps if step.client_behind), None)
    goal = f"{percentile} <= {_ms(slo)}"
    if best is None:
        if behind:
            return None, f"no answer: the client cannot keep {behind.rate:,.0f}/s on this machine"
        return None, f"no answer: even {steps[0].rate:,.0f}/s misses {goal}" if steps else "no step ran"
    line = f"capacity: {best.rate:,.0f} req/s meets {goal} ({percentile} {_ms(best.latency)})"
    if behind:
        line += (f"; the client cannot keep {behind.rate:,.0f}/s on this machine, so the server's own limit "
                 "may be higher")
    return best, line


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"


def print_step(step: Step, percentile: str) -> None:
    colour = "green" if step.met else "red"
    console.print(f"  {step.rate:>9,.0f} {step.achieved:>9,.0f}  {_ms(step.latency):>10}  {step.errors:>6.1%}"
                  f"  {step.late:>6.1%}  [{colour}]{step.verdict}[/]")


def _progress_line(tasks: list[asyncio.Task], sent: int, count: int) -> str:
    done = [task.result() for task in tasks if task.done()]
    late = sum(outcome.late > LATE_SEND for outcome in done)
    errors = sum(outcome.error is not None for outcome in done)
    in_flight = len(tasks) - len(done)
    return f"sent {sent}/{count}   in flight {in_flight}   answered {len(done)}   late {late}   errors {errors}"


def ideal_for(mode: str, route: str, count: int, seconds: float) -> float:
    concurrent = route in MODES[mode][2]
    return seconds if concurrent else count * seconds


async def run_matrix(count: int, seconds: float, timeout: float, log_path: Path) -> tuple[list[dict], list[Report]]:
    """The original README's experiment: each mode on its own server, both routes; a row per
    mode and route, and its report."""
    _seed_database()
    rows, all_reports = [], []
    for mode, (worker_args, green, _) in MODES.items():
        port = servers.free_port()
        base_url = f"http://127.0.0.1:{port}"
        command = " ".join([f"PSYCOGREEN={green}"] * bool(green) + ["gunicorn app:app", *worker_args])
        console.print(f"[bold]{mode}[/]: {command}  (on {base_url})")
        process = servers.start_gunicorn(port, worker_args, {"PSYCOGREEN": green}, log_path)
        try:
            try:
                servers.wait_until_ready(base_url, process)
            except RuntimeError as error:
                raise MatrixSetupFailed(f"{mode}: {error} (its log: {log_path})") from None
            blocks_before, _ = loop_blocks(base_url)
            reports = await run_routes(base_url, count, seconds, list(ROUTES), timeout, quiet=True)
            await asyncio.sleep(0.3)  # the server reports a block once its loop runs again
            blocks_after, longest = loop_blocks(base_url)
        finally:
            servers.stop(process.pid)
        for index, report in enumerate(reports):
            original = ORIGINAL[mode][index] if (count, seconds) == (5, 5) else None
            rows.append(
                {
                    "mode": mode,
                    "route": report.name,
                    "observed": report.wall,
                    "ideal": ideal_for(mode, report.name, count, seconds),
                    "original": original,
                    "waves": report.waves,
                    "all_ok": report.all_ok,
                    "loop_blocks": blocks_after - blocks_before if worker_args else None,
                    "longest_block": longest,
                }
            )
        all_reports += reports
    return rows, all_reports


def loop_blocks(base_url: str) -> tuple[float, float]:
    """(loop blocks counted so far, the longest in s), from the server's GET /metrics."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    families = text_string_to_metric_families(text)
    samples = {sample.name: sample.value for family in families for sample in family.samples}
    return (samples.get("greenflask_event_loop_blocked_total", 0.0),
            samples.get("greenflask_event_loop_blocked_longest_seconds", 0.0))


def _seed_database() -> None:
    seeding = subprocess.run([sys.executable, "seed.py"], cwd=PROJECT_DIR, capture_output=True, text=True)
    if seeding.returncode != 0:
        reason = (seeding.stderr.strip().splitlines() or ["no output"])[-1]
        raise MatrixSetupFailed(f"python seed.py failed: {reason}")


def print_matrix(rows: list[dict], count: int, seconds: float) -> None:
    table = Table(title=f"N={count} concurrent requests per route, {seconds:g} s sleeps")
    for column in ("mode", "route", "observed", "ideal", "original", "waves", "loop blocks (longest)"):
        table.add_column(column, justify="left" if column in ("mode", "route", "waves") else "right", no_wrap=True)
    for row in rows:
        original = f"{row['original']:.2f} s" if row["original"] is not None else "-"
        waves = describe_waves(row["waves"])
        observed, ideal = f"{row['observed']:.2f} s", f"{row['ideal']:.2f} s"
        table.add_row(row["mode"], row["route"], observed, ideal, original, waves, "")
    for mode in MODES:
        mode_rows = [row for row in rows if row["mode"] == mode]
        total = sum(row["observed"] for row in mode_rows)
        ideal = sum(row["ideal"] for row in mode_rows)
        original = ORIGINAL[mode][2] if mode_rows[0]["original"] is not None else None
        table.add_row(
            mode, "SUM TOTAL", f"{total:.2f} s", f"{ideal:.2f} s", f"{original:.2f} s" if original else "-", "",
            describe_blocks(mode_rows[0]), style="bold",
        )
    Console(highlight=False, width=max(console.width, 120)).print(table)  # one line per row, even in a CI log
    if rows[0]["original"] is None:
        console.print("The original README's figures are for N=5 and 5 s sleeps: --matrix 5 --seconds 5.")


def describe_blocks(row: dict) -> str:
    """'5 (1.02 s)', '0', or 'off': the detector runs in gevent workers only."""
    if row["loop_blocks"] is None:
        return "off"
    if not row["loop_blocks"]:
        return "0"
    return f"{row['loop_blocks']:.0f} ({row['longest_block']:.2f} s)"


# --- command line ------------------------------------------------------------------------

# Which options each mode takes; any other given on the command line is a usage error.
MODE_OPTIONS = {
    "burst": {"target", "url", "seconds", "routes", "timeout", "json_path", "quiet", "plot"},
    "closed": {"target", "url", "concurrency", "duration", "timeout", "json_path", "quiet"},
    "open": {"target", "url", "rate", "duration", "timeout", "json_path", "quiet", "plot"},
    "capacity": {"target", "url", "find_capacity", "slo", "duration", "timeout", "json_path", "plot", "max_seconds",
                 "max_rate", "start_rate"},
    "matrix": {"matrix", "seconds", "timeout", "json_path"},
}
FLAGS = {"target": "N or PATH", "url": "--url", "seconds": "--seconds", "routes": "--routes", "timeout": "--timeout",
         "json_path": "--json", "quiet": "--quiet", "plot": "--plot", "concurrency": "-c", "rate": "--rate",
         "duration": "-d", "matrix": "--matrix", "find_capacity": "--find-capacity", "slo": "--slo",
         "max_seconds": "--max-seconds", "max_rate": "--max-rate", "start_rate": "--start-rate"}
# The option that picks each mode other than a burst, and how a usage error names the mode.
MODE_FLAG = {"matrix": "matrix", "closed": "concurrency", "open": "rate", "capacity": "find_capacity"}
MODE_NAMES = {"burst": "a burst of N", "closed": "the closed loop (-c)", "open": "the open loop (--rate)",
              "capacity": "--find-capacity", "matrix": "--matrix (it starts its own servers)"}
CAPACITY_STEP_SECONDS = 5.0  # -d of a capacity step when not given


def _given(ctx: click.Context) -> list[str]:
    """The options the user typed (not their defaults)."""
    return [name for name in FLAGS if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]


def _mode(ctx: click.Context) -> str:
    """The mode the options choose; two modes at once, or an option another mode takes, is a usage error."""
    given = _given(ctx)
    chosen = [mode for mode, flag in MODE_FLAG.items() if flag in given]
    if len(chosen) > 1:
        flags = " and ".join(FLAGS[MODE_FLAG[mode]] for mode in chosen)
        raise click.UsageError(f"{flags} are different modes: choose one")
    mode = chosen[0] if chosen else "burst"
    stray = [FLAGS[name] for name in given if name not in MODE_OPTIONS[mode]]
    if stray:
        raise click.UsageError(f"{', '.join(stray)} does not apply to {MODE_NAMES[mode]}")
    return mode


def _routes(ctx, param, value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names or any(name not in ROUTES for name in names):
        raise click.BadParameter(f"takes python and/or postgres, got {value!r}")
    return names


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("target", required=False)
@click.option("--url", default="http://localhost:8000", show_default=True, help="Server base URL.")
@click.option("--seconds", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="Sleep per request, sent as ?seconds=.")
@click.option("--routes", default="python,postgres", show_default=True, callback=_routes,
              help="Comma-separated: python, postgres.")
@click.option("--timeout", default=120.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Per-request timeout in seconds.")
@click.option("--json", "json_path", metavar="FILE", help="Write every figure to FILE as JSON (one shape, all modes).")
@click.option("--quiet", is_flag=True, help="Only the totals: no per-response lines, live line, summary or timeline.")
@click.option("--plot", metavar="FILE.png",
              help="Draw the completion timeline (needs matplotlib).")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), help="Closed loop: this many workers.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), metavar="R",
              help="Open loop: R requests a second on a fixed schedule.")
@click.option("-d", "--duration", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Closed or open loop: seconds.")
@click.option("--matrix", type=click.IntRange(min=1), metavar="N", help="Start the server in each of the three modes.")
@click.option("--find-capacity", is_flag=True, help="Search for the highest rate that meets --slo (open-loop steps).")
@click.option("--slo", metavar="pNN=TIME", help=f"With --find-capacity: {SLO_FORMS}.")
@click.option("--max-seconds", default=180.0, show_default=True, type=click.FloatRange(min=1),
              help="With --find-capacity: the whole search ends by then.")
@click.option("--max-rate", default=10_000.0, show_default=True, type=click.FloatRange(min=1),
              help="With --find-capacity: never send faster.")
@click.option("--start-rate", default=50.0, show_default=True, type=click.FloatRange(min=1),
              help="With --find-capacity: the first step's rate.")
@click.pass_context
def cli(ctx, target, url, seconds, routes, timeout, json_path, quiet, plot, concurrency, rate, duration, matrix,
        find_capacity, slo, max_seconds, max_rate, start_rate) -> int:
    """Concurrent-request load tester for greenflask.

    TARGET is N, the requests per route (default 5), or a PATH with -c, --rate or
    --find-capacity (default /todos).
    """
    mode = _mode(ctx)
    url = url.rstrip("/")
    if mode == "capacity":
        if not slo:
            raise click.UsageError(f"--find-capacity needs --slo: {SLO_FORMS}")
        percentile, slo_seconds = parse_slo(slo)
        if ctx.get_parameter_source("duration") != click.core.ParameterSource.COMMANDLINE:
            duration = CAPACITY_STEP_SECONDS
    if plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise click.UsageError("--plot needs matplotlib: pip install matplotlib") from None
    if mode in ("closed", "open", "capacity"):
        path = target or "/todos"
        if not path.startswith("/"):
            raise click.UsageError(f"PATH must start with '/', got {path!r}")
    elif mode == "burst":
        try:
            count = int(target) if target else 5
        except ValueError:
            raise click.UsageError(f"N must be an integer, got {target!r}") from None
        if count < 1:
            raise click.UsageError("N must be >= 1")
    try:
        # At most this many sockets at once: a burst's N, the closed loop's workers, the matrix's
        # N, an open loop's requests in flight (each ends by its timeout).
        if mode == "burst":
            in_flight = count
        elif mode in ("closed", "matrix"):
            in_flight = concurrency or matrix
        elif mode == "open":
            in_flight = round(rate * min(duration, timeout))
        else:
            in_flight = round(max_rate * min(duration, step_timeout(timeout, slo_seconds)))
        ensure_open_files(in_flight)
        capacity, steps = None, []
        if mode == "matrix":
            rows, reports = asyncio.run(run_matrix(matrix, seconds, timeout, Tools.from_env().loadtest_server_log))
            print_matrix(rows, matrix, seconds)
            ok = all(row["all_ok"] for row in rows)
        elif mode == "capacity":
            reports, rows = [], []
            capacity, ok = run_capacity(url, path, percentile, slo_seconds, duration, timeout, start_rate, max_rate,
                                        max_seconds, steps, reports, plot)
        elif mode == "open":
            report, outcomes = asyncio.run(open_loop(url, path, rate, duration, timeout, quiet))
            print(f"{report.requests} requests in {report.wall:.2f}s to {report.url}, open loop at {rate:g}/s")
            if not quiet:
                print_summary(report)
            reports, rows, ok = [report], [], report.all_ok
            if plot:
                plot_open_loop(report, outcomes, plot)
        elif mode == "closed":
            report = asyncio.run(closed_loop(url, path, concurrency, duration, timeout))
            print(f"{report.requests} requests in {report.wall:.2f}s to {report.url}, {concurrency} workers")
            if not quiet:
                print_summary(report)
            reports, rows, ok = [report], [], report.all_ok
        else:
            reports = asyncio.run(run_routes(url, count, seconds, routes, timeout, quiet))
            rows, ok = [], all(report.all_ok for report in reports)
            if plot:
                save_plot(reports, plot)
    except ServerUnreachable as error:
        print(f"loadtest.py: {error}; {START_HINT}", file=sys.stderr)
        return 2
    except MatrixSetupFailed as error:
        print(f"loadtest.py --matrix: {error}", file=sys.stderr)
        return 2
    except NotEnoughOpenFiles as error:
        print(f"loadtest.py: {error}", file=sys.stderr)
        return 2
    if json_path:
        write_json(json_path, {"mode": mode, "url": None if mode == "matrix" else url, "all_ok": ok,
                               "reports": [asdict(report) for report in reports], "matrix": rows,
                               "capacity": capacity, "steps": [asdict(step) for step in steps]})
    return 0 if ok else 1


def step_timeout(timeout: float, slo: float) -> float:
    """A request slower than ten times the SLO has missed it anyway: no step waits longer."""
    return min(timeout, max(1.0, 10 * slo))


def run_capacity(url, path, percentile, slo, duration, timeout, start, max_rate, max_seconds, steps, reports,
                 plot) -> tuple[dict | None, bool]:
    """--find-capacity: the search with its table, the answer, the picture; (capacity, found)."""
    timeout = step_timeout(timeout, slo)
    console.print(f"searching the highest rate on {url}{path} with {percentile} <= {_ms(slo)} (corrected), errors "
                  f"and late sends under {ERRORS_ALLOWED:.0%}: steps of {duration:g} s from {start:g}/s, doubling "
                  f"then bisecting, never above {max_rate:g}/s, requests timed out after {timeout:g} s; done "
                  f"within {max_seconds:g} s")
    console.print(f"  {'asked/s':>9} {'achieved':>9}  {percentile + ' corr.':>10}  {'errors':>6}  {'late':>6}  verdict")
    try:
        asyncio.run(find_capacity(url, path, percentile, slo, duration, timeout, start, max_rate, max_seconds,
                                  steps, reports, lambda step: print_step(step, percentile)))
    except KeyboardInterrupt:
        console.print("  interrupted: what was found so far")
    best, line = capacity_answer(steps, percentile, slo)
    console.print(f"[bold]{line}[/]")
    if plot:
        plot_capacity(steps, best, percentile, slo, url + path, plot)
    found = {"rate": best.rate, "slo": slo, "percentile": percentile, "latency": best.latency} if best else None
    return found, best is not None


def write_json(path: str, payload: dict) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, default=str))


def main(argv=None) -> int:
    """The command line: a usage error is one line on stderr and exit 2, without click's usage block."""
    try:
        return cli.main(args=argv, prog_name="loadtest.py", standalone_mode=False)
    except click.UsageError as error:
        print(f"loadtest.py: {error.format_message()} (see --help)", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, click.Abort):
        return 130


if __name__ == "__main__":
    sys.exit(main())
