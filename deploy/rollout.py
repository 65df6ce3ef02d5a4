"""A rollout: each app host replaced by a new gunicorn of a release, one at a time, behind
HAProxy's drain and maintenance states, dropping no request.
"""

import time

import click

from deploy import apphosts
from deploy.haproxy import admin as haproxy_admin
from deploy.haproxy import server_rows, server_states
from deploy.runtime import CLUSTER_DIR, HostState, State
from greenflask import green, servers
from greenflask.settings import Settings


def longest_request_seconds(settings: Settings) -> float:
    """The longest a request of the app may take: its longest sleep or its statement bound."""
    return max(settings.sleep_max_seconds, settings.statement_timeout_ms / 1000 + green.STATEMENT_MARGIN_SECONDS)


def replace_host(state: State, host: HostState, admin: str, bound: float) -> None:
    name, old_pid, started = host["name"], host["gunicorn_pid"], time.monotonic()
    haproxy_admin(admin, f"set server app_hosts/{name} state drain")

    def in_flight() -> int:
        return int(server_rows(admin).get(name, {}).get("scur") or 0)

    try:
        servers.wait_until(lambda: in_flight() == 0, f"{name}'s requests", bound)
        left = 0
    except RuntimeError:
        # Past the bound the old master still gets SIGTERM: gunicorn lets what runs finish
        # for its graceful_timeout, then ends it; HAProxy answers that client 502.
        left = in_flight()
    drained = time.monotonic() - started
    # MAINT closes HAProxy's idle kept-alive connections to the host, which the old workers
    # would otherwise hold open for their keep-alive before they exit.
    haproxy_admin(admin, f"set server app_hosts/{name} state maint")
    servers.stop(old_pid)
    apphosts.run(state, host)
    try:
        servers.wait_until(lambda: apphosts.is_healthy(host) or not servers.is_alive(host["gunicorn_pid"]),
                           f"{name}'s /healthz", 60)
        if not servers.is_alive(host["gunicorn_pid"]):
            raise RuntimeError("its new gunicorn exited")
        haproxy_admin(admin, f"set server app_hosts/{name} state ready")
        servers.wait_until(lambda: server_states(admin).get(name) == "UP", f"{name} UP in HAProxy", 30)
    except RuntimeError as error:
        raise click.ClickException(f"{name} did not come back: {error}; it stays out of rotation, the other hosts "
                                   f"serve (its log: {CLUSTER_DIR / (name + '.log')})") from None
    replaced = time.monotonic() - started
    note = f", {left} request(s) still running at the {bound:.0f} s bound" if left else ""
    click.echo(f"{name}: drained in {drained:.2f} s{note}; replaced (pid {old_pid} -> {host['gunicorn_pid']}) and "
               f"back in rotation in {replaced:.2f} s")
