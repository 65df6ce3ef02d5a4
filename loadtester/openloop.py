"""The open loop: R GETs a second on a fixed schedule whatever the answers, with no cap on
requests in flight (each ends by its timeout at the latest), like wrk2 -R or vegeta -rate.
Each request records how late it left, so the latency from its intended send time is known
too: a server that stalls cannot make the client send less and so hide the stall
("coordinated omission")."""

import asyncio
import dataclasses
import time

from loadtester import plots
from loadtester.fleet import Fleet, Share
from loadtester.measure import SLEEP_OVERSHOOT, Outcome, client_session, fetch, probe
from loadtester.output import Watch, console, print_summary
from loadtester.report import Report, Run, summarize


async def _share(share: Share, url: str, rate: float, duration: float, timeout: float,
                 give_up_behind: float | None) -> tuple[list[Outcome], float, bool]:
    """This process's places on the one schedule; (outcomes, send window, fell behind)."""
    interval, count = 1 / rate, max(1, round(rate * duration))
    tasks: list[asyncio.Task] = []
    behind = False
    async with client_session(timeout) as session:
        started = await share.start()
        for index in share.indices(count):
            intended = started + index * interval
            # The loop's timers wake up to a millisecond late: wake early, send on time.
            if (wait := intended - time.perf_counter() - SLEEP_OVERSHOOT) > 0:
                await asyncio.sleep(wait)
            elif give_up_behind is not None and -wait > give_up_behind:
                behind = True
                break
            tasks.append(asyncio.create_task(fetch(session, url, started, intended, share.live)))
        send_window = time.perf_counter() - started
        outcomes = list(await asyncio.gather(*tasks))
    return outcomes, send_window, behind


def measure(fleet: Fleet, url: str, rate: float, duration: float, timeout: float, warmup: float = 0.0,
            give_up_behind: float | None = None, on_tick=None) -> tuple[Report, list[Outcome]]:
    """One open-loop run of `warmup` + `duration` seconds from the fleet; the first `warmup`
    seconds of sends (new connections, the server's pool growing) are left out of the report.
    With `give_up_behind`, a process stops sending once that far behind its schedule."""
    results, start_at = fleet.run(_share, url, rate, warmup + duration, timeout, give_up_behind, on_tick=on_tick)
    # A send may leave up to SLEEP_OVERSHOOT early, so its intended time is known to about that.
    outcomes = [outcome for part, _, _ in results for outcome in part]
    client_cpu = (fleet.cpu, len(outcomes))
    if warmup:
        outcomes = [dataclasses.replace(outcome, done_at=outcome.done_at - warmup) for outcome in outcomes
                    if outcome.intended_at >= warmup - 0.5 / rate]
    send_window = max(0.0, max(window for _, window, _ in results) - warmup)
    wall = max([send_window, *(outcome.done_at for outcome in outcomes)])
    report = summarize(f"open loop {rate:g}/s", url, outcomes, wall, rate=rate, send_window=send_window,
                       started_at=start_at + warmup, processes=fleet.processes, client_cpu=client_cpu)
    report.client_behind = any(behind for _, _, behind in results)
    return report, outcomes


def run(url: str, path: str, rate: float, duration: float, timeout: float, quiet: bool = False,
        plot: str | None = None, processes: int = 1, warmup: float = 0.0) -> Run:
    asyncio.run(probe(url))
    count = max(1, round(rate * (warmup + duration)))
    with Fleet(processes) as fleet, Watch(count, disable=quiet) as watch:
        report, _ = measure(fleet, url + path, rate, duration, timeout, warmup, on_tick=watch.tick)
    console.print(f"{report.requests} requests in {report.wall:.2f}s to {report.url}, open loop at {rate:g}/s")
    if not quiet:
        print_summary(report)
    if plot:
        plots.open_loop(report, plot)
    return Run([report], report.all_ok)
