"""psycopg2's wait callback under gevent, with a bound on every wait for the database.

psycopg2 is C code talking to libpq, which gevent cannot patch. psycogreen's wait callback
runs each query in libpq's asynchronous mode and yields to the gevent hub while the socket
is not ready, so a slow query no longer blocks the whole worker. Left alone it waits as long
as the server takes, and libpq ignores `connect_timeout` in that mode: a host that accepts
TCP and never answers, or stops answering mid-query (a frozen server, a partition, a
half-dead load balancer), would hold the request and its pooled connection forever.

So each wait gets a bound, by phase:

* connect: `DB_CONNECT_TIMEOUT` (what libpq's connect_timeout does in blocking mode);
* liveness: the same bound, for the `SELECT 1` on a pooled connection (`bounded()`, in engine.py);
* statement: `DB_STATEMENT_TIMEOUT` plus a margin, so that a live server's own
  statement_timeout answers first (a clean 504 that keeps the connection).

When a bound passes, the callback raises `DatabaseTimeout`. psycopg2 then closes the
connection (its "green panic"), so it can never go back to the pool half-way through a
conversation, and SQLAlchemy sees a closed connection and discards it.

Which callback a process gets is chosen here too (`choose`), on the engine's first use in
that process: after gunicorn's gevent worker has monkey-patched, never at import.
"""

import contextlib
import sys
from contextvars import ContextVar
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions
from psycogreen.gevent import gevent_wait_callback

# Room for the server's statement_timeout error to arrive before the worker gives up.
STATEMENT_MARGIN_SECONDS = 1.0


class DatabaseTimeout(psycopg2.OperationalError):
    """The database did not answer within the bound of this phase of the conversation."""

    def __init__(self, phase: str, seconds: float):
        super().__init__(f"{phase}: no answer from the database within {seconds:g} s")
        self.phase = phase
        self.seconds = seconds


@dataclass(frozen=True)
class Bounds:
    connect: float
    statement: float

    @classmethod
    def from_settings(cls, settings) -> "Bounds":
        return cls(settings.connect_timeout, settings.statement_timeout_ms / 1000 + STATEMENT_MARGIN_SECONDS)


_bounds: Bounds  # set by install(), before the callback can run
_phase: ContextVar[tuple[str, float] | None] = ContextVar("greenflask_wait_phase", default=None)


def install(bounds: Bounds) -> None:
    """Make the bounded green callback psycopg2's wait callback in this process."""
    global _bounds
    _bounds = bounds
    psycopg2.extensions.set_wait_callback(wait_with_bounds)


def socket_is_green() -> bool:
    """True when gevent has monkey-patched `socket` in this process."""
    if "gevent" not in sys.modules:
        return False
    from gevent import monkey

    return monkey.is_module_patched("socket")


def choose(settings) -> bool:
    """The bounded green callback when PSYCOGREEN is on, or auto under gevent; whether it is.

    Otherwise none: libpq blocks the process while it waits, which is the point of the
    sync worker and of the PSYCOGREEN=0 demonstration.
    """
    mode = settings.psycogreen
    if mode == "on" or (mode == "auto" and socket_is_green()):
        install(Bounds.from_settings(settings))
        return True
    psycopg2.extensions.set_wait_callback(None)
    return False


def installed() -> bool:
    return psycopg2.extensions.get_wait_callback() is not None


@contextlib.contextmanager
def bounded(phase: str, seconds: float):
    """Waits inside the block (in this greenlet) get `seconds` and are named `phase`."""
    token = _phase.set((phase, seconds))
    try:
        yield
    finally:
        _phase.reset(token)


def wait_with_bounds(conn, timeout=None) -> None:
    phase, seconds = _phase.get() or _default_phase(conn)
    try:
        gevent_wait_callback(conn, timeout=seconds)
    except TimeoutError:  # gevent's wait_read/wait_write raise socket.timeout
        raise DatabaseTimeout(phase, seconds) from None


def _default_phase(conn) -> tuple[str, float]:
    if conn.status == psycopg2.extensions.STATUS_SETUP:
        return "connect", _bounds.connect
    return "statement", _bounds.statement
