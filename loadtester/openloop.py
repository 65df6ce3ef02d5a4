"""The open loop: R GETs a second on a fixed schedule whatever the answers, with no cap on
requests in flight (each ends by its timeout at the latest), like wrk2 -R or vegeta -rate.
Each request records how late it left, so the latency from its intended send time is known
too: a server that stalls cannot make the client send less and so hide the stall
("coordinated omission")."""

import asyncio
import dataclasses
import time

from loadtester import interrupt, plots
from loadtester.fleet import Fleet, Share
from loadtester.measure import SLEEP_OVERSHOOT, Outcome, client_session, fetch, probe
from loadtester.output import Watch, console, print_summary
from loadtester.report import Report, Run, summarize


async def _share(share: Share, url: str, rate: float, duration: float, timeout: float,
                 give_up_behind: float | None) -> tuple[list[Outcome], float, bool]:
    """This process's places on the one schedule; (outcomes, send window, fell behind)."""
    interval, count = 1 / rate, max(1, round(rate * duration))
    tasks: list[asyncio.Task] = []
    behind, started, send_window = False, None, 0.0
    async with client_session(timeout) as session:
        try:
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
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:  # stopped (Ctrl-C): the requests that came back so far
            send_window = send_window or (time.perf_counter() - started if started else 0.0)
            for task in tasks:
                task.cancel()
    outcomes = [task.result() for task in tasks if task.done() and not task.cancelled()]
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
    interrupt.run(probe(url))
    warming = f" after {warmup:g} s of warm-up" if warmup else ""
    console.print(f"open loop: {rate:g}/s on {url + path} for {duration:g} s{warming} from {processes} "
                  f"process{'es' * (processes > 1)}")
    count = max(1, round(rate * (warmup + duration)))
    with Fleet(processes) as fleet, Watch(count, disable=quiet) as watch:
        report, _ = measure(fleet, url + path, rate, duration, timeout, warmup, on_tick=watch.tick)
    console.print(f"{report.requests} requests in {report.wall:.2f}s to {report.url}, open loop at {rate:g}/s")
    if not quiet:
        print_summary(report)
    if plot:
        plots.open_loop(report, plot)
    return Run([report], report.all_ok)
