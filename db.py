"""The database side of the app: the wait callback, the engine and its pool, one session per request.

Shaped like flaskr's db.py: `init_app(app, settings)` registers the teardown;
`read_session()` and `write_session()` open the request's session on first use (flaskr's
`get_db`), and `close_session()` closes it on every path (flaskr's `close_db`).

Order matters under gunicorn's gevent worker: the worker monkey-patches *after* `post_fork`
and (with --preload) after the app module was imported, so nothing here connects or
chooses a wait callback at import time. Each app's `Database` makes its engine lazily, once
per process, the first time it is needed; gunicorn's `post_worker_init` hook asks for it
early so that the mode and the pool are logged at start.
"""

import logging
import math
import os
import sys
import time

import psycopg2
import psycopg2.extensions
from flask import Flask, current_app, g
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import Session

import embedded_pg
import green
import health
import metrics
import models
import sizing
from config import Settings
from errors import first_line

log = logging.getLogger("greenflask.db")

EXTENSION_KEY = "greenflask_db"
# Half-open TCP connections: the kernel finds the vanished peer of an idle pooled connection
# after about 30 s (15 s idle, then 3 probes 5 s apart), and one that stops acknowledging
# what we sent after 15 s (tcp_user_timeout), so the next liveness check fails at once
# instead of waiting out its bound. libpq ignores both on a unix socket (the embedded server).
TCP_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 15, "keepalives_interval": 5, "keepalives_count": 3}
TCP_USER_TIMEOUT_MS = 15_000
# A connection back in the pool for less than this is taken as alive and gets no liveness
# check (HikariCP's aliveBypassWindowMs, same value). Under load that is nearly every
# checkout: one round trip fewer per request. A connection that died within the window
# fails its first statement instead, and `read()` retries read-only work once.
LIVENESS_BYPASS_SECONDS = 0.5
REPLICA_LAG_SQL = (
    "SELECT pg_is_in_recovery(), CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0"
    " ELSE EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) END"
)
# /healthz answers 200 without a query while the database answered within this window.
# A host cut from its database leaves the balancer's rotation up to this much later.
HEALTHY_WINDOW_SECONDS = 3


# --- the wait callback -------------------------------------------------------------------


def socket_is_green() -> bool:
    """True when gevent has monkey-patched `socket` in this process."""
    if "gevent" not in sys.modules:
        return False
    from gevent import monkey

    return monkey.is_module_patched("socket")


def install_wait_callback(settings: Settings) -> bool:
    """The bounded green callback (green.py) when PSYCOGREEN is on, or auto under gevent.

    Otherwise none: libpq blocks the process while it waits, which is the point of the
    sync worker and of the PSYCOGREEN=0 demonstration.
    """
    mode = settings.psycogreen
    if mode == "on" or (mode == "auto" and socket_is_green()):
        green.install(green.Bounds.from_settings(settings))
        return True
    psycopg2.extensions.set_wait_callback(None)
    return False


def wait_callback_installed() -> bool:
    return psycopg2.extensions.get_wait_callback() is not None


# --- engine and pool ---------------------------------------------------------------------


def build_engine(url: str, settings: Settings) -> Engine:
    """The engine with every pool setting spelled out (see the README's pool arithmetic)."""
    engine = create_engine(
        make_url(url).set(drivername=embedded_pg.DRIVER),
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
        # connection to PgBouncer fails the first statement, which `read()` retries.
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
    _note_answered(dbapi_connection, connection_record)
    if dbapi_connection is not None and not dbapi_connection.closed:  # None: invalidated
        health.note_answer()
    _driver_autocommit_off(dbapi_connection, connection_record)


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


def database_url(settings: Settings) -> str:
    """DATABASE_URL when set; otherwise the embedded server's database (started if needed)."""
    return settings.database_url or embedded_pg.database_url()


class Database:
    """One app's engines, made once per process (after fork) from the app's settings: the
    primary's, and a replica's for read-only sessions when DATABASE_READ_URL is set."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._engine: Engine | None = None
        self._read_engine: Engine | None = None
        self._pid: int | None = None

    @property
    def engine(self) -> Engine:
        if self._pid != os.getpid():
            self._make_engines()
        return self._engine

    @property
    def read_engine(self) -> Engine:
        """The replica's engine (its own pool, same settings), or the primary's without one."""
        if self._pid != os.getpid():
            self._make_engines()
        return self._read_engine

    def _make_engines(self) -> None:
        for inherited in (self._engine, self._read_engine):
            if inherited is not None:
                # Inherited from the parent (e.g. --preload): never touch its sockets here.
                inherited.dispose(close=False)
        green_callback = install_wait_callback(self.settings)
        self._engine = build_engine(self.url(), self.settings)
        replica_url = self.settings.database_read_url
        self._read_engine = build_engine(replica_url, self.settings) if replica_url else self._engine
        self._pid = os.getpid()
        metrics.POOL_SIZE.set(self._engine.pool.size())
        log.info(
            "worker %d: mode=%s wait_callback=%s pool_size=%d max_overflow=%d pool_timeout=%ss reads=%s",
            self._pid,
            "gevent" if socket_is_green() else "sync",
            "on" if green_callback else "off",
            self.settings.pool_size,
            self.settings.max_overflow,
            self.settings.pool_timeout,
            "replica" if replica_url else "primary",
        )

    def url(self) -> str:
        return database_url(self.settings)

    def pool_status(self) -> dict:
        """What /stats shows about this worker's pool. Takes no connection."""
        pool = self.engine.pool
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
            with green.bounded("liveness", self.settings.connect_timeout), self.read_engine.connect() as conn:
                in_recovery, lag = conn.exec_driver_sql(REPLICA_LAG_SQL).one()
        except Exception as error:  # /stats answers whatever the replica does
            return {"reachable": False, "error": first_line(getattr(error, "orig", None) or error)}
        return {"reachable": True, "in_recovery": in_recovery, "lag_seconds": None if lag is None else float(lag),
                "pool_checked_out": self.read_engine.pool.checkedout()}

    def check_server(self, workers: int) -> None:
        """Warn, with the arithmetic, when the pools can ask for more connections than the
        server allows; behind PgBouncer, when the database's statement_timeout is not ours."""
        settings = self.settings
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    text(
                        "SELECT name, setting::int FROM pg_settings WHERE name IN ('max_connections', "
                        "'superuser_reserved_connections', 'reserved_connections', 'statement_timeout')"
                    )
                )
                server = dict(rows.all())
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
                "(python sizing.py for several hosts)",
                workers, settings.pool_size, settings.max_overflow, wanted,
                server["max_connections"], reserved, available,
            )


def init_app(app: Flask, settings: Settings) -> None:
    app.extensions[EXTENSION_KEY] = Database(settings)
    app.teardown_appcontext(close_session)


def database(app: Flask | None = None) -> Database:
    return (app or current_app).extensions[EXTENSION_KEY]


# --- one session per request -------------------------------------------------------------


def read_session() -> Session:
    """The request's session for routes that only read: each SELECT is its own transaction
    (except behind PgBouncer, see `_request_session`).

    In a transaction psycopg2 sends BEGIN before the first statement and the session's close
    sends ROLLBACK; a read-only request gains nothing from them. Setting the driver
    connection's `autocommit` sends nothing (SQLAlchemy's isolation_level="AUTOCOMMIT" would
    send a SET on checkout and on return); it is put back when the connection returns to
    the pool.
    """
    return _request_session(read_only=True)


def write_session() -> Session:
    """The request's session for routes that write: one transaction, committed once by the
    route, rolled back at teardown otherwise."""
    return _request_session(read_only=False)


def _request_session(read_only: bool) -> Session:
    """One session per request, of one kind: a write after a read would otherwise run in
    autocommit and `commit()` would do nothing, so a mismatch fails loudly."""
    if "db_session" in g:
        if g.db_read_only != read_only:
            opened = "read-only" if g.db_read_only else "write"
            raise RuntimeError(f"this request already opened a {opened} session; ask for one kind per request")
        return g.db_session
    # In g before its connection is touched, so teardown closes it whatever happens next.
    engine = database().read_engine if read_only else database().engine
    g.db_session, g.db_read_only = Session(engine), read_only
    # Behind PgBouncer (transaction mode) every transaction queues for a server connection
    # on its own: a request's statements in autocommit would queue once each, and under
    # load every request would wait for all the others' first statements before its second.
    # In one transaction the request keeps its server connection from first to last.
    if read_only and not database().settings.pgbouncer:
        g.db_session.connection().connection.driver_connection.autocommit = True
    return g.db_session


def read(query, *args):
    """`query(read_session(), *args)`, run once more on a new connection if the first try
    failed on a dead one (a backend terminated, a server restarted within the liveness
    bypass window).

    Safe because the query only reads and nothing has been sent to the client yet; SQLAlchemy's
    disconnect handling has invalidated the pool, so the second try gets a new connection.
    A bound that passed (green.DatabaseTimeout) is not retried: the host is not answering.
    """
    try:
        return query(read_session(), *args)
    except DBAPIError as error:
        if not error.connection_invalidated or isinstance(error.orig, green.DatabaseTimeout):
            raise
        log.info("read retried on a new connection after: %s", first_line(error.orig))
        close_session()
        return query(read_session(), *args)


def check_reachable() -> None:
    """Return when this worker can reach the database; raise (a 503) when it cannot.
    Asks with `SELECT 1` under the liveness bound unless the database answered this worker
    within HEALTHY_WINDOW_SECONDS with no failure since (health.py says why)."""
    if health.answered_within(HEALTHY_WINDOW_SECONDS):
        return
    with green.bounded("liveness", database().settings.connect_timeout):
        read(models.ping)


def _driver_autocommit_off(dbapi_connection, connection_record) -> None:
    if dbapi_connection is not None and not dbapi_connection.closed and dbapi_connection.autocommit:
        dbapi_connection.autocommit = False


def close_session(error: BaseException | None = None) -> None:
    """Teardown: close the request's session on every path; uncommitted work rolls back."""
    session = g.pop("db_session", None)
    g.pop("db_read_only", None)
    if session is None:
        return
    try:
        session.close()
    except Exception:  # a broken connection must not turn the answer into a 500
        log.warning("closing the session failed; its connection was discarded", exc_info=True)
    metrics.POOL_CHECKED_OUT.set(database().engine.pool.checkedout())
