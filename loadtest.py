"""Fire concurrent requests and show whether the server answered them at once, or in waves.

    python loadtest.py 100                       # 100 concurrent GETs per sleep route
    python loadtest.py 20 --seconds 1 --routes postgres
    python loadtest.py -c 64 -d 10 /todos        # closed loop, like wrk
    python loadtest.py --rate 500 -d 10 /todos   # open loop on a fixed schedule, like wrk2 -R
    python loadtest.py --matrix 5 --seconds 1    # the original README's three modes, one table
    python loadtest.py --find-capacity --slo p99=50ms /todos   # the highest rate that meets the SLO
    python loadtest.py merge a.json b.json --json all.json     # shards taken on several machines

Exit status: 0 when every request got a 2xx (the search: when a rate met the SLO), 1 when
not, 2 when the server cannot be reached (or the command line is wrong). Ctrl-C stops any
mode within 2 s: it prints and writes what was measured until then, says "interrupted",
and exits by those figures as above; 130 when nothing had been measured yet.

This file is the command line only: the modes live in the `loadtester` package, each a
`run(...)` looked up in MODES. click reads the command line, as in every script here.
`--json FILE` writes one shape for every mode: {"mode", "url", "all_ok", "reports",
"matrix", "capacity", "steps"}; each report carries its HDR histograms for `merge`.
"""

import inspect
import signal
import sys
from dataclasses import dataclass

import click

from greenflask.settings import Tools
from loadtester import burst, capacity, closed, interrupt, matrix, merge, openloop
from loadtester.fleet import FleetFailed, default_processes
from loadtester.measure import NotEnoughOpenFiles, ServerUnreachable, ensure_open_files
from loadtester.output import write_json

START_HINT = "start it with: gunicorn app:app -k gevent   (after: python seed.py)"
COMMON = {"target", "url", "timeout", "json_path"}


@dataclass(frozen=True)
class Mode:
    flag: str | None  # the option that picks it (a burst is what is left)
    named: str  # how a usage error names it
    options: frozenset  # the options it takes besides COMMON
    run: object  # its run(...): called with the values its parameters name
    sockets: object  # at most this many sockets at once, from the values


MODES = {
    "burst": Mode(None, "a burst of N", frozenset({"seconds", "routes", "quiet", "plot", "processes"}), burst.run,
                  lambda v: v["count"]),
    "closed": Mode("concurrency", "the closed loop (-c)", frozenset({"concurrency", "duration", "quiet", "processes"}),
                   closed.run, lambda v: v["concurrency"]),
    "open": Mode("rate", "the open loop (--rate)",
                 frozenset({"rate", "duration", "quiet", "plot", "processes", "warmup"}), openloop.run,
                 lambda v: round(v["rate"] * min(v["duration"], v["timeout"]))),
    "capacity": Mode("find_capacity", "--find-capacity",
                     frozenset({"find_capacity", "slo", "duration", "plot", "max_seconds", "max_rate", "start_rate",
                                "processes", "warmup"}), capacity.run,
                     lambda v: round(v["max_rate"] * min(v["duration"] or capacity.STEP_SECONDS, capacity.step_timeout(
                         v["timeout"], capacity.parse_slo(v["slo"])[1])))),
    "matrix": Mode("matrix", "--matrix (it starts its own servers)", frozenset({"matrix", "seconds"}),
                   matrix.run, lambda v: v["count"]),
}
FLAGS = {"target": "N or PATH", "url": "--url", "seconds": "--seconds", "routes": "--routes", "timeout": "--timeout",
         "json_path": "--json", "quiet": "--quiet", "plot": "--plot", "concurrency": "-c", "rate": "--rate",
         "duration": "-d", "matrix": "--matrix", "find_capacity": "--find-capacity", "slo": "--slo",
         "max_seconds": "--max-seconds", "max_rate": "--max-rate", "start_rate": "--start-rate",
         "processes": "--processes", "warmup": "--warmup"}


def _mode(ctx: click.Context) -> str:
    """The mode the options choose; two modes at once, or an option another mode takes, is a usage error."""
    given = [name for name in FLAGS if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    chosen = [name for name, mode in MODES.items() if mode.flag in given]
    if len(chosen) > 1:
        raise click.UsageError(f"{' and '.join(FLAGS[MODES[name].flag] for name in chosen)} are different modes: "
                               "choose one")
    name = chosen[0] if chosen else "burst"
    takes = MODES[name].options | (COMMON - {"url", "target"} if name == "matrix" else COMMON)
    if stray := [FLAGS[option] for option in given if option not in takes]:
        raise click.UsageError(f"{', '.join(stray)} does not apply to {MODES[name].named}")
    return name


def _target(mode: str, target: str | None) -> dict:
    """TARGET as the mode reads it: a burst's (and the matrix's) count, or a loop's path."""
    if mode in ("closed", "open", "capacity"):
        path = target or "/todos"
        if not path.startswith("/"):
            raise click.UsageError(f"PATH must start with '/', got {path!r}")
        return {"path": path}
    try:
        count = int(target) if target else 5
    except ValueError:
        raise click.UsageError(f"N must be an integer, got {target!r}") from None
    if count < 1:
        raise click.UsageError("N must be >= 1")
    return {"count": count}


def _routes(ctx, param, value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names or any(name not in burst.ROUTES for name in names):
        raise click.BadParameter(f"takes python and/or postgres, got {value!r}")
    return names


def _slo(ctx, param, value: str | None) -> str | None:
    if value is not None:
        capacity.parse_slo(value)
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("target", required=False)
@click.option("--url", default="http://localhost:8000", show_default=True, help="Server base URL.")
@click.option("--seconds", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="Sleep per request, sent as ?seconds=.")
@click.option("--routes", default="python,postgres", show_default=True, callback=_routes,
              help="Comma-separated: python, postgres.")
@click.option("--timeout", default=120.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Per-request timeout in seconds.")
@click.option("--json", "json_path", metavar="FILE", help="Write every figure to FILE as JSON (one shape, all modes).")
@click.option("--quiet", is_flag=True, help="Only the totals: no per-response lines, live line, summary or timeline.")
@click.option("--plot", metavar="FILE.png", help="Draw the timeline, latency or search (needs matplotlib).")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), help="Closed loop: this many workers.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), metavar="R",
              help="Open loop: R requests a second on a fixed schedule.")
@click.option("-d", "--duration", type=click.FloatRange(min=0, min_open=True),
              help="Closed or open loop: seconds (10); a search's step (5).")
@click.option("--processes", type=click.IntRange(min=1), metavar="P",
              help="Send from P processes (loops and searches: the cores; a burst: one, the cores past 1,000).")
@click.option("--warmup", type=click.FloatRange(min=0), metavar="S",
              help="Open loop and search: first send S seconds that do not count (0; a search's step: 1).")
@click.option("--matrix", type=click.IntRange(min=1), metavar="N", help="Start the server in each of the three modes.")
@click.option("--find-capacity", is_flag=True, help="Search for the highest rate that meets --slo (open-loop steps).")
@click.option("--slo", metavar="pNN=TIME", callback=_slo, help=f"With --find-capacity: {capacity.SLO_FORMS}.")
@click.option("--max-seconds", default=180.0, show_default=True, type=click.FloatRange(min=1),
              help="With --find-capacity: the whole search ends by then.")
@click.option("--max-rate", default=10_000.0, show_default=True, type=click.FloatRange(min=1),
              help="With --find-capacity: never send faster.")
@click.option("--start-rate", default=50.0, show_default=True, type=click.FloatRange(min=1),
              help="With --find-capacity: the first step's rate.")
@click.pass_context
def cli(ctx, **values) -> int:
    """Concurrent-request load tester for greenflask.

    TARGET is N, the requests per route (default 5), or a PATH with -c, --rate or
    --find-capacity (default /todos). `loadtest.py merge --help`: shards as one report.
    """
    name = _mode(ctx)
    mode = MODES[name]
    if name == "capacity" and not values["slo"]:
        raise click.UsageError(f"--find-capacity needs --slo: {capacity.SLO_FORMS}")
    if values["plot"]:
        _needs_matplotlib()
    values["url"] = values["url"].rstrip("/")
    values |= _target(name, values["target"] if name != "matrix" else str(values["matrix"]))
    if name in ("closed", "open"):
        values["duration"] = values["duration"] or 10.0
    if name != "burst":
        values["processes"] = values["processes"] or default_processes()
    values["log_path"] = Tools.from_env().loadtest_server_log
    ensure_open_files(mode.sockets(values))
    parameters = inspect.signature(mode.run).parameters
    run = mode.run(**{key: value for key, value in values.items() if key in parameters and value is not None})
    if values["json_path"]:
        write_json(values["json_path"], {"mode": name, "url": None if name == "matrix" else values["url"],
                                         "all_ok": run.ok, "reports": run.reports, "matrix": [], "capacity": None,
                                         "steps": []} | run.extra)
    return 0 if run.ok else 1


@click.command("merge", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "json_path", metavar="FILE", help="Write the merged report to FILE as JSON.")
@click.option("--plot", metavar="FILE.png", help="Draw the merged latency (needs matplotlib).")
def merge_cli(files, json_path, plot) -> int:
    """Merge the --json files of runs taken apart (one per machine, each --rate R/N) into one report."""
    if plot:
        _needs_matplotlib()
    run = merge.run(list(files), plot)
    if json_path:
        write_json(json_path, {"all_ok": run.ok, "reports": run.reports, "matrix": [], "capacity": None,
                               "steps": []} | run.extra)
    return 0 if run.ok else 1


def _needs_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.UsageError("--plot needs matplotlib: pip install matplotlib") from None


def main(argv=None) -> int:
    """The command line: a usage error or a refusal is one line on stderr and exit 2."""
    interrupt.install()
    argv = sys.argv[1:] if argv is None else argv
    command, args, prog = (merge_cli, argv[1:], "loadtest.py merge") if argv[:1] == ["merge"] else (cli, argv,
                                                                                                      "loadtest.py")
    try:
        code = command.main(args=args, prog_name=prog, standalone_mode=False)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # done: a Ctrl-C from here on changes nothing
        if interrupt.requested():
            print(interrupt.LINE, flush=True)
        return code
    except interrupt.Interrupted:
        print(interrupt.LINE + " (nothing measured yet)", flush=True)
        return 130
    except click.UsageError as error:
        print(f"{prog}: {error.format_message()} (see --help)", file=sys.stderr)
    except ServerUnreachable as error:
        print(f"loadtest.py: {error}; {START_HINT}", file=sys.stderr)
    except matrix.MatrixSetupFailed as error:
        print(f"loadtest.py --matrix: {error}", file=sys.stderr)
    except (NotEnoughOpenFiles, FleetFailed, merge.CannotMerge) as error:
        print(f"{prog}: {error}", file=sys.stderr)
    except (KeyboardInterrupt, click.Abort):
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
