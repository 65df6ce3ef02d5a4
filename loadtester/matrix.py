"""--matrix: the original README's experiment. Each of the three modes on a server of its
own, both sleep routes, one table beside the original's figures and the loop blocks each
server saw."""

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from greenflask import PROJECT_DIR, servers
from loadtester import burst, interrupt
from loadtester.output import console, describe_waves
from loadtester.report import Run

# The original README's figures, N=5, 5 s sleeps: (python, postgres, SUM TOTAL) per mode.
ORIGINAL = {"sync": (25.09, 25.05, 50.15), "gevent": (5.08, 25.06, 30.14), "gevent+green": (5.04, 5.03, 10.07)}
MODES = {
    # mode: (gunicorn worker args, PSYCOGREEN ("" = unset: auto), routes that run concurrently)
    "sync": ([], "", ()),
    "gevent": (["-k", "gevent"], "0", ("python",)),
    "gevent+green": (["-k", "gevent"], "1", ("python", "postgres")),
}


class MatrixSetupFailed(Exception):
    """--matrix could not seed the database or start a server: a one-line reason, exit 2."""


def ideal_for(mode: str, route: str, count: int, seconds: float) -> float:
    concurrent = route in MODES[mode][2]
    return seconds if concurrent else count * seconds


def run(count: int, seconds: float, timeout: float, log_path: Path) -> Run:
    """A row per mode and route, and its report."""
    _seed_database()
    rows, all_reports = [], []
    for mode, (worker_args, green, _) in MODES.items():
        if interrupt.requested():
            break
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
            try:
                reports = burst.run(base_url, count, seconds, list(burst.ROUTES), timeout, quiet=True).reports
            except interrupt.Interrupted:  # Ctrl-C before this mode's first request: the modes before it
                break
            time.sleep(0.3)  # the server reports a block once its loop runs again
            blocks_after, longest = loop_blocks(base_url)
        finally:
            servers.stop(process.pid)
        for index, report in enumerate(reports):
            original = ORIGINAL[mode][index] if (count, seconds) == (5, 5) else None
            rows.append({"mode": mode, "route": report.name, "observed": report.wall,
                         "ideal": ideal_for(mode, report.name, count, seconds), "original": original,
                         "waves": report.waves, "all_ok": report.all_ok,
                         "loop_blocks": blocks_after - blocks_before if worker_args else None,
                         "longest_block": longest})
        all_reports += reports
    if not rows:  # Ctrl-C before a row
        raise interrupt.Interrupted
    print_matrix(rows, count, seconds)
    return Run(all_reports, all(row["all_ok"] for row in rows), {"matrix": rows})


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
        observed, ideal = f"{row['observed']:.2f} s", f"{row['ideal']:.2f} s"
        table.add_row(row["mode"], row["route"], observed, ideal, original, describe_waves(row["waves"]), "")
    for mode in MODES:
        mode_rows = [row for row in rows if row["mode"] == mode]
        if not mode_rows:  # not reached (Ctrl-C)
            continue
        total = sum(row["observed"] for row in mode_rows)
        ideal = sum(row["ideal"] for row in mode_rows)
        original = ORIGINAL[mode][2] if mode_rows[0]["original"] is not None else None
        table.add_row(mode, "SUM TOTAL", f"{total:.2f} s", f"{ideal:.2f} s", f"{original:.2f} s" if original else "-",
                      "", describe_blocks(mode_rows[0]), style="bold")
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
