"""A burst: N GETs at once on each sleep route, what the original client did, with the
waves they came back in and the server's limit those waves match."""

import asyncio
import contextlib
import time

from loadtester import interrupt, plots
from loadtester.fleet import Fleet, Share, default_processes
from loadtester.measure import NOT_WATCHED, Live, Outcome, client_session, fetch, probe
from loadtester.output import Watch, print_summary, print_timeline, response_line
from loadtester.report import Run, summarize
from loadtester.walls import name_walls

ROUTES = {"python": "/sleep/python/", "postgres": "/sleep/postgres/"}
PROGRESS_BAR_ABOVE = 200  # more answers than this show a bar instead of a line each
# A burst larger than this is sent from every core: one process spends about a second of CPU
# opening 10,000 connections, which spreads the burst it means to send at once.
SPREAD_ABOVE = 1000


async def fire(session, url: str, count: int, started: float | None = None, on_outcome=None,
               live: Live = NOT_WATCHED, outcomes: list | None = None) -> tuple[list[Outcome], float]:
    """Send `count` GETs at once; every outcome (in completion order, appended to `outcomes`
    as each comes, so that a cancelled burst keeps them) and the wall time."""
    started = time.perf_counter() if started is None else started
    tasks = [asyncio.ensure_future(fetch(session, url, started, live=live)) for _ in range(count)]
    outcomes = [] if outcomes is None else outcomes
    try:
        for next_done in asyncio.as_completed(tasks):
            outcome = await next_done
            outcomes.append(outcome)
            if on_outcome:
                on_outcome(outcome)
    finally:
        for task in tasks:
            task.cancel()
    return outcomes, time.perf_counter() - started


async def _share(share: Share, url: str, count: int, timeout: float, lines: bool) -> list[Outcome]:
    outcomes: list[Outcome] = []
    async with client_session(timeout) as session:
        with contextlib.suppress(asyncio.CancelledError):  # stopped (Ctrl-C): what came back so far
            started = await share.start()
            shown = (lambda outcome: print(response_line(outcome), flush=True)) if lines else None
            await fire(session, url, share.part(count), started, shown, share.live, outcomes)
    return outcomes


def processes_for(count: int, processes: int | None) -> int:
    return processes or (1 if count <= SPREAD_ABOVE else default_processes())


def run(url: str, count: int, seconds: float, routes: list[str], timeout: float, quiet: bool = False,
        plot: str | None = None, processes: int | None = None) -> Run:
    """Each route's burst in turn, printed as it comes; a report per route."""
    stats = interrupt.run(probe(url))
    reports = []
    with Fleet(processes_for(count, processes)) as fleet:
        for name in routes:
            if interrupt.requested():
                break
            route_url = f"{url}{ROUTES[name]}?seconds={seconds:g}"
            print(f"Sending {count} requests for {route_url}...", flush=True)
            lines = not quiet and count <= PROGRESS_BAR_ABOVE
            with Watch(count, bar=True, disable=quiet or lines) as watch:
                results, start_at = fleet.run(_share, route_url, count, timeout, lines, on_tick=watch.tick)
            outcomes = [outcome for part in results for outcome in part]
            wall = max((outcome.done_at for outcome in outcomes), default=0.0)
            print(f"\t= {wall:5.2f}s TOTAL", flush=True)
            report = summarize(name, route_url, outcomes, wall, seconds, started_at=start_at,
                               processes=fleet.processes, client_cpu=(fleet.cpu, len(outcomes)))
            report.wall_named = name_walls(report, stats)
            if not quiet and outcomes:
                print_summary(report)
                print_timeline(report)
            reports.append(report)
    print("------------------------------------------")
    print(f"SUM TOTAL = {sum(report.wall for report in reports):.2f}s", flush=True)
    if plot:
        plots.bursts(reports, plot)
    return Run(reports, all(report.all_ok for report in reports))


