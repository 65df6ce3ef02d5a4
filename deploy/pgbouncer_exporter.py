"""PgBouncer's pools for Prometheus:

    python -m deploy.pgbouncer_exporter --listen ADDRESS:PORT --pgbouncer HOST:PORT --passfile FILE --ca FILE

(`up --monitoring` starts it, and the render makes a unit of it on PgBouncer's host).

Written here, small, because neither packaged exporter runs: Debian's
prometheus-pgbouncer-exporter (1.7) fails every scrape against PgBouncer 1.18
(`KeyError: 'total_requests'`: SHOW STATS lost that column in 1.8), and its PyPI successor
pins psycopg2 2.8 and prometheus_client 0.8. The metrics carry the names of
prometheus-community's pgbouncer_exporter, so rules written for that one work on these.
Each scrape asks PgBouncer's admin console SHOW POOLS (TLS, the admin's passfile).
"""

import time

import click
import psycopg2
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily

from deploy.credentials import ADMIN_USER
from deploy.pgbouncer import admin

# SHOW POOLS column -> (metric, help)
POOL_COLUMNS = {
    "cl_active": ("pgbouncer_pools_client_active_connections", "Clients linked to a server connection"),
    "cl_waiting": ("pgbouncer_pools_client_waiting_connections", "Clients waiting for a server connection"),
    "sv_active": ("pgbouncer_pools_server_active_connections", "Server connections linked to a client"),
    "sv_idle": ("pgbouncer_pools_server_idle_connections", "Server connections idle, ready for a client"),
    "maxwait": ("pgbouncer_pools_client_maxwait_seconds", "How long the oldest waiting client has waited"),
}


class PoolsCollector:
    """One SHOW POOLS per scrape; `pgbouncer_up` 0 when the console does not answer."""

    def __init__(self, pgbouncer: dict):
        self.pgbouncer = pgbouncer

    def collect(self):
        up = GaugeMetricFamily("pgbouncer_up", "1 when PgBouncer's admin console answered this scrape")
        try:
            rows = [row for row in admin(self.pgbouncer, "SHOW POOLS") if row["database"] != "pgbouncer"]
        except psycopg2.Error:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for column, (name, documentation) in POOL_COLUMNS.items():
            family = GaugeMetricFamily(name, documentation, labels=["database", "user"])
            for row in rows:
                value = float(row[column])
                if column == "maxwait":
                    value += float(row.get("maxwait_us") or 0) / 1e6
                family.add_metric([row["database"], row["user"]], value)
            yield family


@click.command()
@click.option("--listen", required=True, help="ADDRESS:PORT to serve /metrics on.")
@click.option("--pgbouncer", "address", required=True, help="PgBouncer's ADDRESS:PORT.")
@click.option("--passfile", required=True, help=f"A libpq passfile with {ADMIN_USER}'s password.")
@click.option("--ca", required=True, help="The CA certificate PgBouncer's is verified against.")
def main(listen: str, address: str, passfile: str, ca: str) -> None:
    """Serve PgBouncer's pools until stopped."""
    registry = CollectorRegistry()
    registry.register(PoolsCollector({"address": address, "admin_user": ADMIN_USER, "admin_passfile": passfile,
                                      "ca": ca}))
    host, port = listen.rsplit(":", 1)
    start_http_server(int(port), host.strip("[]"), registry)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
