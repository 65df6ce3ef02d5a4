"""The closed loop: C workers each send the next GET as soon as the last answered, like wrk.
Nothing is printed per request: the client must not be the bottleneck."""

import asyncio
import contextlib
import time

from loadtester import interrupt
from loadtester.fleet import Fleet, Share
from loadtester.measure import Outcome, client_session, fetch, probe
from loadtester.output import Watch, console, print_summary
from loadtester.report import Run, summarize

ERROR_BACKOFF = 0.05  # seconds a worker pauses after a connection error instead of retrying at once


async def _share(share: Share, url: str, concurrency: int, duration: float, timeout: float) -> list[Outcome]:
    outcomes: list[Outcome] = []
    async with client_session(timeout) as session:
        with contextlib.suppress(asyncio.CancelledError):  # stopped (Ctrl-C): what came back so far
            started = await share.start()
            deadline = started + duration

            async def worker():
                while time.perf_counter() < deadline:
                    outcome = await fetch(session, url, started, live=share.live)
                    outcomes.append(outcome)
                    if outcome.error:
                        await asyncio.sleep(ERROR_BACKOFF)  # a refused connection must not spin the loop

            await asyncio.gather(*(worker() for _ in range(share.part(concurrency))))
    return outcomes


def run(url: str, path: str, concurrency: int, duration: float, timeout: float, quiet: bool = False,
        processes: int = 1) -> Run:
    interrupt.run(probe(url))
    processes = min(processes, concurrency)
    console.print(f"closed loop: {concurrency} workers on {url + path} for {duration:g} s from {processes} "
                  f"process{'es' * (processes > 1)}")
    with Fleet(processes) as fleet:
        with Watch(None, disable=quiet) as watch:
            results, start_at = fleet.run(_share, url + path, concurrency, duration, timeout, on_tick=watch.tick)
        outcomes = [outcome for part in results for outcome in part]
        cut_short = interrupt.requested()  # Ctrl-C: the run lasted until the last answer
        wall = max([0.0 if cut_short else duration, *(outcome.done_at for outcome in outcomes)])
        report = summarize(f"closed loop c={concurrency}", url + path, outcomes, wall, started_at=start_at,
                           processes=fleet.processes, client_cpu=(fleet.cpu, len(outcomes)))
    console.print(f"{report.requests} requests in {report.wall:.2f}s to {report.url}, {concurrency} workers "
                  f"in {report.processes} process{'es' * (report.processes > 1)}")
    if not quiet:
        print_summary(report)
    return Run([report], report.all_ok)
