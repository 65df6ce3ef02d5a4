"""One request and what came of it: the one request function of every mode, the probe run
before a mode starts, and the client's own limit on open files."""

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp

from greenflask import limits

# How late asyncio's timers may fire (epoll counts whole milliseconds).
SLEEP_OVERSHOOT = 0.0015
# An open-loop send counts as late when it left more than this behind its schedule.
LATE_SEND = 0.001


class ServerUnreachable(Exception):
    pass


class NotEnoughOpenFiles(Exception):
    pass


@dataclass(slots=True)
class Outcome:
    """One request: when it completed (s after the run's start), its status or error, its
    latency from the moment it was sent, and (open loop) how late it was sent."""

    done_at: float
    latency: float
    status: int | None
    error: str | None = None
    late: float = 0.0
    code: str | None = None  # a 4xx/5xx's error code, from the project's JSON error body

    @property
    def corrected(self) -> float:
        """Latency from the moment it was meant to be sent: what a user arriving on time waits."""
        return self.latency + self.late

    @property
    def sent_at(self) -> float:
        return self.done_at - self.latency

    @property
    def intended_at(self) -> float:
        """When the schedule meant it to leave (the actual send, outside the open loop)."""
        return self.done_at - self.latency - self.late

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def error_kind(error: BaseException) -> str:
    """Group client errors the way wrk and hey users think of them."""
    if isinstance(error, asyncio.TimeoutError):
        return "timeout"
    if isinstance(error, aiohttp.ClientConnectorError):
        return "refused"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "disconnected"
    if isinstance(error, aiohttp.ClientOSError | ConnectionResetError):
        return "reset"
    if isinstance(error, aiohttp.ClientPayloadError):
        return "payload"
    return type(error).__name__


def error_code(body: bytes) -> str | None:
    """`pool_exhausted` from `{"error": {"code": "pool_exhausted", ...}}`; None from any other body."""
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


def client_session(timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=timeout),
        auto_decompress=False,
    )


class Live:
    """Counters another process can read while requests run (see fleet.Counters): a no-op here."""

    def sent(self) -> None:
        pass

    def done(self, outcome: Outcome) -> None:
        pass


NOT_WATCHED = Live()


async def fetch(session: aiohttp.ClientSession, url: str, started: float, intended: float | None = None,
                live: Live = NOT_WATCHED) -> Outcome:
    """One GET. `started`: the run's start (perf_counter); `intended`: when the schedule wanted it sent."""
    sent = time.perf_counter()
    live.sent()
    code = None
    try:
        async with session.get(url) as response:
            body = await response.read()
            status, error = response.status, None
            if status >= 400:
                code = error_code(body)
    except (TimeoutError, aiohttp.ClientError, OSError) as caught:
        status, error = None, error_kind(caught)
    now = time.perf_counter()
    late = max(0.0, sent - intended) if intended is not None else 0.0  # up to SLEEP_OVERSHOOT early counts as on time
    outcome = Outcome(done_at=now - started, latency=now - sent, status=status, error=error, late=late, code=code)
    live.done(outcome)
    return outcome


async def probe(base_url: str) -> dict | None:
    """Whether the server is up (any HTTP answer, even a 404, means it is; a refused
    connection does not), and its GET /stats (its limits), or None from a server without.
    On connections of its own, closed before the run, so that every request of a burst
    starts alike (a kept-alive one would answer first and look like a wave of its own)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3)) as session:
        try:
            async with session.get(base_url + "/healthz") as response:
                await response.read()
        except (TimeoutError, aiohttp.ClientConnectionError) as error:
            raise ServerUnreachable(f"cannot reach {base_url} ({error_kind(error)})") from None
        try:
            async with session.get(base_url + "/stats") as response:
                return await response.json() if response.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return None


def ensure_open_files(connections: int) -> None:
    """Raise this process's soft limit on open files to hold `connections` sockets at once,
    as far as the hard limit allows (the fleet's processes inherit it); stop with one line
    naming `ulimit -n` when it cannot."""
    needed = connections + limits.SPARE
    soft, hard = limits.raise_open_files(needed)
    if soft < needed:
        raise NotEnoughOpenFiles(f"{connections} connections need {needed} open files and this shell allows "
                                 f"{soft} (hard limit {hard}): raise it first, e.g. `ulimit -n {needed}`")
