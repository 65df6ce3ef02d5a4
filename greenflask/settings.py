"""Every setting, read from the environment (12-factor) in this module and nowhere else.

`Settings` is the app's (docs/reference.md has the table), `Server` gunicorn's own, and
`Tools` the load tester's, the cluster's and the benchmarks'. A bad value stops the process with one
line naming the variable. `Settings.describe()` is what the server prints at start-up, and
a request reaches its app's settings one way: `current()`.
"""

import math
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from greenflask import PROJECT_DIR

CONFIG_KEY = "GREENFLASK"  # the app's Settings in app.config
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_text(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, "").strip() or default


def env_number(name: str, default, parse=int, minimum=0):
    """A number from the environment, or `default` when unset; exit with a clear line if bad."""
    raw = env_text(name)
    if raw is None:
        return default
    kind = "an integer" if parse is int else "a number"
    try:
        value = parse(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not {kind}") from None
    if not math.isfinite(value) or value < minimum:
        raise SystemExit(f"{name}={raw} must be {kind} >= {minimum}")
    return value


def env_flag(name: str, default: bool) -> bool:
    """1/true/yes/on or 0/false/no/off; `default` when unset."""
    raw = (env_text(name) or "").lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise SystemExit(f"{name}={raw!r}: use 1 or 0")


def _env_green_mode(name: str = "PSYCOGREEN") -> str:
    """'auto' (default), 'on' or 'off'. The original demo used PSYCOGREEN=true."""
    raw = (env_text(name) or "auto").lower()
    if raw == "auto":
        return "auto"
    if raw in _TRUE:
        return "on"
    if raw in _FALSE:
        return "off"
    raise SystemExit(f"{name}={raw!r}: use 1 (force on), 0 (off) or leave unset (auto)")


def _env_choice(name: str, choices: tuple[str, ...]) -> str:
    """One of `choices` (the first when unset)."""
    raw = (env_text(name) or choices[0]).lower()
    if raw not in choices:
        raise SystemExit(f"{name}={raw!r}: use {' or '.join(choices)}")
    return raw


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    database_read_url: str | None
    passfile: str | None
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
    metrics_dir: str | None
    loop_block_warn_ms: int
    access_log: bool
    log_format: str
    host_name: str
    embedded_pgdata: Path
    embedded_max_connections: int
    idempotency_key_hours: float

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            database_url=env_text("DATABASE_URL"),
            # A streaming replica for read-only sessions; writes always go to DATABASE_URL.
            database_read_url=env_text("DATABASE_READ_URL"),
            # libpq's own variable, read by libpq: the password in a file (mode 600), not in the URL.
            passfile=env_text("PGPASSFILE"),
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
            application_name=env_text("DB_APPLICATION_NAME", "greenflask"),
            psycogreen=_env_green_mode(),
            sleep_max_seconds=env_number("SLEEP_MAX_SECONDS", 60.0, float),
            max_body_bytes=env_number("MAX_BODY_BYTES", 64 * 1024, minimum=1),
            metrics=env_flag("METRICS", True),
            # prometheus_client's own variable; gunicorn.conf.py makes one per start when unset.
            metrics_dir=env_text("PROMETHEUS_MULTIPROC_DIR"),
            # gevent workers only; 0 turns the detector off.
            loop_block_warn_ms=env_number("LOOP_BLOCK_WARN_MS", 100),
            access_log=env_flag("ACCESS_LOG", False),
            log_format=_env_choice("LOG_FORMAT", ("text", "json")),
            # Which host answered, in /stats (deploy/cluster.py names its hosts host1, host2...).
            host_name=env_text("HOST_NAME") or socket.gethostname(),
            embedded_pgdata=Path(env_text("EMBEDDED_PGDATA") or PROJECT_DIR / ".pgdata"),
            # Room for 4 workers at the default pool (4 x 100) plus the tests' own servers.
            embedded_max_connections=env_number("EMBEDDED_MAX_CONNECTIONS", 500, minimum=10),
            # `flask --app app expire-idempotency-keys` deletes keys older than this.
            idempotency_key_hours=env_number("IDEMPOTENCY_KEY_HOURS", 24.0, float),
        )

    def describe(self) -> str:
        """One line of every setting, with any password in the URL hidden."""
        shown = asdict(self)
        shown["database_url"] = hide_password(self.database_url) or "(embedded)"
        shown["database_read_url"] = hide_password(self.database_read_url) or "(database_url)"
        return " ".join(f"{key}={value}" for key, value in shown.items())


@dataclass(frozen=True)
class Server:
    """gunicorn's settings (gunicorn.conf.py), apart from the app's: a script that only needs
    the database (seed.py) does not stop on a bad one."""

    web_concurrency: int
    gunicorn_timeout: int
    worker_connections: int
    backlog: int
    keepalive: int

    @classmethod
    def from_env(cls) -> "Server":
        return cls(
            web_concurrency=env_number("WEB_CONCURRENCY", 1, minimum=1),
            # The sync worker is killed when one request holds it longer than this; the gevent
            # worker only when its event loop is blocked this long.
            gunicorn_timeout=env_number("GUNICORN_TIMEOUT", 120, minimum=1),
            # gunicorn's default is 1,000: a burst past it comes back in waves of 1,000.
            worker_connections=env_number("GUNICORN_WORKER_CONNECTIONS", 10_000, minimum=1),
            # Connections the kernel holds for the workers to accept (capped by
            # net.core.somaxconn); gunicorn's default is 2,048.
            backlog=env_number("GUNICORN_BACKLOG", 4096, minimum=1),
            # Seconds an idle connection stays open, and also (in the gevent worker) how long
            # a connection's request may take to arrive once it is read: gunicorn's 2 s drops
            # the late ones of a 10,000 burst unanswered. Above HAProxy's idle 10 s on purpose.
            keepalive=env_number("GUNICORN_KEEPALIVE", 15, minimum=0),
        )


@dataclass(frozen=True)
class Tools:
    """The settings of the project's tools, not of the app."""

    loadtest_server_log: Path  # where `loadtest.py --matrix` writes its servers' output
    cluster_dir: Path  # deploy/cluster.py: state, generated configs, logs
    cluster_net: str  # deploy/cluster.py: the first two octets of its networks
    cluster_rule_windows: float  # deploy/cluster.py --monitoring: its alert windows times this (tests: < 1)
    bench_runs: int
    bench_seconds: tuple[float, ...]
    bench_original_seconds: float
    bench_wrk_seconds: int
    bench_output: Path
    bench_dsn: str | None  # the floor's and the peer's database, set by the benchmarks
    bench_pool_size: int
    bench_wrk2: str | None  # bench/client.py: the wrk2 binary (else `wrk2` on PATH)
    bench_client_seconds: float
    bench_client_rates: tuple[int, ...]
    bench_client_searches: int

    @classmethod
    def from_env(cls) -> "Tools":
        seconds = env_text("BENCH_SECONDS", "1,2")
        try:
            bench_seconds = tuple(float(value) for value in seconds.split(","))
        except ValueError:
            raise SystemExit(f"BENCH_SECONDS={seconds!r}: use seconds separated by commas, e.g. 1,2") from None
        rates = env_text("BENCH_CLIENT_RATES", "500,1000,1500,2000,2500,3000,4000")
        try:
            client_rates = tuple(int(value) for value in rates.split(","))
        except ValueError:
            raise SystemExit(f"BENCH_CLIENT_RATES={rates!r}: use rates separated by commas, e.g. 1000,2000") from None
        return cls(
            loadtest_server_log=Path(env_text("LOADTEST_SERVER_LOG") or PROJECT_DIR / "loadtest-matrix.log"),
            cluster_dir=Path(env_text("CLUSTER_DIR", "/tmp/greenflask-cluster")),
            cluster_net=env_text("CLUSTER_NET", "10.77"),
            cluster_rule_windows=env_number("CLUSTER_RULE_WINDOWS", 1.0, float),
            bench_runs=env_number("BENCH_RUNS", 3, minimum=1),
            bench_seconds=bench_seconds,
            bench_original_seconds=env_number("BENCH_ORIGINAL_SECONDS", 5.0, float),
            bench_wrk_seconds=env_number("BENCH_WRK_SECONDS", 8, minimum=1),
            bench_output=Path(env_text("BENCH_OUTPUT") or PROJECT_DIR / "BENCHMARKS.md"),
            bench_dsn=env_text("BENCH_DSN"),
            bench_pool_size=env_number("BENCH_POOL_SIZE", 20, minimum=1),
            bench_wrk2=env_text("BENCH_WRK2"),
            bench_client_seconds=env_number("BENCH_CLIENT_SECONDS", 5.0, float),
            bench_client_rates=client_rates,
            bench_client_searches=env_number("BENCH_CLIENT_SEARCHES", 5, minimum=1),
        )


def current() -> Settings:
    """The settings of the app handling this request."""
    from flask import current_app  # here, not at the top: gunicorn.conf.py imports this module

    return current_app.config[CONFIG_KEY]


def hide_password(url: str | None) -> str | None:
    if not url:
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
