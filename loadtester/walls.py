"""Which of the server's limits a burst met, named from the server's own GET /stats: its
waves of 2xx answers, its 503s and the connections it closed unanswered."""

import itertools

from loadtester.report import Report


def name_the_wall(waves: list[int], stats: dict | None, route: str) -> str | None:
    """Which of the server's limits a burst's waves of 2xx match, from its GET /stats:
    'waves of 1000: the worker's connection limit (GUNICORN_WORKER_CONNECTIONS 1000)'.
    None for one wave, or a server without /stats. A wave may come split in two by a few
    early answers, so the sums of neighbours count too."""
    if len(waves) < 2 or not stats:
        return None
    sizes = set(waves) | {first + second for first, second in itertools.pairwise(waves)}
    connections, pool = stats.get("connections") or {}, stats.get("pool") or {}
    workers = connections.get("workers") or 1
    per = f" x {workers} workers" if workers > 1 else ""
    candidates = []
    if connections.get("limit") == 1:
        candidates.append((workers, f"the sync worker answers one request at a time{per}"))
    elif connections.get("limit"):
        candidates.append((connections["limit"] * workers,
                           f"the worker's connection limit (GUNICORN_WORKER_CONNECTIONS {connections['limit']}{per})"))
    if route == "postgres" and not stats.get("wait_callback"):
        candidates.append((workers, f"pg_sleep blocks the worker: no wait callback (PSYCOGREEN){per}"))
    if route == "postgres" and pool.get("size"):
        most = pool["size"] + pool.get("max_overflow", 0)
        candidates.append((most * workers, f"the pool (DB_POOL_SIZE {pool['size']} + DB_MAX_OVERFLOW "
                                           f"{pool.get('max_overflow', 0)}{per})"))
    for size, name in candidates:
        if any(abs(seen - size) <= max(2, size // 100) for seen in sizes):
            return f"waves of {size}: {name}"
    known = ", ".join(f"{size}" for size, _ in candidates) or "none"
    if stats.get("pgbouncer"):
        return (f"waves of about {max(waves)}: none of the app's limits ({known}); behind PgBouncer, its "
                "default_pool_size?")
    return (f"uneven waves, none of the server's limits ({known}): answers spread by CPU, the server's and this "
            "client's (docs/scaling.md)")


def name_the_503s(error_codes: dict, stats: dict | None) -> str | None:
    """'503 pool_exhausted x 297: waited past DB_POOL_TIMEOUT (3 s) for one of the pool's 100 connections'."""
    count = error_codes.get("pool_exhausted")
    pool = (stats or {}).get("pool")
    if not count or not pool:
        return None
    return (f"pool_exhausted x {count}: waited past DB_POOL_TIMEOUT ({pool['timeout']:g} s) for one of the "
            f"pool's {pool['size']} connections")


def name_the_disconnects(errors: dict, stats: dict | None) -> str | None:
    """Connections the server closed unanswered: gunicorn's gevent worker gives a connection's
    request `keepalive` seconds to arrive once it starts reading, and closes it after."""
    count = errors.get("disconnected")
    keepalive = ((stats or {}).get("connections") or {}).get("keepalive")
    if not count or keepalive is None:
        return None
    return (f"disconnected x {count}: closed unanswered, their request not read within gunicorn's keepalive "
            f"({keepalive} s, GUNICORN_KEEPALIVE)")


def name_walls(report: Report, stats: dict | None) -> str | None:
    """The limits a burst met, from its waves, its 503s and its disconnects, in one line; None for none."""
    named = [name_the_wall(report.ok_waves, stats, report.name), name_the_503s(report.error_codes, stats),
             name_the_disconnects(report.errors, stats)]
    return "; ".join(name for name in named if name) or None
