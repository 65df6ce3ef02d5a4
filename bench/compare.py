"""The app's measured routes in several checkouts beside the raw floor's, alternating.

    git worktree add /tmp/gf-before <commit>
    .venv/bin/python -m bench.compare /tmp/gf-before .
    .venv/bin/python -m bench.compare --route /todos/1 /tmp/gf-before .

Each folder's `app:app` runs under gunicorn -k gevent -w 2 against the same database (the
embedded server of this checkout, or DATABASE_URL); wrk -t2 -c64 measures each route of each
in turn, BENCH_RUNS times (default 3), and the table gives the medians with the CPU per
request of the server's processes and of PostgreSQL, as `make bench` section 3 does.
BENCHMARKS.md's "Speed" tables were made this way, one folder per change.
"""

import os
from contextlib import ExitStack
from pathlib import Path

import click

import seed
from bench import suite as bench
from greenflask import embedded
from greenflask.settings import Settings


@click.command()
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--route", "routes", multiple=True, default=tuple(bench.ROUTE_GOALS), show_default=True,
              help="A route to measure (repeatable).")
def main(folders: tuple[str, ...], routes: tuple[str, ...]) -> None:
    """The app in each of FOLDERS beside the raw floor, route by route."""
    os.environ["EMBEDDED_PGDATA"] = str(embedded.pgdata())  # one database for every folder
    url = embedded.database_url(Settings.from_env())
    seed.seed(embedded.script_engine(url), reset=True)
    workers = ["-k", "gevent", "-w", bench.PROCESSES]
    with ExitStack() as stack:
        started = {"floor": stack.enter_context(bench.server(workers, {"BENCH_DSN": bench.libpq_dsn(url)},
                                                             bench.FLOOR_APP, "/todos"))}
        for folder in folders:
            started[folder] = stack.enter_context(bench.server(workers, cwd=Path(folder).resolve()))
        figures = bench.alternate(started, tuple(routes))
    print("| route | server | req/s | of the floor | CPU per request: server / PostgreSQL | non-2xx |")
    print("|---|---|---|---|---|---|")
    for (route, name), row in figures.items():
        floor = figures[route, "floor"]["rps"]
        print(f"| {route} | {name} | {row['rps']:,.0f} | {row['rps'] / floor:.2f} | "
              f"{row['server_us']:.0f} / {row['postgres_us']:.0f} µs | {row['non_2xx']} |")


if __name__ == "__main__":
    main()
