"""The pool arithmetic for a planned deployment, and whether it fits the server.

    python -m greenflask.sizing --hosts 4 --workers 2                     # straight to PostgreSQL
    python -m greenflask.sizing --hosts 4 --workers 2 --pgbouncer-pool 20  # through PgBouncer

Every app worker holds a pool of its own, so hosts x workers x (pool_size + max_overflow)
connections can be open at once. Straight to PostgreSQL they must fit in max_connections
less the reserved ones; through PgBouncer (transaction mode) they are PgBouncer's clients
(max_client_conn), and only PgBouncer's server pool counts against max_connections. The
defaults are this environment's settings (DB_POOL_SIZE, DB_MAX_OVERFLOW, WEB_CONCURRENCY).
Exit status 0 when the plan fits, 1 when it does not.
"""

import sys

import click

from greenflask.settings import Server, Settings


def app_connections(hosts: int, workers: int, pool_size: int, max_overflow: int) -> int:
    """The most connections the app's pools can hold at once."""
    return hosts * workers * (pool_size + max_overflow)


def budget_lines(hosts, workers, pool_size, max_overflow, max_connections, reserved, pgbouncer_pool,
                 max_client_conn) -> tuple[list[str], bool]:
    """The arithmetic as lines of text, and whether the plan fits."""
    wanted = app_connections(hosts, workers, pool_size, max_overflow)
    available = max_connections - reserved
    lines = [f"app: {hosts} hosts x {workers} workers x (pool_size {pool_size} + max_overflow {max_overflow})"
             f" = {wanted} connections at most",
             f"PostgreSQL: max_connections {max_connections} - reserved {reserved} = {available} for the app"]
    if pgbouncer_pool is None:
        fits = wanted <= available
        if fits:
            lines.append(f"straight to PostgreSQL: {wanted} <= {available}: fits")
        else:
            most = available // (hosts * workers) - max_overflow
            lines.append(f"straight to PostgreSQL: {wanted} > {available}: does NOT fit; lower DB_POOL_SIZE to "
                         f"{max(most, 0)} or fewer, or put PgBouncer in front (--pgbouncer-pool)")
        return lines, fits
    clients_fit = wanted <= max_client_conn
    servers_fit = pgbouncer_pool <= available
    lines.append(f"PgBouncer clients: {wanted} {'<=' if clients_fit else '>'} max_client_conn {max_client_conn}"
                 f": {'fits' if clients_fit else 'does NOT fit; raise max_client_conn'}")
    lines.append(f"PgBouncer server pool: default_pool_size {pgbouncer_pool} {'<=' if servers_fit else '>'} {available}"
                 f": {'fits' if servers_fit else 'does NOT fit; lower default_pool_size'}")
    lines.append(f"at most {min(pgbouncer_pool, wanted)} statements run at once; a request that holds a server"
                 f" connection (a transaction, a pg_sleep) makes the others wait in PgBouncer")
    return lines, clients_fit and servers_fit


@click.command()
@click.option("--hosts", default=1, show_default=True, type=click.IntRange(1), help="App hosts.")
@click.option("--workers", type=click.IntRange(1), help="gunicorn workers per host [WEB_CONCURRENCY or 1].")
@click.option("--pool-size", type=click.IntRange(1), help="Pool per worker [DB_POOL_SIZE or 100].")
@click.option("--max-overflow", type=click.IntRange(0), help="Overflow per worker [DB_MAX_OVERFLOW or 0].")
@click.option("--max-connections", default=100, show_default=True, type=click.IntRange(1),
              help="PostgreSQL's max_connections (a stock server: 100; the embedded one: 500).")
@click.option("--reserved", default=3, show_default=True, type=click.IntRange(0),
              help="superuser_reserved_connections + reserved_connections.")
@click.option("--pgbouncer-pool", type=click.IntRange(1), help="PgBouncer's default_pool_size, if it is in front.")
@click.option("--max-client-conn", default=1000, show_default=True, type=click.IntRange(1),
              help="PgBouncer's max_client_conn.")
def main(hosts, workers, pool_size, max_overflow, max_connections, reserved, pgbouncer_pool, max_client_conn):
    """Print the pool arithmetic for a deployment and whether it fits (exit 1 if not)."""
    settings = Settings.from_env()
    lines, fits = budget_lines(
        hosts,
        workers or Server.from_env().web_concurrency,
        pool_size or settings.pool_size,
        settings.max_overflow if max_overflow is None else max_overflow,
        max_connections,
        reserved,
        pgbouncer_pool,
        max_client_conn,
    )
    click.echo("\n".join(lines))
    sys.exit(0 if fits else 1)


if __name__ == "__main__":
    main()
