"""Ctrl-C, one way for every mode: the first SIGINT only sets a flag, and the waits of this
process look at it and stop where they are; the modes keep what was measured until then.

Why not Python's KeyboardInterrupt: it is raised wherever the main thread happens to be,
and when that is a finalizer (an aiohttp object's `__del__`, a weakref callback run by the
garbage collector) Python prints "Exception ignored" and the interrupt is gone: the run
goes on as if nothing was pressed. And asyncio.run turns it into a cancellation, which is
lost the same way when the code it lands in returns normally. A flag cannot be lost: the
fleet's wait looks at it every tick, and `run()` (asyncio.run for this process's own
coroutines) cancels its coroutine when it is set. A second Ctrl-C raises KeyboardInterrupt
at once, for a run stuck somewhere this module does not reach.
"""

import asyncio
import signal
import threading

TICK = 0.1  # seconds between two looks at the flag while a coroutine of this process runs
# What loadtest.py prints when a run was cut short (every mode; tests look for it).
LINE = "interrupted: what was found so far is above"

_requested = threading.Event()


class Interrupted(Exception):
    """Ctrl-C came before this process's coroutine was done: nothing of it to keep."""


def install() -> None:
    """Let SIGINT set the flag (loadtest.py's first step); asyncio.run, seeing a handler
    other than Python's default, then leaves SIGINT alone."""
    _requested.clear()
    signal.signal(signal.SIGINT, _on_sigint)


def _on_sigint(signum, frame) -> None:
    if _requested.is_set():
        raise KeyboardInterrupt
    _requested.set()


def requested() -> bool:
    return _requested.is_set()


def run(coroutine):
    """asyncio.run(coroutine), cancelled within TICK of a Ctrl-C: then Interrupted."""
    return asyncio.run(_until_interrupted(coroutine))


async def _until_interrupted(coroutine):
    task = asyncio.ensure_future(coroutine)
    while not task.done():
        if requested():
            task.cancel()
        await asyncio.wait({task}, timeout=TICK)
    if task.cancelled():
        raise Interrupted
    return task.result()
