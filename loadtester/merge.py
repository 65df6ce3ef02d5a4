"""`loadtest.py merge A.json B.json ...`: runs of one load taken apart, on several machines
each sending its share (`--rate R/N`), as one report, the way vegeta users merge the
results of one attack per host.

Requests, statuses and errors are summed; percentiles come from the shards' HDR histograms
added together (never from averaged percentiles); the rates are summed over the window all
shards sent in; the timeline's slices are matched on the wall clock. Shards of different
modes, or whose send windows overlap less than half of the shortest (taken at different
times), are refused in one line. The in-flight peak is the sum of the shards' peaks: an
upper bound, since they need not have peaked at once."""

import json
from pathlib import Path

from loadtester import plots
from loadtester.output import console, print_summary
from loadtester.report import TIMELINE_SLICE, Report, Run, decode, encode, figures

MERGEABLE = {"open": "open-loop (--rate)", "closed": "closed-loop (-c)"}
OVERLAP = 0.5


class CannotMerge(Exception):
    """Shards that do not make one load: a one-line reason, exit 2."""


def load(path: str) -> tuple[str, Report]:
    """A --json file's mode and its one report."""
    try:
        payload = json.loads(Path(path).read_text())
        mode, reports = payload["mode"], payload["reports"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CannotMerge(f"{path} is not a loadtest.py --json file ({type(error).__name__})") from None
    if mode not in MERGEABLE:
        raise CannotMerge(f"{path} is a {mode} run: merge takes {' or '.join(MERGEABLE.values())} runs")
    if len(reports) != 1 or not reports[0].get("histograms"):
        raise CannotMerge(f"{path} carries no histograms (written by an older loadtest.py?)")
    return mode, Report(**reports[0])


def merge(shards: dict[str, Report], mode: str) -> Report:
    paths, reports = list(shards), list(shards.values())
    starts = [report.started_at for report in reports]
    ends = [report.started_at + report.send_window for report in reports]
    common = min(ends) - max(starts)
    shortest = min(report.send_window for report in reports)
    if common < OVERLAP * shortest:
        first, last = paths[starts.index(min(starts))], paths[starts.index(max(starts))]
        raise CannotMerge(f"{first} and {last} were taken at different times: the shards sent together for "
                          f"{max(common, 0):.1f} s of {shortest:.1f} s")
    histograms = {}
    for kind in reports[0].histograms:
        histograms[kind] = decode(reports[0].histograms[kind])
        for report in reports[1:]:
            histograms[kind].add(decode(report.histograms[kind]))
    began = min(starts)
    urls = sorted({report.url for report in reports})
    merged = Report(
        name=f"{len(reports)} shards merged", url=urls[0] if len(urls) == 1 else ", ".join(urls),
        requests=sum(report.requests for report in reports),
        wall=max(report.started_at + report.wall for report in reports) - began, ideal=None,
        statuses=summed(report.statuses for report in reports), errors=summed(report.errors for report in reports),
        error_codes=summed(report.error_codes for report in reports), latency=figures(histograms["service"]),
        requests_per_second=sum(report.requests_per_second for report in reports),
        concurrency=sum(report.concurrency for report in reports),
        in_flight_peak=sum(report.in_flight_peak for report in reports), started_at=max(starts), send_window=common,
        processes=sum(report.processes for report in reports),
        histograms={kind: encode(made) for kind, made in histograms.items()},
        client_behind=any(report.client_behind for report in reports),
        client_cpu=summed(report.client_cpu for report in reports),
    )
    if mode == "open":
        merged.rate_asked = sum(report.rate_asked for report in reports)
        merged.rate_achieved = sum(report.rate_achieved for report in reports)
        merged.late_sends = sum(report.late_sends for report in reports)
        merged.lateness = figures(histograms["late"])
        merged.latency_corrected = figures(histograms["corrected"])
        merged.latency_service = merged.latency
        merged.timeline = merged_timeline(reports, began)
    return merged


def summed(counts) -> dict:
    total: dict = {}
    for one in counts:
        for key, count in one.items():
            total[_key(key)] = total.get(_key(key), 0) + count
    return dict(sorted(total.items(), key=lambda item: str(item[0])))


def _key(key):
    """A status read back from JSON is text: 200 again, so that shards' statuses add up."""
    return int(key) if isinstance(key, str) and key.isdigit() else key


def merged_timeline(reports: list[Report], began: float) -> list[list[float]]:
    slices: dict[int, list[float]] = {}
    for report in reports:
        for at, count, corrected, service in report.timeline:
            row = slices.setdefault(round((report.started_at + at - began) / TIMELINE_SLICE), [0, 0.0, 0.0])
            row[0] += count
            row[1], row[2] = max(row[1], corrected), max(row[2], service)
    return [[index * TIMELINE_SLICE, *row] for index, row in sorted(slices.items())]


def run(paths: list[str], plot: str | None = None) -> Run:
    loaded = {path: load(path) for path in paths}
    modes = {mode for mode, _ in loaded.values()}
    if len(modes) > 1:
        named = ", ".join(f"{path} ({mode})" for path, (mode, _) in loaded.items())
        raise CannotMerge(f"shards of different modes: {named}")
    mode = modes.pop()
    merged = merge({path: report for path, (_, report) in loaded.items()}, mode)
    console.print(f"{merged.requests} requests in {len(paths)} shards to {merged.url}, {MERGEABLE[mode]}, "
                  f"sent together for {merged.send_window:.2f} s")
    print_summary(merged)
    if plot:
        plots.open_loop(merged, plot)
    return Run([merged], merged.all_ok, {"mode": mode, "url": merged.url, "shards": paths})
