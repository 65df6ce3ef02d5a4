"""What the load tester prints: the original client's lines, each report's summary, the
burst's timeline, the live line, and the one way to write --json."""

import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loadtester.measure import LATE_SEND, Outcome
from loadtester.report import Report, tally

console = Console(highlight=False, soft_wrap=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"


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
    if report.client_cpu.get("requests"):
        print_client_cost(report)
    if report.rate_asked is not None:
        print_schedule(report)
        return
    if report.latency:
        shown = "  ".join(f"{key} {report.latency[key]:.3f}" for key in ("min", "p50", "p90", "p99", "max"))
        console.print(f"  [bold]latency[/]   {shown} s")
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


def print_client_cost(report: Report) -> None:
    """What the client cost: a client that spends most of a core per process is near its own
    limit, and on the server's machine it takes that CPU from the server (BENCHMARKS.md 7)."""
    seconds, requests = report.client_cpu["seconds"], report.client_cpu["requests"]
    console.print(f"  [bold]client[/]    {seconds / requests * 1e6:.0f} µs of CPU a request, {seconds:.2f} s over "
                  f"{report.processes} process{'es' * (report.processes > 1)}")


def print_schedule(report: Report) -> None:
    """The open loop's own lines: the schedule kept or not, and latency both ways."""
    late_share = report.late_sends / report.requests if report.requests else 0.0
    colour = "red" if late_share >= 0.01 else "green"
    console.print(f"  [bold]rate[/]      asked {report.rate_asked:.1f}/s, achieved {report.rate_achieved:.1f}/s"
                  f" from {report.processes} process{'es' * (report.processes > 1)};"
                  f" [{colour}]late sends (> {LATE_SEND * 1000:.0f} ms behind schedule) {report.late_sends}"
                  f" ({late_share:.1%})[/], p99 {report.lateness.get('p99', 0) * 1000:.1f} ms late;"
                  f" in flight at most {report.in_flight_peak}")
    for label, shown in (("corrected", report.latency_corrected), ("service", report.latency_service)):
        if shown:
            text = "  ".join(f"{key} {shown[key]:.4f}" for key in ("p50", "p90", "p99", "p999", "max"))
            console.print(f"  [bold]{label:<9}[/] {text} s")
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


def live_line(totals: dict, count: int | None) -> str:
    """The open and closed loops' line while they run, from the fleet's counters."""
    of = f"/{count}" if count else ""
    in_flight = totals["sent"] - totals["answered"]
    return (f"sent {totals['sent']}{of}   in flight {in_flight}   answered {totals['answered']}   "
            f"late {totals['late']}   errors {totals['errors']}")


class Watch:
    """A transient live display fed by the fleet's counters (`tick`): a bar of a burst's
    answers, or a loop's line."""

    def __init__(self, count: int | None, bar: bool = False, disable: bool = False):
        self.count, self.bar = count, bar
        if bar:
            columns = (*Progress.get_default_columns()[:2], BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        else:
            columns = (TextColumn("{task.description}"),)
        self.shown = Progress(*columns, console=console, transient=True, disable=disable)
        self.task = self.shown.add_task("responses" if bar else "", total=count)

    def __enter__(self) -> "Watch":
        self.shown.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.shown.__exit__(*exc)

    def tick(self, totals: dict) -> None:
        if self.bar:
            self.shown.update(self.task, completed=totals["answered"])
        else:
            self.shown.update(self.task, description=live_line(totals, self.count))


def write_json(path: str, payload: dict) -> None:
    """The one way --json is written: dataclasses as dicts, anything else as its text."""
    def plain(value):
        return asdict(value) if is_dataclass(value) else str(value)

    Path(path).write_text(json.dumps(payload, indent=2, default=plain))
