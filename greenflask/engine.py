"""The engines and their pools: every pool setting spelled out, libpq's arguments, the pool
listeners, one set of engines per process, and what /stats and the start-up check read.

Order matters under gunicorn's gevent worker: the worker monkey-patches *after* `post_fork`
and (with --preload) after the app module was imported, so nothing here connects or
chooses a wait callback at import time. `Engines` makes its engines lazily, once per
process, the first time they are needed; gunicorn's `post_worker_init` hook asks for them
early so that the mode and the pool are logged at start.
"""

import logging
import math
import os
import time
import weakref

import psycopg2
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DisconnectionError

from greenflask import embedded, green, health, metrics, sizing
from greenflask.logs import first_line
from greenflask.settings import Settings

log = logging.getLogger("greenflask.engine")

# Half-open TCP connections: the kernel finds the vanished peer of an idle pooled connection
# after about 30 s (15 s idle, then 3 probes 5 s apart), and one that stops acknowledging
# what we sent after 15 s (tcp_user_timeout), so the next liveness check fails at once
# instead of waiting out its bound. libpq ignores both on a unix socket (the embedded server).
TCP_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 15, "keepalives_interval": 5, "keepalives_count": 3}
TCP_USER_TIMEOUT_MS = 15_000
# A connection back in the pool for less than this is taken as alive and gets no liveness
# check (HikariCP's aliveBypassWindowMs, same value). Under load that is nearly every
# checkout: one round trip fewer per request. A connection that died within the window
# fails its first statement instead, and `db.read()` retries read-only work once.
LIVENESS_BYPASS_SECONDS = 0.5
REPLICA_LAG_SQL = (
    "SELECT pg_is_in_recovery(), CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0"
    " ELSE EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) END"
)
SERVER_SETTINGS_SQL = (
    "SELECT name, setting::int FROM pg_settings WHERE name IN ('max_connections', "
    "'superuser_reserved_connections', 'reserved_connections', 'statement_timeout')"
)


def build_engine(url: str, settings: Settings) -> Engine:
    """The engine with every pool setting spelled out (docs/operations.md, pool arithmetic)."""
    engine = create_engine(
        make_url(url).set(drivername=embedded.DRIVER),
        pool_size=settings.pool_size,
        max_overflow=settings.max_overflow,
        pool_timeout=settings.pool_timeout,
        pool_recycle=settings.pool_recycle,
        # LIFO reuses the most recently returned connections; a burst's extras rest below.
        pool_use_lifo=True,
        connect_args=connect_args(settings),
    )
    event.listen(engine, "connect", _note_answered)
    if not settings.pgbouncer:
        # Behind PgBouncer the check's SELECT 1 is a transaction of its own: it waits in
        # PgBouncer's queue for a server connection, then the request queues again for its
        # own transaction, and a busy pool turns into 503s from the check's short bound.
        # PgBouncer checks its server connections itself (server_check_query); a dead
        # connection to PgBouncer fails the first statement, which `db.read()` retries.
        event.listen(engine, "checkout", _check_liveness(settings.connect_timeout))
    event.listen(engine, "checkin", _on_checkin)
    return engine


def connect_args(settings: Settings) -> dict:
    """libpq's connection parameters. statement_timeout is sent as a startup option, except
    behind PgBouncer, which refuses startup options: there it is the database's own setting
    (`python seed.py` with DB_PGBOUNCER=1), so no session state is needed at all."""
    args = {
        "application_name": settings.application_name,
        # Honoured by libpq in blocking mode (the sync worker); green.py bounds the rest.
        "connect_timeout": max(2, math.ceil(settings.connect_timeout)),
        "tcp_user_timeout": TCP_USER_TIMEOUT_MS,
        **TCP_KEEPALIVE,
    }
    if not settings.pgbouncer:
        args["options"] = f"-c statement_timeout={settings.statement_timeout_ms}"
    return args


def _note_answered(dbapi_connection, connection_record) -> None:
    """On connect and on return to the pool: the connection answered just now."""
    connection_record.info["answered_at"] = time.monotonic()


def _on_checkin(dbapi_connection, connection_record) -> None:
    """Back in the pool: it answered, so the database did; a read session's autocommit
    (db.read_session) is put back off for whoever takes it next."""
    _note_answered(dbapi_connection, connection_record)
    if dbapi_connection is None or dbapi_connection.closed:  # None: invalidated
        return
    health.note_answer()
    if dbapi_connection.autocommit:
        dbapi_connection.autocommit = False


def _check_liveness(seconds: float):
    """A pool `checkout` listener: SQLAlchemy's pool_pre_ping, with a bound of its own.

    pool_pre_ping's `SELECT 1` would wait under the statement bound (a minute by default)
    on a host that stopped answering. Here it gets `seconds`. A connection that fails the
    check (e.g. its backend was terminated) is replaced by the pool with a new one; one
    that does not answer in time means the host is stalled, and the request answers 503
    at once rather than wait again for a new connection. A connection that answered less
    than LIVENESS_BYPASS_SECONDS ago is not checked.
    """

    def check(dbapi_connection, connection_record, connection_proxy) -> None:
        if time.monotonic() - connection_record.info.get("answered_at", 0.0) < LIVENESS_BYPASS_SECONDS:
            return
        try:
            with green.bounded("liveness", seconds):
                _select_one(dbapi_connection)
        except green.DatabaseTimeout:
            raise
        except psycopg2.Error as error:
            raise DisconnectionError(f"liveness check failed: {error}".strip()) from error

    return check


def _select_one(dbapi_connection) -> None:
    """`SELECT 1` outside a transaction, so the check leaves no BEGIN behind."""
    dbapi_connection.autocommit = True
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SELECT 1")
    finally:
        cursor.close()
        if not dbapi_connection.closed:
            dbapi_connection.autocommit = False


def fetch(connection: Connection, sql: str, parameters: dict) -> tuple[list[str], list[tuple]]:
    """A read's column names and rows, on `connection`'s own DBAPI cursor.

    `exec_driver_sql` makes an execution context and a result object for every statement:
    13 % of a worker's busy time on one-row reads (BENCHMARKS.md, "Speed"), for features a
    fixed SELECT turned into dicts does not use. What it must keep is kept: a psycopg2 error
    goes through the Connection's own handler, so it is raised as SQLAlchemy's `DBAPIError`
    (errors.py answers it), and a disconnect invalidates the connection and the pool as for
    any statement (`connection_invalidated`, which `db.read()` retries on). That handler is
    SQLAlchemy's private method: SQLAlchemy is pinned exactly, and tests/test_db.py fails
    if it changes.
    """
    cursor = connection.connection.cursor()
    try:
        cursor.execute(sql, parameters)
        return [column[0] for column in cursor.description], cursor.fetchall()
    except psycopg2.Error as error:
        connection._handle_dbapi_exception(error, sql, parameters, cursor, None)
    finally:
        cursor.close()


# Every Engines of this process, so that a fork marks them all as made elsewhere: a flag
# set at fork instead of an os.getpid() system call on every request (BENCHMARKS.md, "Speed").
_every_engines: weakref.WeakSet = weakref.WeakSet()


def _after_fork() -> None:
    for engines in list(_every_engines):
        engines._made_here = False


os.register_at_fork(after_in_child=_after_fork)


class Engines:
    """One app's engines, made once per process (after fork) from the app's settings: the
    primary's, and a replica's for read-only sessions when DATABASE_READ_URL is set."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._primary: Engine | None = None
        self._replica: Engine | None = None
        self._made_here = False  # made in this process; a fork sets it back (_after_fork)
        _every_engines.add(self)

    @property
    def primary(self) -> Engine:
        if not self._made_here:
            self._make()
        return self._primary

    @property
    def reads(self) -> Engine:
        """The replica's engine (its own pool, same settings), or the primary's without one."""
        if not self._made_here:
            self._make()
        return self._replica

    def _make(self) -> None:
        for inherited in (self._primary, self._replica):
            if inherited is not None:
                # Inherited from the parent (e.g. --preload): never touch its sockets here.
                inherited.dispose(close=False)
        green_callback = green.choose(self.settings)
        self._primary = build_engine(embedded.database_url(self.settings), self.settings)
        replica_url = self.settings.database_read_url
        self._replica = build_engine(replica_url, self.settings) if replica_url else self._primary
        self._made_here = True
        metrics.POOL_SIZE.set(self._primary.pool.size())
        metrics.read_at_publish(metrics.POOL_CHECKED_OUT, self._primary.pool.checkedout)
        log.info(
            "worker %d: mode=%s wait_callback=%s pool_size=%d max_overflow=%d pool_timeout=%ss reads=%s",
            os.getpid(),
            "gevent" if green.socket_is_green() else "sync",
            "on" if green_callback else "off",
            self.settings.pool_size,
            self.settings.max_overflow,
            self.settings.pool_timeout,
            "replica" if replica_url else "primary",
        )

    def dispose(self) -> None:
        for engine in {self._primary, self._replica} - {None}:
            engine.dispose()

    def pool_status(self) -> dict:
        """What /stats shows about this worker's pool. Takes no connection."""
        pool = self.primary.pool
        return {
            "size": pool.size(),
            "max_overflow": self.settings.max_overflow,
            "timeout": pool.timeout(),
            "checked_out": pool.checkedout(),
            "checked_in": pool.checkedin(),
            "overflow_in_use": max(pool.overflow(), 0),
        }

    def replica_status(self) -> dict | None:
        """The read replica's replication lag, for /stats; None without DATABASE_READ_URL.
        Lag is 0 while the replica has replayed all it received, else the age of the last
        transaction it replayed (the usual measure: an idle primary does not count as lag)."""
        if not self.settings.database_read_url:
            return None
        try:
            with green.bounded("liveness", self.settings.connect_timeout), self.reads.connect() as conn:
                in_recovery, lag = conn.exec_driver_sql(REPLICA_LAG_SQL).one()
        except Exception as error:  # /stats answers whatever the replica does
            return {"reachable": False, "error": first_line(getattr(error, "orig", None) or error)}
        return {"reachable": True, "in_recovery": in_recovery, "lag_seconds": None if lag is None else float(lag),
                "pool_checked_out": self.reads.pool.checkedout()}

    def check_server(self, workers: int) -> None:
        """Warn, with the arithmetic, when the pools can ask for more connections than the
        server allows; behind PgBouncer, when the database's statement_timeout is not ours."""
        settings = self.settings
        try:
            with self.primary.connect() as conn:
                server = dict(conn.execute(text(SERVER_SETTINGS_SQL)).all())
        except Exception as error:  # the server may be down at start; requests will answer 503
            log.warning("could not check the server's settings: %s", error.__class__.__name__)
            return
        if settings.pgbouncer:
            # The pools hold PgBouncer's client connections, not the server's: no budget here.
            if server["statement_timeout"] != settings.statement_timeout_ms:
                log.warning(
                    "statement timeout differs: the database says %d ms, DB_STATEMENT_TIMEOUT %d ms; "
                    "run python seed.py with DB_PGBOUNCER=1 (then PgBouncer's RECONNECT)",
                    server["statement_timeout"], settings.statement_timeout_ms,
                )
            return
        wanted = sizing.app_connections(1, workers, settings.pool_size, settings.max_overflow)
        reserved = server["superuser_reserved_connections"] + server.get("reserved_connections", 0)
        available = server["max_connections"] - reserved
        if wanted > available:
            log.warning(
                "pool may exceed the server: %d workers x (pool_size %d + max_overflow %d) = %d "
                "> max_connections %d - reserved %d = %d; lower DB_POOL_SIZE or WEB_CONCURRENCY "
                "(python -m greenflask.sizing for several hosts)",
                workers, settings.pool_size, settings.max_overflow, wanted,
                server["max_connections"], reserved, available,
            )
