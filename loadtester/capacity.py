"""The capacity search: the highest open-loop rate whose corrected latency meets an SLO.

Steps double from the start rate while they meet it, then bisect between the highest rate
that met it and the lowest that missed. What keeps five searches in a row together:
- every step first sends for `warmup` seconds that do not count (new connections, the
  server's pool growing to the new concurrency);
- a step that misses, or that meets near the boundary (its percentile or its errors within
  a factor of two of the allowance), runs again until two runs agree, and its figure is
  their median, so that one noisy run cannot move the bounds. Every miss is confirmed
  because a shared machine's noise only adds latency: a pause of the server's host or a
  neighbour's burst of CPU can make one run miss far from the knee, and nothing can make a
  run meet by chance far past it;
- the answer is printed with the runs' spread at the two rates that decided it.
Whose miss it was: "the client cannot keep R/s" only when this client's sends were late
while the server still answered within the SLO (service latency, from the actual send);
latency or errors that explode with requests piling up in flight are the server's.
"""

import asyncio
import contextlib
import dataclasses
import re
import statistics
import time
from dataclasses import dataclass, field

import click

from loadtester import interrupt, openloop, plots
from loadtester.fleet import Fleet
from loadtester.measure import Outcome, client_session, fetch, probe
from loadtester.output import console, ms
from loadtester.report import PERCENTILES, Report, Run

SLO_FORMS = "p50, p90, p99 or p999 = a number and ms or s, e.g. p99=50ms or p999=1.5s"
ERRORS_ALLOWED = 0.01  # a step with this share of non-2xx answers or client errors misses
LATE_ALLOWED = 0.01  # ... and one with this share of late sends says nothing of the server
# A send counts as late for a step's verdict past this or a fifth of the SLO, whichever is less:
# asyncio's timers on a busy machine leave a few ms behind, which the corrected latency counts.
STEP_LATE = 0.010
GIVE_UP_BEHIND = 0.25  # seconds behind schedule after which a step stops: the client cannot keep it
CLOSE_ENOUGH = 0.1  # the bisection stops when the gap between a met and a missed rate is this share
# A run is near the boundary when its percentile is within this factor of the SLO, or the share
# of its answers slower than the SLO (or of its errors) within this factor of the share allowed.
NEAR = 2.0
MOST_RUNS = 3  # a step that misses or meets near the boundary runs until two runs agree: at most three
STEP_SECONDS = 5.0  # -d of a step when not given
# Before each run, the server must answer this many GETs in a row within the SLO (for at
# most SETTLE_SECONDS): a step past the knee leaves requests queued in the server after its
# clients gave up, and the next step would otherwise start on that backlog.
SETTLE_ANSWERS = 3
SETTLE_SECONDS = 10.0
WARMUP_SECONDS = 1.0  # --warmup of a step when not given


def parse_slo(text: str) -> tuple[str, float]:
    """'p99=50ms' -> ('p99', 0.05); anything else is a usage error naming the accepted forms."""
    match = re.fullmatch(r"(p50|p90|p99|p999)=(\d+(?:\.\d+)?)(ms|s)", text.strip())
    if not match or float(match.group(2)) <= 0:
        raise click.BadParameter(f"{text!r} is not an SLO: use {SLO_FORMS}")
    return match.group(1), float(match.group(2)) / (1000 if match.group(3) == "ms" else 1)


def step_timeout(timeout: float, slo: float) -> float:
    """A request slower than ten times the SLO has missed it anyway: no step waits longer."""
    return min(timeout, max(1.0, 10 * slo))


@dataclass
class Step:
    """One rate of the search, its verdict, and the figures of the run(s) behind it."""

    rate: float
    achieved: float
    latency: float  # corrected, at the SLO's percentile (the median of the runs)
    service: float  # from the actual send, at the same percentile
    errors: float  # share of non-2xx answers and client errors
    late: float  # share of sends more than min(STEP_LATE, SLO / 5) behind schedule
    slower: float  # share of answers slower than the SLO (corrected); p99 allows 1 %
    client_behind: bool  # late sends while the server answered within the SLO
    verdict: str
    in_flight: int = 0  # the most requests in flight at one moment
    error_kinds: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)  # each run's corrected percentile

    @property
    def met(self) -> bool:
        return self.verdict == "meets"


def judge(report: Report, outcomes: list[Outcome], percentile: str, slo: float) -> Step:
    """One run's verdict: errors first, then whose lateness it was, then the SLO."""
    errors = 1 - report.ok_requests / report.requests if report.requests else 1.0
    late_bound = min(STEP_LATE, slo / 5)
    late = sum(outcome.late > late_bound for outcome in outcomes) / len(outcomes) if outcomes else 1.0
    slower = sum(outcome.corrected > slo for outcome in outcomes) / len(outcomes) if outcomes else 1.0
    corrected = report.latency_corrected.get(percentile, float("inf"))
    service = report.latency_service.get(percentile, float("inf"))
    # Late sends void a verdict only where they could have made it: a run that meets the SLO
    # with its lateness counted in (corrected latency) meets, unless the client fell behind
    # for good and the server saw less than the rate asked.
    client_late = report.client_behind or (late >= LATE_ALLOWED and corrected > slo)
    # Fell behind before a counted send (in the warm-up): nothing says the server was slow.
    nothing_counted = report.client_behind and not report.requests
    if nothing_counted:
        errors = 0.0
    client_behind = client_late and errors < ERRORS_ALLOWED and (service <= slo or nothing_counted)
    if errors >= ERRORS_ALLOWED:
        verdict = f"errors {errors:.1%}"
    elif client_behind:
        verdict = "client behind"
    elif corrected > slo or report.client_behind:
        verdict = f"misses {percentile}"
    else:
        verdict = "meets"
    kinds = dict(report.errors) | {str(status): count for status, count in report.statuses.items()
                                   if not 200 <= int(status) < 300}
    return Step(report.rate_asked or 0.0, report.rate_achieved or 0.0, corrected, service, errors, late, slower,
                client_behind, verdict, report.in_flight_peak, kinds, [corrected])


def near(step: Step, percentile: str, slo: float) -> bool:
    """Whether one run may have landed on the wrong side of the SLO by chance."""
    if step.client_behind:
        return False
    allowed = 1 - PERCENTILES[percentile] / 100

    def close(value: float, bound: float) -> bool:
        return bound / NEAR <= value <= bound * NEAR

    return close(step.latency, slo) or close(step.slower, allowed) or close(step.errors, ERRORS_ALLOWED)


def combine(runs: list[Step]) -> Step:
    """Runs of one rate as one step: the majority's verdict, the median run's figures."""
    met = sum(run.met for run in runs)
    majority = [run for run in runs if run.met == (met * 2 > len(runs))]
    middle = sorted(majority, key=lambda run: run.latency)[len(majority) // 2]
    return dataclasses.replace(middle, latency=statistics.median(run.latency for run in majority),
                               runs=[run.latency for run in runs])


def agreed(runs: list[Step]) -> bool:
    met = sum(run.met for run in runs)
    return met >= 2 or len(runs) - met >= 2


def next_rate(steps: list[Step], max_rate: float) -> float | None:
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


async def settle(url: str, slo: float) -> bool:
    """Wait until SETTLE_ANSWERS GETs in a row come back 2xx within `slo`, one at a time;
    False when SETTLE_SECONDS passed first."""
    began, in_a_row = time.perf_counter(), 0
    async with client_session(max(slo, 1.0)) as session:
        while in_a_row < SETTLE_ANSWERS:
            if time.perf_counter() - began > SETTLE_SECONDS:
                return False
            outcome = await fetch(session, url, began)
            in_a_row = in_a_row + 1 if outcome.ok and outcome.latency <= slo else 0
            if not in_a_row:
                await asyncio.sleep(0.1)
    return True


class Search:
    """The search's state, kept as it goes so that a Ctrl-C keeps what was found."""

    def __init__(self, url: str, percentile: str, slo: float, duration: float, warmup: float, timeout: float):
        self.url, self.percentile, self.slo = url, percentile, slo
        self.duration, self.warmup, self.timeout = duration, warmup, step_timeout(timeout, slo)
        self.steps: list[Step] = []
        self.reports: list[Report] = []

    def step(self, fleet: Fleet, rate: float, room) -> Step | None:
        """One rate: a run, once more when its sends were late without the client falling
        behind for good (a pause of this process), and more near the boundary; None when
        the time ran out before a run."""
        runs: list[Step] = []
        retried = False
        while room() and (not runs or self.unsettled(runs)):
            interrupt.run(settle(self.url, self.slo))
            report, outcomes = openloop.measure(fleet, self.url, rate, self.duration, self.timeout, self.warmup,
                                                GIVE_UP_BEHIND)
            if interrupt.requested():  # a run cut short is no verdict: the steps before it stand
                break
            run = judge(report, outcomes, self.percentile, self.slo)
            if run.client_behind and not report.client_behind and not retried:
                retried = True
                continue
            self.reports.append(report)
            runs.append(run)
        return combine(runs) if runs else None

    def unsettled(self, runs: list[Step]) -> bool:
        """A rate whose first run missed, or met near the boundary, runs until two runs agree
        (at most MOST_RUNS). A client that fell behind is not the server's miss: not repeated."""
        first = runs[0]
        doubtful = (not first.met and not first.client_behind) or near(first, self.percentile, self.slo)
        return doubtful and not agreed(runs) and len(runs) < MOST_RUNS

    def run(self, fleet: Fleet, start: float, max_rate: float, max_seconds: float, on_step) -> None:
        began, rate = time.monotonic(), min(start, max_rate)

        def room() -> bool:
            return time.monotonic() - began + self.warmup + self.duration + self.timeout <= max_seconds

        while rate is not None and not interrupt.requested() and (step := self.step(fleet, rate, room)) is not None:
            self.steps.append(step)
            on_step(step)
            rate = next_rate(self.steps, max_rate)

    def answer(self) -> tuple[Step | None, str]:
        """The highest rate that met the SLO, and the line that says it with the spread of
        the runs at the two rates that decided it (or why there is no answer)."""
        met = [step for step in self.steps if step.met]
        best = max(met, key=lambda step: step.rate) if met else None
        behind = next((step for step in self.steps if step.client_behind), None)
        goal = f"{self.percentile} <= {ms(self.slo)}"
        if best is None:
            if behind:
                return None, f"no answer: the client cannot keep {behind.rate:,.0f}/s on this machine"
            if not self.steps:
                return None, "no step ran"
            return None, f"no answer: even {self.steps[0].rate:,.0f}/s misses {goal} ({self.miss(self.steps[0])})"
        line = f"capacity: {best.rate:,.0f} req/s meets {goal} ({self.percentile} {ms(best.latency)}{spread(best)})"
        above = [step for step in self.steps if not step.met and not step.client_behind and step.rate > best.rate]
        if above:
            decided = min(above, key=lambda step: step.rate)
            line += f"; {decided.rate:,.0f}/s misses it ({self.miss(decided)})"
        if behind:
            line += (f"; the client cannot keep {behind.rate:,.0f}/s on this machine, so the server's own limit "
                     "may be higher")
        return best, line

    def miss(self, step: Step) -> str:
        """Why a step missed, in the server's terms: its latency, its errors, the pile-up."""
        said = f"{self.percentile} {ms(step.latency)}{spread(step)}"
        if step.errors >= ERRORS_ALLOWED:
            kinds = ", ".join(f"{kind} x {count}" for kind, count in step.error_kinds.items())
            said = f"errors {step.errors:.1%}: {kinds}"
        if step.late >= LATE_ALLOWED or step.errors >= ERRORS_ALLOWED:
            said += (f"; the server's miss: {self.percentile} of its answers {ms(step.service)}, up to "
                     f"{step.in_flight:,} requests in flight")
        return said


def spread(step: Step) -> str:
    if len(step.runs) < 2:
        return ""
    return f", {len(step.runs)} runs {ms(min(step.runs))} to {ms(max(step.runs))}"


def print_header(search: Search, start: float, max_rate: float, max_seconds: float, processes: int) -> None:
    console.print(f"searching the highest rate on {search.url} with {search.percentile} <= {ms(search.slo)} "
                  f"(corrected, late sends counted), errors under {ERRORS_ALLOWED:.0%}: steps of {search.warmup:g} s "
                  f"warm-up + {search.duration:g} s from {start:g}/s, doubling then bisecting, never above "
                  f"{max_rate:g}/s, from {processes} process{'es' * (processes > 1)}; a missed step, or one "
                  f"near the SLO, runs until two runs agree; requests timed out after {search.timeout:g} s; "
                  f"done within "
                  f"{max_seconds:g} s")
    console.print(f"  {'asked/s':>9} {'achieved':>9}  {search.percentile + ' corr.':>10}  {'service':>10}  "
                  f"{'errors':>6}  {'late':>6}  {'in flight':>9}  runs  verdict")


def print_step(step: Step) -> None:
    colour = "green" if step.met else "red"
    console.print(f"  {step.rate:>9,.0f} {step.achieved:>9,.0f}  {ms(step.latency):>10}  {ms(step.service):>10}  "
                  f"{step.errors:>6.1%}  {step.late:>6.1%}  {step.in_flight:>9,}  {len(step.runs):>4}  "
                  f"[{colour}]{step.verdict}[/]")


def run(url: str, path: str, slo: str, duration: float | None, timeout: float, start_rate: float, max_rate: float,
        max_seconds: float, warmup: float | None = None, plot: str | None = None, processes: int = 1) -> Run:
    """--find-capacity: the search with its table, the answer, the picture."""
    percentile, slo_seconds = parse_slo(slo)
    search = Search(url + path, percentile, slo_seconds, duration or STEP_SECONDS,
                    WARMUP_SECONDS if warmup is None else warmup, timeout)
    interrupt.run(probe(url))
    print_header(search, start_rate, max_rate, max_seconds, processes)
    with contextlib.suppress(interrupt.Interrupted), Fleet(processes) as fleet:  # Ctrl-C: the steps so far
        search.run(fleet, start_rate, max_rate, max_seconds, print_step)
    best, line = search.answer()
    console.print(f"[bold]{line}[/]")
    if plot:
        plots.capacity(search.steps, best, percentile, slo_seconds, search.url, plot)
    found = None
    if best:
        found = {"rate": best.rate, "slo": slo_seconds, "percentile": percentile, "latency": best.latency,
                 "runs": best.runs, "line": line}
    return Run(search.reports, best is not None, {"capacity": found, "steps": search.steps})
