"""The hosts of a deployment, by role: what `python -m deploy.render` reads.

    balancer: {name: lb1, address: 192.0.2.10}
    app_hosts: [{name: app1, address: 192.0.2.21}, {name: app2, address: 192.0.2.22}]
    pgbouncer: {name: pool1, address: 192.0.2.30}
    db_nodes: [{name: db1, address: 192.0.2.41}, {name: db2, address: 192.0.2.42}, {name: db3, address: 192.0.2.43}]
    etcd: [{name: etcd1, address: 192.0.2.51}, {name: etcd2, address: 192.0.2.52}, {name: etcd3, address: 192.0.2.53}]
    prometheus: {name: mon1, address: 192.0.2.60}

Every other key is optional, and its default is what `python -m deploy.cluster up` uses
(ports, workers, pool sizes). The shape is checked by pydantic, the most used library for
exactly this (a typed model, every error naming its key), rather than by hand: a
misspelt key, a missing role, a wrong type, or two hosts with one name or address stop
the render with one line, before anything is written.
"""

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

HostName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,30}$")]
Port = Annotated[int, Field(ge=1, le=65535)]


class InventoryError(ValueError):
    """One line naming the key that is wrong."""


class Host(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: HostName
    address: IPv4Address | IPv6Address


class Balancer(Host):
    port: Port = 8080  # the public side (HAProxy's `bind`)
    exporter_port: Port = 8405  # HAProxy's own metrics, for Prometheus


class AppHost(Host):
    port: Port = 8000
    workers: Annotated[int, Field(ge=1)] = 1
    metrics_dir: str | None = None  # PROMETHEUS_MULTIPROC_DIR [ROOT/run/greenflask/metrics]


class PgBouncer(Host):
    port: Port = 6432
    pool_size: Annotated[int, Field(ge=1)] = 20  # server connections (default_pool_size)
    user: str = "postgres"  # who runs it (Debian's package: postgres)
    exporter_port: Port = 9127
    # With db_nodes: the HAProxy on this host that routes to Patroni's primary and replicas.
    primary_port: Port = 5000
    replicas_port: Port = 5001


class DbNode(Host):
    pass


class Etcd(Host):
    client_port: Port = 2379
    peer_port: Port = 2380


class Postgres(Host):
    """A PostgreSQL server run by someone else (no db_nodes): the render configures none of it,
    so it is no host of the inventory's. `socket_dir`: PgBouncer, on the same machine, connects
    through this unix socket folder instead of the address."""

    port: Port = 5432
    database: str = "greenflask"
    socket_dir: str | None = None
    replica: "Postgres | None" = None  # a streaming replica of it, for the app's reads


class Prometheus(Host):
    port: Port = 9090
    postgres_exporter_port: Port = 9187
    retention: str = "1d"  # --storage.tsdb.retention.time
    user: str = "prometheus"  # who runs Prometheus and PostgreSQL's exporter (Debian's packages: prometheus)
    # Every `for:` and range window of the rules times this: 1 in production; a test's cluster
    # makes its alerts fire in seconds (the real windows are promtool's tests.yml's).
    rule_windows: Annotated[float, Field(gt=0, le=1)] = 1.0


class App(BaseModel):
    """The app's own settings for every app host (the rest are the app's defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pool_size: Annotated[int, Field(ge=1)] = 100  # DB_POOL_SIZE
    max_overflow: Annotated[int, Field(ge=0)] = 0  # DB_MAX_OVERFLOW
    statement_timeout_ms: Annotated[int, Field(ge=1)] = 65000  # DB_STATEMENT_TIMEOUT
    max_body_bytes: Annotated[int, Field(ge=1)] = 65536  # MAX_BODY_BYTES
    environment: dict[str, str] = {}  # any other of docs/reference.md's settings


class Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    balancer: Balancer
    app_hosts: Annotated[list[AppHost], Field(min_length=1)]
    pgbouncer: PgBouncer | None = None  # without it, the app hosts connect to PostgreSQL itself
    db_nodes: list[DbNode] = []
    etcd: list[Etcd] = []
    postgres: Postgres | None = None
    prometheus: Prometheus | None = None
    app: App = App()
    postgres_version: Annotated[int, Field(ge=13)] = 15  # Debian 12's: /usr/lib/postgresql/15/bin
    # Networks let in to the database nodes besides the nodes and PgBouncer's host (an
    # operator's host for migrations, say); each is a pg_hba line.
    database_clients: list[IPv4Network | IPv6Network] = []

    @model_validator(mode="after")
    def _one_database_and_unique_hosts(self) -> "Inventory":
        if bool(self.db_nodes) == bool(self.postgres):
            raise ValueError("name either db_nodes (Patroni, with etcd) or postgres (a server of your own)")
        if self.db_nodes and not self.etcd:
            raise ValueError("db_nodes need etcd members (Patroni keeps its leader key there)")
        if self.db_nodes and not self.pgbouncer:
            raise ValueError("db_nodes need pgbouncer (the HAProxy on its host routes to the primary)")
        if self.etcd and not self.db_nodes:
            raise ValueError("etcd is for db_nodes: name them too")
        seen: dict[str, str] = {}
        for role, host in self.hosts():
            for key, value in (("name", host.name), ("address", str(host.address))):
                if (key, value) in seen:
                    raise ValueError(f"{role}.{key} {value} is also {seen[(key, value)]}'s")
                seen[(key, value)] = role
        return self

    def hosts(self) -> list[tuple[str, Host]]:
        """Every host with where it sits ("app_hosts[1]"), in the order of the roles."""
        found: list[tuple[str, Host]] = [("balancer", self.balancer)]
        found += [(f"app_hosts[{index}]", host) for index, host in enumerate(self.app_hosts)]
        if self.pgbouncer is not None:
            found.append(("pgbouncer", self.pgbouncer))
        found += [(f"db_nodes[{index}]", host) for index, host in enumerate(self.db_nodes)]
        found += [(f"etcd[{index}]", host) for index, host in enumerate(self.etcd)]
        if self.prometheus is not None:
            found.append(("prometheus", self.prometheus))
        return found


def parse(data: object) -> Inventory:
    """The inventory, or InventoryError with one line: the first wrong key and why."""
    try:
        return Inventory.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        # A union's member names itself in the location ("lax-or-strict[...]"): not a key.
        where = ".".join(str(part) for part in first["loc"] if "[" not in str(part)) or "inventory"
        raise InventoryError(f"{where}: {first['msg']}") from None


def load(path: Path) -> Inventory:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise InventoryError(f"{path}: {error}") from None
    return parse(data)


def dump(inventory: Inventory) -> str:
    """The inventory as YAML (what `deploy.cluster up` writes of its own hosts)."""
    return yaml.safe_dump(inventory.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
