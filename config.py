"""Settings read from the environment (12-factor), with defaults that demo well.

Every setting is listed in the README's settings table; `Settings.describe()` is what the
server prints at start-up.
"""

import math
import os
import socket
from dataclasses import asdict, dataclass


def env_number(name: str, default, parse=int, minimum=0):
    """A number from the environment, or `default` when unset; exit with a clear line if bad."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    kind = "an integer" if parse is int else "a number"
    try:
        value = parse(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not {kind}") from None
    if not math.isfinite(value) or value < minimum:
        raise SystemExit(f"{name}={raw} must be {kind} >= {minimum}")
    return value


def _env_green_mode(name: str = "PSYCOGREEN") -> str:
    """'auto' (default), 'on' or 'off'. The original demo used PSYCOGREEN=true."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("1", "true", "yes", "on"):
        return "on"
    if raw in ("0", "false", "no", "off"):
        return "off"
    raise SystemExit(f"{name}={raw!r}: use 1 (force on), 0 (off) or leave unset (auto)")


def env_flag(name: str, default: bool) -> bool:
    """1/true/yes/on or 0/false/no/off; `default` when unset."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name}={raw!r}: use 1 or 0")


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    database_read_url: str | None
    pool_size: int
    max_overflow: int
    pool_timeout: float
    pool_recycle: int
    connect_timeout: float
    statement_timeout_ms: int
    pgbouncer: bool
    application_name: str
    psycogreen: str
    sleep_max_seconds: float
    max_body_bytes: int
    metrics: bool
    loop_block_warn_ms: int
    access_log: bool
    host_name: str

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            database_url=os.environ.get("DATABASE_URL") or None,
            # A streaming replica for read-only sessions; writes always go to DATABASE_URL.
            database_read_url=os.environ.get("DATABASE_READ_URL") or None,
            # One worker must hold `python loadtest.py 100` in one wave: 100 connections,
            # fixed size (overflow connections are closed on return, which makes waves).
            pool_size=env_number("DB_POOL_SIZE", 100, minimum=1),
            max_overflow=env_number("DB_MAX_OVERFLOW", 0),
            # Waiting longer than this for a connection answers 503 instead of hanging.
            pool_timeout=env_number("DB_POOL_TIMEOUT", 3.0, float),
            pool_recycle=env_number("DB_POOL_RECYCLE", 1800),
            # Bounds connecting and the liveness check of a pooled connection (green.py).
            connect_timeout=env_number("DB_CONNECT_TIMEOUT", 5.0, float, minimum=0.1),
            # Above SLEEP_MAX_SECONDS, so the longest allowed pg_sleep still answers.
            statement_timeout_ms=env_number("DB_STATEMENT_TIMEOUT", 65_000),
            # Behind PgBouncer (transaction pooling): statement_timeout is a database setting
            # (seed.py), not a startup parameter, which PgBouncer refuses.
            pgbouncer=env_flag("DB_PGBOUNCER", False),
            application_name=os.environ.get("DB_APPLICATION_NAME") or "greenflask",
            psycogreen=_env_green_mode(),
            sleep_max_seconds=env_number("SLEEP_MAX_SECONDS", 60.0, float),
            max_body_bytes=env_number("MAX_BODY_BYTES", 64 * 1024, minimum=1),
            metrics=env_flag("METRICS", True),
            # gevent workers only; 0 turns the detector off.
            loop_block_warn_ms=env_number("LOOP_BLOCK_WARN_MS", 100),
            access_log=env_flag("ACCESS_LOG", False),
            # Which host answered, in /stats (deploy/cluster.py names its hosts host1, host2...).
            host_name=os.environ.get("HOST_NAME") or socket.gethostname(),
        )

    def describe(self) -> str:
        """One line of every setting, with any password in the URL hidden."""
        shown = asdict(self)
        shown["database_url"] = _hide_password(self.database_url) or "(embedded)"
        shown["database_read_url"] = _hide_password(self.database_read_url) or "(database_url)"
        return " ".join(f"{key}={value}" for key, value in shown.items())


def _hide_password(url: str | None) -> str | None:
    if not url:
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
