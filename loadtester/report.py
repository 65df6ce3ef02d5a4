"""The one summary of every mode, and what makes reports mergeable: each carries its HDR
histograms, encoded as HdrHistogram's own compressed base64 (the form wrk2's and vegeta's
tools exchange), a timeline of fixed slices, its start on the wall clock and its send window."""

import itertools
from collections import Counter
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

from loadtester.measure import LATE_SEND, Outcome

PERCENTILES = {"p50": 50, "p90": 90, "p99": 99, "p999": 99.9}
# Values are microseconds, from 1 µs to 1 h, to 3 significant digits.
LOWEST, HIGHEST, DIGITS = 1, 3_600_000_000, 3
TIMELINE_SLICE = 0.25  # seconds of intended send time per point of the open loop's timeline


def histogram(values=()) -> HdrHistogram:
    made = HdrHistogram(LOWEST, HIGHEST, DIGITS)
    for value in values:
        made.record_value(min(HIGHEST, max(LOWEST, round(value * 1e6))))
    return made


def encode(made: HdrHistogram) -> str:
    return made.encode().decode()


def decode(text: str) -> HdrHistogram:
    """A histogram from `encode`, in a fresh one of the project's range (decode alone keeps the sender's)."""
    merged = histogram()
    merged.add(HdrHistogram.decode(text.encode()))
    return merged


def figures(made: HdrHistogram) -> dict:
    """min, p50, p90, p99, p99.9 and max in seconds; {} for an empty histogram."""
    if not made.get_total_count():
        return {}
    values = {"min": made.get_min_value()}
    values |= {name: made.get_value_at_percentile(at) for name, at in PERCENTILES.items()}
    values["max"] = made.get_max_value()
    return {name: microseconds / 1e6 for name, microseconds in values.items()}


def percentiles(values: list[float]) -> dict:
    return figures(histogram(values))


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
    lateness: dict = field(default_factory=dict)  # how late the sends left: p50 ... max, seconds
    latency_corrected: dict = field(default_factory=dict)
    latency_service: dict = field(default_factory=dict)
    client_behind: bool = False  # the open loop stopped sending: this client could not keep the rate
    in_flight_peak: int = 0  # the most requests sent and not yet answered at one moment
    started_at: float = 0.0  # the run's start, seconds since the epoch (for merging shards)
    send_window: float = 0.0  # seconds over which it sent
    processes: int = 1
    # What the client itself cost: CPU seconds (user + system) over its processes and the
    # requests they sent for it (a warm-up's included): {"seconds": 0.9, "requests": 5000}.
    client_cpu: dict = field(default_factory=dict)
    histograms: dict = field(default_factory=dict)  # "service" (and "corrected"): encode()d
    timeline: list = field(default_factory=list)  # open loop: [slice start s, sent, max corrected s, max service s]

    @property
    def all_ok(self) -> bool:
        return not self.errors and all(200 <= int(status) < 300 for status in self.statuses)

    @property
    def ok_requests(self) -> int:
        return sum(count for status, count in self.statuses.items() if 200 <= int(status) < 300)


def tally(values) -> dict:
    """Counts by value, in value order (statuses, error kinds, time slices)."""
    return dict(sorted(Counter(values).items()))


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


def in_flight_peak(outcomes: list[Outcome]) -> int:
    """The most requests sent and not yet answered at one moment, over every process's outcomes."""
    events = sorted(itertools.chain(((o.sent_at, 1) for o in outcomes), ((o.done_at, -1) for o in outcomes)))
    return max(itertools.accumulate(step for _, step in events), default=0)


def timeline(outcomes: list[Outcome]) -> list[list[float]]:
    """Per TIMELINE_SLICE of intended send time: [its start, requests, max corrected, max service]."""
    slices: dict[int, list[float]] = {}
    for outcome in outcomes:
        row = slices.setdefault(int(outcome.intended_at / TIMELINE_SLICE), [0, 0.0, 0.0])
        row[0] += 1
        row[1], row[2] = max(row[1], outcome.corrected), max(row[2], outcome.latency)
    return [[index * TIMELINE_SLICE, *row] for index, row in sorted(slices.items())]


def summarize(name: str, url: str, outcomes: list[Outcome], wall: float, seconds: float | None = None,
              rate: float | None = None, send_window: float | None = None, started_at: float = 0.0,
              processes: int = 1, client_cpu: tuple[float, int] | None = None) -> Report:
    """The one summary of every mode: `seconds` (the sleep) for a burst's waves and
    efficiency, `rate` and `send_window` for an open loop's schedule figures, `client_cpu`
    (CPU seconds, requests sent) for what the client cost."""
    service = histogram(outcome.latency for outcome in outcomes)
    done_times = sorted(outcome.done_at for outcome in outcomes)
    report = Report(
        name=name, url=url, requests=len(outcomes), wall=wall, ideal=seconds,
        statuses=tally(o.status for o in outcomes if o.status is not None),
        errors=tally(o.error for o in outcomes if o.error),
        error_codes=tally(o.code for o in outcomes if o.code),
        latency=figures(service),
        requests_per_second=len(outcomes) / wall if wall else 0.0,
        concurrency=sum(outcome.latency for outcome in outcomes) / wall if wall else 0.0,
        in_flight_peak=in_flight_peak(outcomes), started_at=started_at,
        send_window=send_window if send_window is not None else wall, processes=processes,
        histograms={"service": encode(service)},
    )
    if client_cpu is not None:
        report.client_cpu = {"seconds": client_cpu[0], "requests": client_cpu[1]}
    if seconds is not None:
        gap = wave_gap(seconds)
        report.efficiency = min(seconds / wall, 1.0) if wall and seconds else None
        report.waves = find_waves(done_times, gap)
        report.ok_waves = find_waves([o.done_at for o in outcomes if o.ok], gap)
        report.done_times = done_times
    if rate is not None:
        corrected = histogram(outcome.corrected for outcome in outcomes)
        report.rate_asked = rate
        report.rate_achieved = len(outcomes) / send_window if send_window else 0.0
        late = histogram(outcome.late for outcome in outcomes)
        report.late_sends = sum(outcome.late > LATE_SEND for outcome in outcomes)
        report.lateness = figures(late)
        report.latency_corrected = figures(corrected)
        report.latency_service = report.latency
        report.histograms["corrected"] = encode(corrected)
        report.histograms["late"] = encode(late)
        report.timeline = timeline(outcomes)
    return report


@dataclass
class Run:
    """What a mode's `run(...)` returns: its reports, whether every answer was a 2xx (exit 0),
    and the mode's own --json keys (the matrix's rows, the search's capacity and steps)."""

    reports: list[Report]
    ok: bool
    extra: dict = field(default_factory=dict)
