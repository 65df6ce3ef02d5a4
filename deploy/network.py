"""The cluster's network: one namespace per app host, with a link to a front and a back bridge,
and with `--ha` one per database node, on a third bridge the app hosts cannot reach.

    client -> HAProxy -> front bridge 10.77.1.1/24 -> hostK's `front` 10.77.1.1K
    hostK's `back` 10.77.2.1K -> back bridge 10.77.2.1/24 -> PgBouncer
    PgBouncer -> HAProxy (127.0.0.1) -> db bridge 10.77.3.1/24 -> dbN's `db` 10.77.3.2N (etcd on 10.77.3.1)

The bridges' addresses are this machine's own (the root namespace's), which is how HAProxy,
PgBouncer and etcd reach the namespaces; the namespaces have no route but their own
networks, so an app host reaches PgBouncer and nothing of the database side.

Made with iproute2 (`ip netns`, veth pairs, bridges), as root; private addresses only, on
links that exist inside this machine. Not root, there are no namespaces: hosts are
127.0.0.1K on the loopback network.
"""

import subprocess
from dataclasses import dataclass

import click

SUBNETS = {"front": 1, "back": 2, "db": 3}

@dataclass(frozen=True)
class Network:
    """Names and addresses of one cluster's hosts, from CLUSTER_NET ("10.77")."""

    net: str
    namespaces: bool

    @property
    def prefix(self) -> str:  # "gf77": short, because a link name has at most 15 characters
        return "gf" + self.net.split(".")[1]

    def bridge(self, side: str) -> str:
        return f"{self.prefix}-{side}"

    def bridge_address(self, side: str) -> str:
        return f"{self.net}.{SUBNETS[side]}.1"

    def namespace(self, number: int) -> str:
        return f"{self.prefix}-host{number}"

    def veth(self, number: int, side: str) -> str:
        return f"{self.prefix}-h{number}{side[0]}"

    def host_address(self, number: int, side: str) -> str:
        if not self.namespaces:
            return f"127.0.0.{10 + number}"
        return f"{self.net}.{1 if side == 'front' else 2}.{10 + number}"

    def pgbouncer_address(self) -> str:
        return self.bridge_address("back") if self.namespaces else "127.0.0.2"

    def db_namespace(self, number: int) -> str:
        return f"{self.prefix}-db{number}"

    def db_veth(self, number: int) -> str:
        return f"{self.prefix}-d{number}"

    def db_address(self, number: int) -> str:
        return f"{self.net}.{SUBNETS['db']}.{20 + number}"


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise click.ClickException(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def remove_stale_network(network: Network) -> list[str]:
    """Delete what a cluster of this CLUSTER_NET left when it was killed before `down`
    (its state file gone with it): namespaces with no process in them, then the bridges.
    A namespace that still runs a process belongs to a live cluster: refuse to touch it.
    Returns the names removed."""
    stale = [line.split()[0] for line in ip("netns", "list").splitlines()
             if line.startswith((f"{network.prefix}-host", f"{network.prefix}-db"))]
    for namespace in stale:
        if ip("netns", "pids", namespace).split():
            raise click.ClickException(f"CLUSTER_NET {network.net} is in use: namespace {namespace} runs processes "
                                       "(stop that cluster with `down` and its CLUSTER_DIR, or choose another "
                                       "CLUSTER_NET)")
    for namespace in stale:
        ip("netns", "del", namespace)
    bridges = [network.bridge(side) for side in SUBNETS
               if subprocess.run(["ip", "link", "show", network.bridge(side)], capture_output=True).returncode == 0]
    for bridge in bridges:
        ip("link", "del", bridge)
    return stale + bridges


def make_bridges(network: Network, sides=("front", "back")) -> None:
    for side in sides:
        ip("link", "add", network.bridge(side), "type", "bridge")
        ip("addr", "add", f"{network.bridge_address(side)}/24", "dev", network.bridge(side))
        ip("link", "set", network.bridge(side), "up")


def make_host_namespace(network: Network, number: int) -> None:
    """A namespace with a link to each bridge: `front` and `back` inside, hNf/hNb outside."""
    namespace = network.namespace(number)
    ip("netns", "add", namespace)
    ip("-n", namespace, "link", "set", "lo", "up")
    for side in ("front", "back"):
        outside = network.veth(number, side)
        ip("link", "add", outside, "type", "veth", "peer", "name", side, "netns", namespace)
        ip("link", "set", outside, "master", network.bridge(side), "up")
        ip("-n", namespace, "addr", "add", f"{network.host_address(number, side)}/24", "dev", side)
        ip("-n", namespace, "link", "set", side, "up")


def make_db_namespace(network: Network, number: int) -> None:
    """A database node's namespace with one link, `db`, to the db bridge (dN outside)."""
    namespace = network.db_namespace(number)
    ip("netns", "add", namespace)
    ip("-n", namespace, "link", "set", "lo", "up")
    ip("link", "add", network.db_veth(number), "type", "veth", "peer", "name", "db", "netns", namespace)
    ip("link", "set", network.db_veth(number), "master", network.bridge("db"), "up")
    ip("-n", namespace, "addr", "add", f"{network.db_address(number)}/24", "dev", "db")
    ip("-n", namespace, "link", "set", "db", "up")


def remove_network(network: Network, hosts: int, db_nodes: int = 0) -> None:
    """Delete the namespaces (their links go with them) and the bridges; missing is fine."""
    namespaces = [network.namespace(number) for number in range(1, hosts + 1)]
    namespaces += [network.db_namespace(number) for number in range(1, db_nodes + 1)]
    for namespace in namespaces:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
    for side in SUBNETS:
        subprocess.run(["ip", "link", "del", network.bridge(side)], capture_output=True)
