"""One session per request, shaped like flaskr's db.py.

`init_app(app, settings)` gives the app its engines and registers the teardown.
`read_session()` and `write_session()` open the request's session on first use (flaskr's
`get_db`); `close_session()` closes it on every path (flaskr's `close_db`). `read()` runs a
read-only query, once more on a new connection if the first met a dead one, and
`check_reachable()` is /healthz, and `flask --app app expire-idempotency-keys` the command
an operator schedules to delete old keys. The engines, their pools and the wait callback are made
per process, after fork, in `greenflask/engine.py`.
"""

import logging

import click
from flask import Flask, current_app, g
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

import models
from greenflask import green, health, settings
from greenflask.engine import Engines
from greenflask.logs import first_line
from greenflask.settings import Settings

log = logging.getLogger("greenflask.db")

EXTENSION_KEY = "greenflask_engines"
# /healthz answers 200 without a query while the database answered within this window.
# A host cut from its database leaves the balancer's rotation up to this much later.
HEALTHY_WINDOW_SECONDS = 3


def init_app(app: Flask, app_settings: Settings) -> None:
    app.extensions[EXTENSION_KEY] = Engines(app_settings)
    app.teardown_appcontext(close_session)
    app.cli.add_command(expire_idempotency_keys_command)


def engines(app: Flask | None = None) -> Engines:
    """The app's engines (this process's, made on first use)."""
    return (app or current_app).extensions[EXTENSION_KEY]


def read_session() -> Session:
    """The request's session for routes that only read: each SELECT is its own transaction
    (except behind PgBouncer, see `_request_session`).

    In a transaction psycopg2 sends BEGIN before the first statement and the session's close
    sends ROLLBACK; a read-only request gains nothing from them. Setting the driver
    connection's `autocommit` sends nothing (SQLAlchemy's isolation_level="AUTOCOMMIT" would
    send a SET on checkout and on return); the pool's checkin listener puts it back.
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
    engine = engines().reads if read_only else engines().primary
    g.db_session, g.db_read_only = Session(engine), read_only
    # Behind PgBouncer (transaction mode) every transaction queues for a server connection
    # on its own: a request's statements in autocommit would queue once each, and under
    # load every request would wait for all the others' first statements before its second.
    # In one transaction the request keeps its server connection from first to last.
    if read_only and not settings.current().pgbouncer:
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
    within HEALTHY_WINDOW_SECONDS with no failure since (greenflask/health.py says why)."""
    if health.answered_within(HEALTHY_WINDOW_SECONDS):
        return
    with green.bounded("liveness", settings.current().connect_timeout):
        read(models.ping)


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


@click.command("expire-idempotency-keys")
@click.option("--batch", default=1000, show_default=True, type=click.IntRange(1, 100_000),
              help="Keys deleted per transaction.")
def expire_idempotency_keys_command(batch: int) -> None:
    """Delete Idempotency-Keys older than IDEMPOTENCY_KEY_HOURS, a small batch per transaction.

    Schedule it (a systemd timer or cron, hourly); docs/operations.md has the unit. A key
    sent again after it expired makes a new todo.
    """
    hours = settings.current().idempotency_key_hours
    total = 0
    while True:
        with Session(engines().primary) as session:
            deleted = models.expire_idempotency_keys(session, hours, batch)
            session.commit()
        total += deleted
        if deleted < batch:
            break
    click.echo(f"deleted {total} idempotency keys older than {hours:g} h")
