"""What --plot draws (matplotlib, a test and bench tool: imported only when asked). Every
picture is drawn from reports alone, so a merged report draws as a single run does."""

from loadtester.output import console, ms
from loadtester.report import Report, decode

# Percentiles drawn on the curve: 0 % and then 1 - 10^(-k/20), up to 99.999 %.
CURVE = [0.0] + [100 * (1 - 10 ** (-k / 20)) for k in range(1, 101)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str, what: str) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    console.print(f"{what} plot written to {path}")


def bursts(reports: list[Report], path: str) -> None:
    """Each route's completions over time: a wave is a step."""
    plt = _pyplot()
    figure, axes = plt.subplots(len(reports), 1, figsize=(8, 3 * len(reports)), squeeze=False)
    for axis, report in zip(axes[:, 0], reports, strict=True):
        axis.scatter(report.done_times, range(1, len(report.done_times) + 1), s=6)
        axis.set_title(f"{report.name}: {report.requests} requests, waves {report.waves}")
        axis.set_xlabel("completed at (s)")
        axis.set_ylabel("request (by completion)")
    _save(figure, path, "timeline")


def open_loop(report: Report, path: str) -> None:
    """The slowest answer of each slice of intended send time, corrected and service; and
    the percentile curve on a log scale of 1 / (1 - percentile), the HdrHistogram plotter's picture."""
    plt = _pyplot()
    figure, (over_time, curve) = plt.subplots(2, 1, figsize=(9, 7))
    if report.timeline:
        at = [row[0] for row in report.timeline]
        for label, column in (("corrected", 2), ("service", 3)):
            over_time.plot(at, [row[column] * 1000 for row in report.timeline], label=f"{label}, slowest")
    for label, key in (("corrected", "corrected"), ("service", "service")):
        if key not in report.histograms:
            continue
        made = decode(report.histograms[key])
        shown = [share for share in CURVE if share < 100 * (1 - 1 / max(made.get_total_count(), 2))]
        curve.plot([1 / (1 - share / 100) for share in shown],
                   [made.get_value_at_percentile(share) / 1000 for share in shown], label=label)
    over_time.set(title=f"{report.name} on {report.url}", xlabel="intended send time (s)", ylabel="latency (ms)",
                  yscale="log")
    curve.set(xscale="log", yscale="log", xlabel="percentile", ylabel="latency (ms)")
    ticks = [1, 10, 100, 1000, 10_000, 100_000]
    curve.set_xticks(ticks, [f"{100 - 100 / tick:g}%" for tick in ticks])
    for axis in (over_time, curve):
        if axis.lines:
            axis.legend()
        axis.grid(alpha=0.3)
    _save(figure, path, "latency")


def capacity(steps: list, best, percentile: str, slo: float, url: str, path: str) -> None:
    """Each step's rate against its corrected percentile (the range of its runs as a bar),
    the SLO line and the knee."""
    from matplotlib.ticker import ScalarFormatter

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(9, 5))
    for met, colour, label in ((True, "tab:green", "meets"), (False, "tab:red", "misses")):
        chosen = [step for step in steps if step.met is met and step.latency != float("inf")]
        low = [(step.latency - min(step.runs)) * 1000 for step in chosen]
        high = [(max(step.runs) - step.latency) * 1000 for step in chosen]
        axis.errorbar([step.rate for step in chosen], [step.latency * 1000 for step in chosen], yerr=[low, high],
                      fmt="o", color=colour, label=label, zorder=3)
    axis.axhline(slo * 1000, color="tab:gray", linestyle="--", label=f"SLO {percentile} <= {ms(slo)}")
    if best is not None:
        axis.axvline(best.rate, color="tab:blue", linestyle=":", label=f"knee: {best.rate:,.0f} req/s")
    axis.set(xscale="log", yscale="log", xlabel="rate asked (req/s)", ylabel=f"{percentile}, corrected (ms)",
             title=f"capacity search on {url}")
    for scale in (axis.xaxis, axis.yaxis):
        scale.set_major_formatter(ScalarFormatter())
    axis.legend()
    axis.grid(alpha=0.3)
    _save(figure, path, "capacity")
