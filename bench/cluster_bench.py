"""`make cluster-bench`: deploy/cluster.py measured, written to BENCHMARKS.md's last section.

PostgreSQL is an embedded server of its own with max_connections = 100, a stock server's.

A. 4 hosts x 2 workers x the default pool (100) straight to PostgreSQL, then through
   PgBouncer: a burst of 400 one-second pg_sleeps, what users see.
B. GET /todos through HAProxy with 1, 2 and 3 hosts (1 worker each), through PgBouncer
   and straight; one host without HAProxy; a pool that connects per request (as NullPool).
   Machine CPU per request: on 2 cores every process here shares them, so CPU, not the
   number of hosts, is the ceiling.
C. N = 1,000 one-second pg_sleeps through PgBouncer's 80 server connections: waves.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.suite import ROOT, WRK_SECONDS, burst_report, publish, statuses_text, wrk
from deploy import apphosts
from deploy.runtime import program
from loadtester import output
from loadtester.report import Report

SECTION = "## 5. Past one machine"


class Cluster:
    """`python -m deploy.cluster up ...` on entering, `down` on leaving."""

    def __init__(self, env: dict, *args: str):
        self.env, self.args = env, args

    def __enter__(self) -> str:
        up = subprocess.run([sys.executable, "-m", "deploy.cluster", "up", *self.args], cwd=ROOT, env=self.env,
                            capture_output=True, text=True)
        if up.returncode != 0:  # a failed `up` has stopped what it started
            raise RuntimeError(up.stderr + up.stdout)
        return up.stdout.strip().splitlines()[-1]

    def __exit__(self, *_) -> None:
        subprocess.run([sys.executable, "-m", "deploy.cluster", "down"], cwd=ROOT, env=self.env, capture_output=True)


def machine_cpu_seconds() -> float:
    times = psutil.cpu_times()
    return times.user + times.system + getattr(times, "softirq", 0.0)


def wrk_with_machine_cpu(url: str) -> dict:
    before = machine_cpu_seconds()
    figures = wrk(url, seconds=WRK_SECONDS)
    figures["cpu_us"] = (machine_cpu_seconds() - before) * 1e6 / max(figures["requests"], 1)
    return figures


def first_host_url(env: dict) -> str:
    state = json.loads((Path(env["CLUSTER_DIR"]) / "state.json").read_text())
    return apphosts.url(state["hosts"][0])


def too_many_clients(env: dict) -> int:
    logs = Path(env["CLUSTER_DIR"]).glob("host*.log")
    return sum(len(re.findall("too many clients", log.read_text(errors="replace"))) for log in logs)


def max_connections_rows(env: dict) -> list[dict]:
    rows = []
    for label, args in (("straight to PostgreSQL", ["--direct"]), ("through PgBouncer, 80 server connections",
                                                                     ["--pgbouncer-pool", "80"])):
        with Cluster(env, "--hosts", "4", "--workers", "2", *args) as url:
            report = burst_report(url, "postgres", 400, 1.0)
            rows.append({"label": label, "report": report, "refused": too_many_clients(env)})
    return rows


def throughput_rows(env: dict) -> list[dict]:
    # (label, hosts when the row is one of the 1-2-3 hosts series, up's arguments, extra env, straight to host1)
    plans = [("1 host, no HAProxy", None, ["--hosts", "1"], {}, True),
             ("1 host via HAProxy", 1, ["--hosts", "1"], {}, False),
             ("2 hosts via HAProxy", 2, ["--hosts", "2"], {}, False),
             ("3 hosts via HAProxy", 3, ["--hosts", "3"], {}, False),
             ("3 hosts via HAProxy, straight to PostgreSQL", None, ["--hosts", "3", "--direct"], {}, False),
             ("2 hosts via HAProxy, a new connection to PgBouncer per request (as NullPool)", None, ["--hosts", "2"],
              {"DB_POOL_SIZE": "1", "DB_MAX_OVERFLOW": "200"}, False)]
    rows = []
    for label, hosts, args, extra_env, straight_to_host in plans:
        with Cluster({**env, **extra_env}, *args) as url:
            target = first_host_url(env) if straight_to_host else url
            wrk(target + "/todos", seconds=2)  # warm up: the pools fill
            rows.append({"label": label, "hosts": hosts, **wrk_with_machine_cpu(target + "/todos")})
        print(f"  {label}: {rows[-1]['rps']:.0f} req/s", flush=True)
    return rows


def waves_row(env: dict) -> Report:
    # 4 x 2 x 200 app connections: room for the 1,000 requests even when a host's two
    # workers accept unevenly, so the only queue is PgBouncer's.
    with Cluster({**env, "DB_POOL_SIZE": "200"}, "--hosts", "4", "--workers", "2", "--pgbouncer-pool", "80") as url:
        return burst_report(url, "postgres", 1000, 1.0)


def pgbouncer_version() -> str:
    """The first line of `pgbouncer --version`, e.g. PgBouncer 1.18.0."""
    version = subprocess.run([program("pgbouncer"), "--version"], capture_output=True, text=True)
    return version.stdout.splitlines()[0]


def fastest_host_count(speed: list[dict]) -> int:
    """Of the rows through HAProxy and PgBouncer, the number of hosts with the most req/s."""
    by_hosts = {row["hosts"]: row["rps"] for row in speed if row["hosts"]}
    return max(by_hosts, key=by_hosts.get)


def render(limits: list[dict], speed: list[dict], waves: Report) -> str:
    lines = [SECTION, "", f"Made by `make cluster-bench` on {time.strftime('%Y-%m-%d')}: `deploy/cluster.py` on this "
             f"machine, app hosts in network namespaces, HAProxy on 127.0.0.1, {pgbouncer_version()} in transaction "
             "mode, an embedded PostgreSQL with max_connections = 100 (97 for clients).", "",
             "### 4 hosts x 2 workers x DB_POOL_SIZE 100 = 800 possible connections; 400 concurrent 1 s pg_sleeps",
             "", "| path to PostgreSQL | wall | answers | waves of 2xx | 'too many clients' in the hosts' logs |",
             "|---|---|---|---|---|"]
    for row in limits:
        report = row["report"]
        lines.append(f"| {row['label']} | {report.wall:.2f} s | {statuses_text(report.statuses, report.errors)} | "
                     f"{output.describe_waves(report.ok_waves)} | {row['refused']} |")
    lines += ["", "Straight, the server refuses every connection past `max_connections` (the app connects as a "
              "superuser, so all 100 count): those requests answer 503 `database_unavailable` at once. Through "
              "PgBouncer every request is a client of PgBouncer, and the server sees at most its 80 connections: "
              "all answer, in waves, because a `pg_sleep` holds a server connection for its whole transaction."]
    lines += ["", f"### GET /todos (50 rows), wrk -t2 -c64 -d{WRK_SECONDS}s, 1 gevent worker per host", "",
              "| deployment | req/s | p99 | non-2xx | machine CPU per request |", "|---|---|---|---|---|"]
    for row in speed:
        lines.append(f"| {row['label']} | {row['rps']:.0f} | {row['p99_ms']:.1f} ms | {row['non_2xx']} | "
                     f"{row['cpu_us']:.0f} µs |")
    lines += ["", "On 2 cores every process here (wrk, HAProxy, PgBouncer, the hosts, PostgreSQL) shares the same "
              "CPU: the machine is the ceiling, and each host added costs CPU per request (more processes to "
              f"schedule), so the rate is highest with {fastest_host_count(speed)} host(s) here. "
              "PgBouncer's cost is the difference between the two 3-host rows: its own CPU, and the BEGIN and "
              "ROLLBACK of a read behind it (docs/operations.md, \"Behind PgBouncer\"). A new connection per "
              "request costs more CPU than it saves: the pool stays."]
    lines += ["", "### N = 1,000 one-second pg_sleeps through PgBouncer (80 server connections, 4 hosts x 2 workers "
              "x pool 200)", "",
              f"wall {waves.wall:.2f} s ({waves.wall / waves.ideal:.1f} x the sleep); answers "
              f"{statuses_text(waves.statuses, waves.errors)}; "
              f"waves of 2xx: {output.describe_waves(waves.ok_waves)}. PgBouncer's server pool, not the app, "
              "bounds the concurrency: 1,000 / 80 rounds up to 13 waves of one second."]
    return "\n".join(lines) + "\n"


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="greenflask-cluster-bench-"))
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env.update(CLUSTER_DIR=str(folder / "state"), CLUSTER_NET="10.79", EMBEDDED_PGDATA=str(folder / "pgdata"),
               EMBEDDED_MAX_CONNECTIONS="100")
    try:
        print("A. max_connections 100 ...", flush=True)
        limits = max_connections_rows(env)
        print("B. GET /todos through the cluster ...", flush=True)
        speed = throughput_rows(env)
        print("C. N = 1,000 through PgBouncer ...", flush=True)
        waves = waves_row(env)
    finally:
        subprocess.run([sys.executable, "-m", "greenflask.embedded", "stop"], cwd=ROOT, env=env, capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
    publish(SECTION, render(limits, speed, waves))


if __name__ == "__main__":
    main()
