"""GET /todos throughput of several checkouts of the app beside the raw floor, alternating.

    git worktree add /tmp/gf-before <commit>
    .venv/bin/python -m bench.compare /tmp/gf-before .

Each folder's `app:app` runs under gunicorn -k gevent -w 2 against the same database (the
embedded server of this checkout, or DATABASE_URL); wrk -t2 -c64 measures each in turn,
BENCH_RUNS times (default 3), and the table gives the medians with the CPU per request of
the server's processes and of PostgreSQL, as `make bench` section 3 does. BENCHMARKS.md's
"Speed" table was made this way, one folder per change.
"""

import os
import statistics
from contextlib import ExitStack
from pathlib import Path

import click

from bench import suite as bench
from greenflask import embedded
from greenflask.settings import Settings


@click.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
def main(folders: tuple[str, ...]) -> None:
    """GET /todos throughput of the app in each of FOLDERS beside the raw floor."""
    os.environ["EMBEDDED_PGDATA"] = str(embedded.pgdata())  # one database for every folder
    url = embedded.database_url(Settings.from_env())
    floor = ("floor", ["-k", "gevent", "-w", bench.PROCESSES], {"BENCH_DSN": bench.libpq_dsn(url)},
             "bench.floor_wsgi:application", "/todos", bench.ROOT)
    candidates = [(folder, ["-k", "gevent", "-w", bench.PROCESSES], {}, "app:app", "/healthz", Path(folder).resolve())
                  for folder in folders]
    runs: dict[str, list[dict]] = {}
    with ExitStack() as stack:
        started = {name: stack.enter_context(bench.server(args, env, app, ready, cwd=cwd))
                   for name, args, env, app, ready, cwd in [floor, *candidates]}
        for base_url, _ in started.values():
            bench.wrk(base_url + "/todos", seconds=2)  # warm up
        for _ in range(bench.RUNS):
            for name, (base_url, pid) in started.items():
                runs.setdefault(name, []).append(bench.wrk_with_cpu(base_url + "/todos", pid))
    floor_rps = statistics.median(run["rps"] for run in runs["floor"])
    print("| server | req/s | of the floor | CPU per request: server / PostgreSQL | non-2xx |")
    print("|---|---|---|---|---|")
    for name, results in runs.items():
        rps = statistics.median(run["rps"] for run in results)
        server_us = statistics.median(run["server_us"] for run in results)
        postgres_us = statistics.median(run["postgres_us"] for run in results)
        non_2xx = sum(run["non_2xx"] for run in results)
        print(f"| {name} | {rps:,.0f} | {rps / floor_rps:.2f} | {server_us:.0f} / {postgres_us:.0f} µs | {non_2xx} |")


if __name__ == "__main__":
    main()
