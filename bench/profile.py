"""`make profile`: a flame graph of one gevent worker of the app under a fixed load.

    make profile                                   # GET /todos/1, 10 s, profile.svg
    .venv/bin/python -m bench.profile --route /todos --seconds 20 --out todos.svg

One worker (`gunicorn app:app -k gevent -w 1`, the shipped settings) against the embedded
database (or DATABASE_URL), wrk -t1 -c32 on one route, and py-spy recording that worker at
500 samples a second for the same seconds (`--idle` off: a greenlet waiting on the database
is not the worker's work). py-spy rather than cProfile: it samples from outside, adding no
cost to each call, so the shares of the graph are the worker's own; it pauses the worker for
each sample, which slows it but keeps every stack whole (with `--nonblocking` more than half
the samples failed here). It needs ptrace: root, or `kernel.yama.ptrace_scope` 0.
docs/reference.md says how to read the graph.
"""

import subprocess
import sys
import threading
from pathlib import Path

import click
import psutil

import seed
from bench import suite as bench
from greenflask import embedded
from greenflask.settings import Settings


@click.command()
@click.option("--route", default="/todos/1", show_default=True, help="The route under load.")
@click.option("--seconds", default=10, show_default=True, type=click.IntRange(2, 600))
@click.option("--out", default="profile.svg", show_default=True, type=click.Path(dir_okay=False))
@click.option("--format", "fmt", default="flamegraph", show_default=True,
              type=click.Choice(["flamegraph", "raw", "speedscope"]), help="raw: collapsed stacks, one per line.")
def main(route: str, seconds: int, out: str, fmt: str) -> None:
    """Record a flame graph of one worker serving ROUTE under wrk."""
    url = embedded.database_url(Settings.from_env())
    seed.seed(embedded.script_engine(url), reset=True)
    with bench.server(["-k", "gevent", "-w", "1"]) as (base_url, pid):
        bench.wrk(base_url + route, connections=32, threads=1, seconds=2)  # warm up: the pool opens
        worker = psutil.Process(pid).children()[0].pid
        load = threading.Thread(target=bench.wrk, args=(base_url + route, 32, 1, seconds + 1))
        load.start()
        recorded = subprocess.run([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(worker),
                                   "--rate", "500", "--duration", str(seconds), "--format", fmt,
                                   "--output", out], check=False)
        load.join()
    if recorded.returncode != 0:
        raise SystemExit(f"py-spy failed (exit {recorded.returncode}): it needs root or ptrace_scope 0")
    print(f"{route}: {seconds} s of one worker under wrk -t1 -c32, written to {out}")


if __name__ == "__main__":
    main()
