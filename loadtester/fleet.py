"""The client spread over processes: one process keeps an open loop's schedule only to a
point (BENCHMARKS.md section 7), so every mode sends from a fleet of P.

Each process has its own event loop and aiohttp session and is handed the same job; once
every process has said it is ready (its session made), the parent hands out one start on
the wall clock, a moment ahead, so that a slow fork cannot skew it. A job's share is fixed
by the process's index (the open loop's process i sends requests i, i+P, i+2P ... at their
times on the one schedule), so the interleaved schedule is exact. Every outcome comes back
to the parent, which makes the one report (one HDR histogram of all of them: the same as
merging each process's). Processes are forked when the fleet starts and kept for all its
jobs (a capacity search's steps). They ignore SIGINT: the parent owns Ctrl-C
(loadtester/interrupt.py). On it, the parent sends each process still at its job SIGUSR1,
which cancels the job; each job keeps what came back until then and returns it, so a run cut
short still has its figures. A process that has not answered STOP_WITHIN later is terminated.
"""

import asyncio
import contextlib
import multiprocessing
import os
import resource
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import wait

import uvloop

from loadtester import interrupt
from loadtester.measure import LATE_SEND, Live, Outcome

START_LEAD = 0.05  # seconds between the last process saying it is ready and the shared start
TICK = 0.1  # seconds between two reads of the live counters (and looks for a Ctrl-C)
STOP_WITHIN = 1.0  # seconds the processes have to hand back their part once told to stop
FIELDS = ("sent", "answered", "late", "errors")


def default_processes() -> int:
    return os.cpu_count() or 1


class FleetFailed(Exception):
    """A process of the fleet raised or died: a one-line reason."""


class Counters(Live):
    """This process's four counters in memory the parent reads (int64 writes need no lock)."""

    def __init__(self, shared, index: int):
        self.shared, self.base = shared, index * len(FIELDS)

    def reset(self) -> None:
        for offset in range(len(FIELDS)):
            self.shared[self.base + offset] = 0

    def sent(self) -> None:
        self.shared[self.base] += 1

    def done(self, outcome: Outcome) -> None:
        self.shared[self.base + 1] += 1
        self.shared[self.base + 2] += outcome.late > LATE_SEND
        self.shared[self.base + 3] += outcome.error is not None


@dataclass(frozen=True)
class Share:
    """What one process of P is to do of a job, and the way to its start."""

    index: int
    processes: int
    live: Live
    connection: object  # to the parent

    async def start(self) -> float:
        """Say this process is ready, wait for the shared start, and sleep until it; the
        start on this process's perf_counter (every time of the job counts from it)."""
        self.connection.send(("ready", None))
        start_at = self.connection.recv()
        started = time.perf_counter() + (start_at - time.time())
        await asyncio.sleep(max(0.0, started - time.perf_counter()))
        return started

    def part(self, total: int) -> int:
        """This process's part of `total` things split as evenly as they go."""
        return total // self.processes + (self.index < total % self.processes)

    def indices(self, total: int) -> range:
        """This process's places in a schedule of `total`: index, index + P, ..."""
        return range(self.index, total, self.processes)


def cpu_seconds() -> float:
    """This process's CPU time so far, user and system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _serve(connection, index: int, processes: int, shared) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a stop that comes between two jobs
    live = Counters(shared, index)
    # uvloop (libuv under asyncio's API): an aiohttp request costs its process less CPU than
    # on asyncio's own loop, which is what lets P processes keep a high rate (BENCHMARKS.md 7).
    loop = uvloop.new_event_loop()
    while (message := connection.recv()) is not None:
        job, args = message
        live.reset()
        before = cpu_seconds()
        task = loop.create_task(job(Share(index, processes, live, connection), *args))
        loop.add_signal_handler(signal.SIGUSR1, task.cancel)
        try:
            result = loop.run_until_complete(task)
        except asyncio.CancelledError:  # stopped before the job could keep anything
            result = None
        except Exception as error:  # noqa: BLE001 - sent to the parent, which names it in one line
            connection.send(("error", f"{type(error).__name__}: {error}"))
            continue
        finally:
            loop.remove_signal_handler(signal.SIGUSR1)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        connection.send(("ok", (result, cpu_seconds() - before)))
    loop.close()


class Fleet:
    """`with Fleet(P) as fleet: fleet.run(job, *args)`: each process's result, in index order."""

    def __init__(self, processes: int):
        self.processes = max(1, processes)
        methods = multiprocessing.get_all_start_methods()
        self._context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        self._shared = self._context.Array("q", len(FIELDS) * self.processes, lock=False)
        self._workers: list = []
        self._stuck: set[int] = set()  # processes that did not hand back a stopped job: terminated
        self.cpu = 0.0  # CPU seconds the processes spent on the last job (what the client cost)

    def __enter__(self) -> "Fleet":
        for index in range(self.processes):
            parent_end, child_end = self._context.Pipe()
            process = self._context.Process(target=_serve, args=(child_end, index, self.processes, self._shared),
                                            daemon=True, name=f"loadtest-{index}")
            process.start()
            child_end.close()
            self._workers.append((process, parent_end))
        return self

    def __exit__(self, kind, error, trace) -> None:
        for process, connection in self._workers:
            if kind is None and process.is_alive() and process.pid not in self._stuck:
                connection.send(None)
            else:
                process.terminate()
        for process, connection in self._workers:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
            connection.close()
        self._workers.clear()

    def totals(self) -> dict:
        """The live counters summed over the processes."""
        values = list(self._shared)
        return {name: sum(values[offset::len(FIELDS)]) for offset, name in enumerate(FIELDS)}

    def run(self, job, *args, on_tick=None) -> tuple[list, float]:
        """Run the coroutine function `job(share, *args)` in every process from one start
        (`await share.start()`); (each process's result, the start on the wall clock).
        `on_tick(totals)` while waiting; `self.cpu` after it: the CPU the job cost them.
        A Ctrl-C stops the job: the results are then what the processes had, from those that
        handed theirs back in time (see the module's docstring)."""
        for _, connection in self._workers:
            connection.send((job, args))
        self._gather("ready")
        start_at = time.time() + START_LEAD
        for _, connection in self._workers:
            connection.send(start_at)
        done = self._gather("ok", on_tick, stoppable=True)
        self.cpu = sum(value[1] for value in done if value is not None)
        return [value[0] for value in done if value is not None and value[0] is not None], start_at

    def _gather(self, wanted: str, on_tick=None, stoppable: bool = False) -> list:
        """Every process's next message, which must be `wanted`: their values in index order
        (None for a process that was stopped and did not answer within STOP_WITHIN)."""
        pending = {connection: index for index, (_, connection) in enumerate(self._workers)}
        values: list = [None] * self.processes
        stop_by = None
        while pending:
            if stoppable and interrupt.requested():
                if stop_by is None:
                    stop_by = time.monotonic() + STOP_WITHIN
                    for index in pending.values():
                        with contextlib.suppress(ProcessLookupError):  # died: _gather says so below
                            os.kill(self._workers[index][0].pid, signal.SIGUSR1)
                elif time.monotonic() > stop_by:
                    self._stuck |= {self._workers[index][0].pid for index in pending.values()}
                    break
            for connection in wait(list(pending), timeout=TICK):
                index = pending.pop(connection)
                try:
                    status, value = connection.recv()
                except EOFError:
                    raise FleetFailed(f"load process {index} died") from None
                if status == "error":
                    raise FleetFailed(f"load process {index}: {value}")
                if status != wanted:
                    raise FleetFailed(f"load process {index} said {status}, not {wanted}")
                values[index] = value
            if on_tick:
                on_tick(self.totals())
        return values
