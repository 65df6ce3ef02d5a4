"""`make bench-client` (python -m bench.client): the load tester at the top end, written to
BENCHMARKS.md section 7.

1. The highest rate each open-loop client keeps on schedule, the runs alternating per rate:
   `loadtest.py --rate R` from 1 and from 2 processes (on schedule: late sends under 1 %)
   and wrk2 `-t2 -c64 -R R` (on schedule: it achieved 99 % of R), against two servers: the
   raw floor (bench/floor_wsgi.py, 2 gevent workers, GET /todos?limit=5) and a static answer
   from HAProxy (a server that costs next to nothing: the clients' own limits). Beside each,
   the CPU each client spent a request and the cores the server used under wrk2: on one
   machine the client's CPU is the server's loss.
2. Five capacity searches in a row against one `gunicorn app:app -k gevent`
   (`--find-capacity --slo p99=50ms -d 10 /todos?limit=5`), then wrk2 at the rate found and
   a quarter above it: does a client no one here wrote put the knee in the same place?
   Steps of 10 s, as long as wrk2's measured part: over 3 s a server past its knee has not
   yet queued enough to miss, and the search answered higher than wrk2's 20 s runs.

wrk2 (Gil Tene's constant-rate fork of wrk) is not packaged: build it from its source
(`make` in a checkout of giltene/wrk2) and put it on PATH as `wrk2`, or name it with
BENCH_WRK2. Without it, its columns are skipped. Shorter: BENCH_CLIENT_SECONDS (5),
BENCH_CLIENT_RATES ("500,1000,1500,2000,2500,3000,4000"), BENCH_CLIENT_SEARCHES (5).
"""

import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import seed
from bench.suite import (
    FLOOR_APP,
    LOG,
    ROOT,
    TOOLS,
    cpu_by_pid,
    cpu_used,
    libpq_dsn,
    postgres_processes,
    publish,
    server,
    server_processes,
)
from greenflask import embedded, servers
from greenflask.settings import Settings
from loadtester import capacity

SECTION = "## 7. The load tester at the top end"
PATH = "/todos?limit=5"
SLO = "p99=50ms"
WRK2_CHECK_SECONDS = 20
SEARCH_STEP_SECONDS = 10
SEARCH_MAX_SECONDS = 360  # 10 s steps, each miss confirmed: the default 180 s would end a search early
TIMEOUT = 2  # seconds per request: a run past the server's knee holds fewer sockets


def wrk2_path() -> str | None:
    return TOOLS.bench_wrk2 or shutil.which("wrk2")


def loadtest(*args: str) -> dict:
    """`python loadtest.py ARGS --json`, its output unread: its JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        done = subprocess.run([sys.executable, "loadtest.py", *args, "--json", out.name], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        if not Path(out.name).stat().st_size:
            raise SystemExit(f"loadtest.py {' '.join(args)} wrote no JSON: {done.stderr.strip()}")
        return json.loads(Path(out.name).read_text())


def open_loop(url: str, rate: int, processes: int) -> dict:
    report = loadtest("--rate", str(rate), "-d", str(TOOLS.bench_client_seconds), "--processes", str(processes),
                      "--timeout", str(TIMEOUT), "--quiet", "--url", url, PATH)["reports"][0]
    late = report["late_sends"] / max(report["requests"], 1)
    late_p99 = report["lateness"]["p99"]
    cost = report["client_cpu"]
    return {"late": late, "late_p99": late_p99, "achieved": report["rate_achieved"],
            "p99": report["latency_corrected"]["p99"], "kept": late < 0.01,
            "cpu": cost["seconds"] / max(cost["requests"], 1),
            "kept_search": late_p99 <= capacity.STEP_LATE and report["rate_achieved"] >= 0.99 * rate}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wrk2(url: str, rate: float, seconds: float, server_processes=None) -> dict:
    """wrk2 -t2 -c64 -R RATE: its achieved rate, its (corrected) p99, the CPU it spent a
    request, and the server's cores meanwhile (`server_processes()`: its processes)."""
    before, server_before = children_cpu(), cpu_by_pid(server_processes()) if server_processes else {}
    out = subprocess.run([wrk2_path(), "-t2", "-c64", f"-d{seconds:g}s", f"-R{rate:g}", "--latency", url + PATH],
                         capture_output=True, text=True, check=False).stdout
    spent = children_cpu() - before
    server_cores = cpu_used(server_before, cpu_by_pid(server_processes())) / seconds if server_processes else None
    achieved = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    value, unit = re.search(r"99\.000%\s+([\d.]+)(us|ms|s|m)\b", out).groups()
    p99 = float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]
    return {"achieved": achieved, "p99": p99, "kept": achieved >= 0.99 * rate,
            "cpu": spent / max(achieved * seconds, 1), "server_cores": server_cores}


@contextmanager
def static_answer():
    """HAProxy answering every request itself: the cheapest server this machine has."""
    port = servers.free_port()
    config = Path(tempfile.mkdtemp()) / "static.cfg"
    config.write_text(f"""global
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend static
    bind 127.0.0.1:{port}
    http-request return status 200 content-type application/json string "{{\\"ok\\":true}}"
""")
    process = servers.spawn([shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(config)], LOG)
    try:
        servers.wait_until(lambda: servers.port_open("127.0.0.1", port), "haproxy")
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        servers.stop(process.pid)
        shutil.rmtree(config.parent)


def schedule_rows(url: str, server_processes) -> list[dict]:
    rows = []
    for rate in TOOLS.bench_client_rates:
        row = {"rate": rate, "p1": open_loop(url, rate, 1), "p2": open_loop(url, rate, 2)}
        if wrk2_path():
            # wrk2 calibrates for its first 10 s and reports the rest: shorter runs understate it.
            row["wrk2"] = wrk2(url, rate, max(TOOLS.bench_client_seconds, WRK2_CHECK_SECONDS), server_processes)
        print(f"  {rate}/s: {row}", flush=True)
        rows.append(row)
    return rows


def searches(url: str) -> dict:
    found = []
    with server(["-k", "gevent"], {"DATABASE_URL": url}) as (base_url, _):
        for index in range(TOOLS.bench_client_searches):
            search = loadtest("--find-capacity", "--slo", SLO, "-d", str(SEARCH_STEP_SECONDS), "--max-seconds",
                              str(SEARCH_MAX_SECONDS), "--url", base_url, PATH)
            capacity = search["capacity"] or {}
            print(f"  search {index + 1}: {capacity.get('line', 'no answer')}", flush=True)
            found.append({"rate": capacity.get("rate"), "line": capacity.get("line", "no answer"),
                          "steps": len(search["steps"]), "runs": len(search["reports"])})
        rates = [row["rate"] for row in found if row["rate"]]
        knee = sorted(rates)[len(rates) // 2] if rates else None
        # wrk2 counts its first 10 s as calibration and then starts its histograms anew: 20 s runs.
        checks = [(rate, wrk2(base_url, rate, WRK2_CHECK_SECONDS)) for rate in (knee, round(knee * 1.25))] \
            if knee and wrk2_path() else []
    return {"searches": found, "knee": knee, "wrk2": checks}


def highest(rows: list[dict], key: str, rule: str = "kept") -> int | None:
    kept = [row["rate"] for row in rows if key in row and row[key][rule]]
    return max(kept) if kept else None


def ratio(value: int | None, wrk2_rate: int | None) -> str:
    return f" ({value / wrk2_rate:.2f} of wrk2's)" if value and wrk2_rate else ""


def render(by_server: dict[str, list[dict]], search: dict) -> str:
    seconds = TOOLS.bench_client_seconds
    lines = [SECTION, "", f"Made by `python -m bench.client` on {time.strftime('%Y-%m-%d')}. Open loop, {seconds:g} s "
             f"per run (wrk2 {max(seconds, WRK2_CHECK_SECONDS):g} s: its first 10 s are calibration), the clients "
             "alternating per rate; wrk2 on schedule = it achieved 99 % of the rate asked. Cells: the "
             "share of sends more than 1 ms late and the 99th percentile of how late they left, or wrk2's "
             "achieved rate; then the corrected p99; then the CPU the client spent a request (loadtest.py: "
             "its processes' own; wrk2: the whole command) and, beside wrk2, the cores the server used meanwhile "
             "(the floor's: its workers and PostgreSQL).", ""]
    for name, rows in by_server.items():
        lines += [f"### {name}", "", "| rate | loadtest.py, 1 process | loadtest.py, 2 processes | wrk2 -t2 -c64 |",
                  "|---|---|---|---|"]
        for row in rows:
            cells = [f"{row[key]['late']:.1%} late, p99 {row[key]['late_p99'] * 1000:.1f} ms late; "
                     f"{row[key]['p99'] * 1000:.1f} ms; {row[key]['cpu'] * 1e6:.0f} µs" for key in ("p1", "p2")]
            if "wrk2" in row:
                shown = row["wrk2"]
                cells.append(f"{shown['achieved']:,.0f}/s, {shown['p99'] * 1000:.1f} ms; {shown['cpu'] * 1e6:.0f} µs; "
                             f"server {shown['server_cores']:.2f} cores")
            else:
                cells.append("no wrk2")
            lines.append(f"| {row['rate']:,} | " + " | ".join(cells) + " |")
        best = {key: highest(rows, key) for key in ("p1", "p2", "wrk2")}
        by_search = {key: highest(rows, key, "kept_search") for key in ("p1", "p2")}
        shown = {key: f"{value:,}/s" if value else "none" for key, value in {**best, **{
            f"{key}s": value for key, value in by_search.items()}}.items()}

        lines += ["", f"Highest rate on schedule, under 1 % of sends more than 1 ms late: 1 process {shown['p1']}, "
                  f"2 processes {shown['p2']}{ratio(best['p2'], best['wrk2'])}; under 1 % more than "
                  f"{capacity.STEP_LATE * 1000:.0f} ms late (the capacity search's rule) and 99 % of the rate "
                  f"achieved: 1 process {shown['p1s']}, 2 processes {shown['p2s']}"
                  f"{ratio(by_search['p2'], best['wrk2'])}; "
                  f"wrk2 {shown['wrk2']}.", ""]
    lines += ["### Five searches in a row", "",
              f"`loadtest.py --find-capacity --slo {SLO} -d {SEARCH_STEP_SECONDS} --max-seconds {SEARCH_MAX_SECONDS} "
              f"{PATH}` against one "
              "`gunicorn app:app -k gevent`:", "",
              "| search | answer | steps | runs |", "|---|---|---|---|"]
    for index, row in enumerate(search["searches"], 1):
        lines.append(f"| {index} | {row['line']} | {row['steps']} | {row['runs']} |")
    rates = [row["rate"] for row in search["searches"] if row["rate"]]
    if rates:
        middle = (max(rates) + min(rates)) / 2
        lines += ["", f"Answers {min(rates):,.0f} to {max(rates):,.0f} req/s: {middle:,.0f} ± "
                  f"{(max(rates) - min(rates)) / 2 / middle:.0%}."]
    for rate, figures in search["wrk2"]:
        lines.append(f"wrk2 -t2 -c64 -R{rate:g} -d{WRK2_CHECK_SECONDS}s on the same server: achieved "
                     f"{figures['achieved']:,.0f}/s, p99 {figures['p99'] * 1000:.1f} ms.")
    return "\n".join(lines) + "\n"


def main() -> None:
    url = embedded.database_url(Settings.from_env())
    seed.seed(embedded.script_engine(url), reset=True)
    if not wrk2_path():
        print("no wrk2 (BENCH_WRK2 or wrk2 on PATH): its columns are skipped", flush=True)
    by_server = {}
    print("1/3 the floor ...", flush=True)
    with server(["-k", "gevent", "-w", "2"], {"BENCH_DSN": libpq_dsn(url)}, FLOOR_APP, "/todos") as (base_url, pid):
        by_server["Against the raw floor (2 gevent workers, GET /todos?limit=5)"] = schedule_rows(
            base_url, lambda: [*server_processes(pid), *postgres_processes()])
    print("2/3 a static answer ...", flush=True)
    with static_answer() as (base_url, pid):
        by_server["Against a static answer (HAProxy `http-request return`): the clients' own limit"] = \
            schedule_rows(base_url, lambda: server_processes(pid))
    print("3/3 five searches ...", flush=True)
    search = searches(url)
    publish(SECTION, render(by_server, search))


if __name__ == "__main__":
    main()
