"""deploy/cluster.py for real: PgBouncer, app hosts in network namespaces, HAProxy, faults.

Each test brings a cluster up and down with the CLI, as a user would. PostgreSQL is an
embedded server of this module's own (it is restarted in one test), the network is
CLUSTER_NET 10.78 (not the default, so a user's cluster may run beside), and the state
folder is temporary. Load goes to HAProxy on 127.0.0.1 and, directly, to the hosts'
addresses inside the namespaces the cluster made; `down` removes them.
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    cluster_environment,
    cluster_marks,
    cluster_status,
    cluster_up,
    get_json,
    in_background,
    loadtest_report,
    post_json,
    run_cluster,
)

from deploy import units
from deploy.haproxy import server_rows as haproxy_servers
from deploy.inventory import load as load_inventory
from deploy.pgbouncer import admin as pgbouncer_admin
from greenflask import embedded, servers
from greenflask.settings import Settings

pytestmark = cluster_marks("pgbouncer", "haproxy")


@pytest.fixture(scope="module")
def cluster_env():
    """The environment every cluster command of this module runs with."""
    with cluster_environment("10.78") as env:
        yield env


@pytest.fixture
def cluster(cluster_env):
    """`up --hosts 3` (its balancer URL), then `down`, whatever the test did."""
    with cluster_up(cluster_env, "--hosts", "3") as balancer:
        yield balancer


def haproxy_states(env: dict) -> dict:
    return {host["name"]: host["haproxy"] for host in cluster_status(env)["hosts"]}


def wait_for_state(env: dict, host: str, wanted: str, within: float) -> float:
    """Seconds until HAProxy shows `host` as `wanted` (e.g. "DOWN"); fails after `within`."""
    return seconds_until(lambda: haproxy_states(env)[host] == wanted, within, every=0.2,
                         failure=lambda: f"{host} not {wanted} in HAProxy: {haproxy_states(env)}")


def seconds_until(check, within: float, every: float = 0.01, failure=lambda: "") -> float:
    """Seconds until `check()` is true, asked every `every` seconds; fails after `within`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            pytest.fail(f"not within {within:.0f} s: {failure()}")
        time.sleep(every)
    return time.monotonic() - started


def load(url: str, seconds: float, rate: int = 100) -> dict:
    """`python loadtest.py --rate` on GET /todos through the balancer, its figures as JSON."""
    return load_path(url, "/todos", rate, seconds)


def load_path(url: str, path: str, rate: int, seconds: float) -> dict:
    """`python loadtest.py --rate RATE -d SECONDS PATH` through `url`: its report."""
    return loadtest_report(url, "--rate", str(rate), "-d", str(seconds), path, timeout=seconds + 60)


def under_load(url: str, action, rate: int = 100, seconds: float = 8):
    """`action()` 2 s into `seconds` of GET /todos at `rate` a second through `url`; returns
    what the action returned and the load's figures."""
    running = in_background(load, url, seconds, rate)
    time.sleep(2)
    result = action()
    running.join()
    return result, running.result


def failed(figures: dict) -> int:
    return figures["requests"] - figures["statuses"].get("200", 0)


def test_up_serves_through_every_host(cluster, cluster_env, figure):
    report = cluster_status(cluster_env)
    hosts_seen = {get_json(f"http://{host['address']}:8000/stats")["host"] for host in report["hosts"]}
    before = requests_by_host(report)
    figures = load(cluster, seconds=3)
    served = {name: count - before[name] for name, count in requests_by_host(report).items()}

    assert [host["name"] for host in report["hosts"]] == ["host1", "host2", "host3"]
    assert all(host["healthy"] and host["haproxy"] == "UP" for host in report["hosts"])
    assert all(host["address"].startswith("10.78.1.") for host in report["hosts"]), "own namespaces"
    assert all(report[part]["running"] and report[part]["pid"] for part in ("pgbouncer", "haproxy", "postgres"))
    assert hosts_seen == {"host1", "host2", "host3"}, "each host names itself in its own /stats"
    assert all(count >= 50 for count in served.values()), f"HAProxy balances over every host: {served}"
    assert figures["statuses"] == {"200": 300}, figures["statuses"]
    figure(f"cluster up: 3 hosts in namespaces behind HAProxy, PgBouncer in front of PostgreSQL; "
           f"300 GET /todos at 100/s all 200, p99 {figures['latency_service']['p99'] * 1000:.1f} ms")


def test_the_cluster_runs_its_own_render(cluster, cluster_env, figure):
    """`up` wrote the inventory of its namespaces and rendered it (deploy/render.py): HAProxy,
    PgBouncer and each gunicorn run what their rendered units say, with their configs."""
    report = cluster_status(cluster_env)
    rendered = Path(report["rendered"])
    inventory = load_inventory(rendered / "inventory.yml")
    assert [host.name for host in inventory.app_hosts] == ["host1", "host2", "host3"]
    assert [str(host.address) for host in inventory.app_hosts] == [host["address"] for host in report["hosts"]]

    def argv(pid: int) -> list[str]:
        return Path(f"/proc/{pid}/cmdline").read_text().rstrip("\0").split("\0")

    for name, pid in (("balancer", report["haproxy"]["pid"]), ("pgbouncer", report["pgbouncer"]["pid"]),
                      *((host["name"], host["gunicorn_pid"]) for host in report["hosts"])):
        unit = next((rendered / name / "etc/systemd/system").glob("*.service"))
        wanted = units.command(unit).argv
        running = argv(pid)
        assert running[-len(wanted) + 1:] == wanted[1:], (name, running, wanted)
        assert all(str(rendered / name) in arg for arg in wanted if arg.endswith((".cfg", ".ini"))), wanted
    host_env = Path(f"/proc/{report['hosts'][0]['gunicorn_pid']}/environ").read_text().split("\0")
    assert f"PGPASSFILE={rendered}/host1/etc/greenflask/secrets/app.pgpass" in host_env
    figure(f"the cluster from its render: {len(list(rendered.glob('*/etc/systemd/system/*.service')))} units in "
           f"{rendered.name}/; HAProxy, PgBouncer and 3 gunicorns run their ExecStart")


def test_host_killed_under_load(cluster, cluster_env, figure):
    victim = cluster_status(cluster_env)["hosts"][0]

    def crash_host1() -> float:
        os.killpg(victim["gunicorn_pid"], signal.SIGKILL)  # the master and its workers, as a crash
        return wait_for_state(cluster_env, "host1", "DOWN", within=10)

    out_after, figures = under_load(cluster, crash_host1, rate=200)

    assert failed(figures) == 0, f"HAProxy retried the GETs on another host: {figures['statuses']} {figures['errors']}"
    assert haproxy_states(cluster_env)["host2"] == "UP" and haproxy_states(cluster_env)["host3"] == "UP"
    figure(f"host1's gunicorn killed (SIGKILL) under 200 GET/s: {figures['requests']} requests, "
           f"{failed(figures)} failed; HAProxy took it out in {out_after:.1f} s; "
           f"max {figures['latency_service']['max'] * 1000:.0f} ms")


def test_host_cut_from_the_database(cluster, cluster_env, figure):
    host2 = next(host for host in cluster_status(cluster_env)["hosts"] if host["name"] == "host2")
    running = in_background(load, cluster, 14, 100)
    time.sleep(2)
    assert run_cluster(cluster_env, "link", "host2", "down").returncode == 0
    cut = time.monotonic()
    out_after = wait_for_state(cluster_env, "host2", "DOWN", within=15)
    started = time.monotonic()
    healthz = servers.status_of(f"http://{host2['address']}:8000/healthz", timeout=10)
    healthz_seconds = time.monotonic() - started
    others = haproxy_states(cluster_env)
    assert run_cluster(cluster_env, "link", "host2", "up").returncode == 0
    back_after = wait_for_state(cluster_env, "host2", "UP", within=15)
    running.join()
    figures = running.result

    assert healthz == 503 and healthz_seconds < 1 + 1, "the host's own /healthz: 503 within DB_CONNECT_TIMEOUT"
    assert others["host1"] == "UP" and others["host3"] == "UP"
    # Until HAProxy takes host2 out, requests sent there answer 503 after DB_CONNECT_TIMEOUT
    # (a 503 is not retried: see haproxy.cfg). leastconn sends few new ones to a host that
    # holds them: fewer than the third that round robin would send it over that window
    # (7 of 1,400 in CI under two CPU hogs). One already waiting on its database when the
    # link went down answers 504 once its statement bound (10 s here) passes.
    assert set(figures["statuses"]) <= {"200", "503", "504"}, figures["statuses"]
    assert failed(figures) < 100 * out_after / 3, (figures["statuses"], out_after)
    figure(f"host2's link to the database down: HAProxy took it out after {out_after:.1f} s; its /healthz "
           f"503 in {healthz_seconds:.2f} s; host1 and host3 UP; back in rotation {back_after:.1f} s after "
           f"the link came up; {figures['requests']} requests at 100/s, {failed(figures)} failed, "
           f"max {figures['latency_service']['max']:.2f} s; link down for {time.monotonic() - cut:.0f} s")


def test_postgres_restarted_behind_pause_resume(cluster, cluster_env, figure):
    restarted, figures = under_load(cluster, lambda: run_cluster(cluster_env, "restart", "postgres"))

    assert restarted.returncode == 0, restarted.stderr
    assert failed(figures) == 0, figures["statuses"]
    figure(f"PostgreSQL restarted behind PgBouncer PAUSE/RESUME under 100 GET/s: {restarted.stdout.strip()}; "
           f"{figures['requests']} requests, 0 failed, max {figures['latency_service']['max']:.2f} s")


def test_pgbouncer_restarted_online_drops_nothing(cluster, cluster_env, figure):
    before = cluster_status(cluster_env)["pgbouncer"]["pid"]
    restarted, figures = under_load(cluster, lambda: run_cluster(cluster_env, "restart", "pgbouncer"))
    after = cluster_status(cluster_env)["pgbouncer"]

    assert restarted.returncode == 0, restarted.stderr
    assert after["pid"] != before and after["running"], "a new PgBouncer process serves"
    assert figures["statuses"] == {"200": figures["requests"]} and not figures["errors"], figures["statuses"]
    figure(f"PgBouncer restarted online (-R) under 100 GET/s: {restarted.stdout.strip()}; "
           f"{figures['requests']} requests, {failed(figures)} failed, max "
           f"{figures['latency_service']['max'] * 1000:.0f} ms")


def slow_burst(url: str, count: int, seconds: float, route: str) -> dict:
    """`python loadtest.py COUNT --seconds S --routes ROUTE` through `url`: its report."""
    return loadtest_report(url, str(count), "--seconds", str(seconds), "--routes", route, timeout=seconds + 90)


def test_rollout_replaces_every_host_dropping_nothing(cluster, cluster_env, figure):
    before = {host["name"]: host["gunicorn_pid"] for host in cluster_status(cluster_env)["hosts"]}
    running = in_background(load, cluster, 24, 150)
    # Slow requests in flight when the first hosts are drained: sleeps, and pg_sleeps within
    # PgBouncer's pool (a larger burst of those would wait for its pool, not for the rollout).
    sleeps = in_background(slow_burst, cluster, 30, 6, "python")
    pg_sleeps = in_background(slow_burst, cluster, 10, 6, "postgres")
    time.sleep(2)
    rolled = run_cluster(cluster_env, "rollout", timeout=200)
    for thread in (running, sleeps, pg_sleeps):
        thread.join()
    after = {host["name"]: host for host in cluster_status(cluster_env)["hosts"]}
    figures = running.result

    assert rolled.returncode == 0, rolled.stderr + rolled.stdout
    assert all(after[name]["gunicorn_pid"] != pid and after[name]["healthy"] for name, pid in before.items())
    assert set(haproxy_states(cluster_env).values()) == {"UP"}
    assert figures["statuses"] == {"200": figures["requests"]} and not figures["errors"], figures["statuses"]
    for slow in (sleeps.result, pg_sleeps.result):
        assert slow["statuses"] == {"200": slow["requests"]} and not slow["errors"], slow
    lines = [line for line in rolled.stdout.strip().splitlines() if not line.startswith("schema:")]
    assert [line.split(":")[0] for line in lines] == list(before)
    figure(f"rollout of 3 hosts under 150 GET/s with 30 sleeps and 10 pg_sleeps of 6 s in flight: "
           f"{figures['requests']} requests, 0 failed, max {figures['latency_service']['max'] * 1000:.0f} ms; "
           f"slow ones all 200; " + "; ".join(lines))


def test_down_lets_requests_in_flight_finish(cluster_env, figure):
    started = run_cluster(cluster_env, "up", "--hosts", "2", "--port", str(servers.free_port()))
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        balancer = started.stdout.strip().splitlines()[-1]
        sleeps = in_background(slow_burst, balancer, 20, 3, "python")
        time.sleep(1)
        began = time.monotonic()
        stopped = run_cluster(cluster_env, "down")
        took = time.monotonic() - began
        sleeps.join()
    finally:
        run_cluster(cluster_env, "down")
    assert stopped.returncode == 0, stopped.stderr
    assert sleeps.result["statuses"] == {"200": 20} and not sleeps.result["errors"], sleeps.result
    figure(f"down with 20 sleeps of 3 s in flight: all 200; down took {took:.1f} s")


def test_rollout_stops_at_a_host_that_does_not_come_back(cluster, cluster_env):
    broken = {**cluster_env, "GUNICORN_TIMEOUT": "soon"}  # the new gunicorn cannot start
    rolled = run_cluster(broken, "rollout", "--hosts", "host2,host3", timeout=200)
    states = haproxy_states(cluster_env)

    assert rolled.returncode == 1
    assert "host2 did not come back" in rolled.stderr and "host3" not in rolled.stdout
    assert states["host1"] == "UP" and states["host3"] == "UP" and states["host2"] != "UP"
    assert get_json(cluster + "/todos")["todos"], "the other hosts serve"


def balancer(env: dict) -> str:
    return cluster_status(env)["haproxy"]["url"]


def firing(prometheus: str) -> set[tuple[str, str]]:
    """(alert name, host or server) of every alert Prometheus says is firing."""
    alerts = get_json(prometheus + "/api/v1/alerts")["data"]["alerts"]
    return {(alert["labels"]["alertname"], alert["labels"].get("host") or alert["labels"].get("server"))
            for alert in alerts if alert["state"] == "firing"}


@pytest.mark.skipif(not shutil.which("prometheus"), reason="prometheus is not installed: apt-get install prometheus")
def test_an_alert_names_the_host_cut_from_its_database(cluster_env, figure):
    started = run_cluster(cluster_env, "up", "--hosts", "3", "--monitoring", "--port", str(servers.free_port()))
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        prometheus = cluster_status(cluster_env)["prometheus"]
        assert prometheus["running"], prometheus
        url = prometheus["url"]
        seconds_until(lambda: get_json(url + "/api/v1/query?query=up")["data"]["result"], 20, every=0.5)
        assert not firing(url), "nothing fires on a healthy cluster"
        assert run_cluster(cluster_env, "link", "host2", "down").returncode == 0
        # HAProxy takes host2 out after about 7 s, then the rule's `for` (15 s, a quarter here:
        # CLUSTER_RULE_WINDOWS), scraped every 2 s.
        wanted = {("GreenflaskHostOutOfRotation", "host2"), ("GreenflaskDatabaseUnreachable", "host2")}
        fired = seconds_until(lambda: wanted <= firing(url), 60, every=0.5, failure=lambda: str(firing(url)))
        others = {host for _, host in firing(url)} - {"host2", None}
        assert run_cluster(cluster_env, "link", "host2", "up").returncode == 0
        resolved = seconds_until(lambda: ("GreenflaskHostOutOfRotation", "host2") not in firing(url), 30, every=0.5)
        # An overload: 60 pg_sleeps of 1 s a second through PgBouncer's 20 server connections.
        overload = in_background(load_path, balancer(cluster_env), "/sleep/postgres/?seconds=1", 60, 20)
        overload_alerts = {"GreenflaskPoolTimeouts", "PgBouncerClientsWaiting"}
        pool_alert = seconds_until(lambda: overload_alerts <= {name for name, _ in firing(url)}, 70,
                                   every=1, failure=lambda: str(firing(url)))
        overload.join()
    finally:
        assert run_cluster(cluster_env, "down").returncode == 0
    assert not others, f"alerts about other hosts: {others}"
    assert overload.result["error_codes"].get("pool_exhausted"), overload.result["statuses"]
    figure(f"Prometheus: host2's link down -> GreenflaskHostOutOfRotation and GreenflaskDatabaseUnreachable for "
           f"host2 firing after {fired:.1f} s; host2 back in rotation -> resolved after {resolved:.1f} s; "
           f"60 pg_sleeps a second -> GreenflaskPoolTimeouts and PgBouncerClientsWaiting firing after "
           f"{pool_alert:.1f} s")


def test_up_clears_what_a_killed_cluster_left_and_spares_a_live_one(cluster_env, figure):
    """A cluster killed before `down` (its state folder gone) leaves its bridges and
    namespaces in the kernel; the next `up` of the same CLUSTER_NET removes them, unless a
    process still runs in one: then that network belongs to a live cluster."""
    subprocess.run(["ip", "link", "add", "gf78-front", "type", "bridge"], check=True)
    subprocess.run(["ip", "netns", "add", "gf78-host2"], check=True)
    live = subprocess.Popen(["ip", "netns", "exec", "gf78-host2", "sleep", "60"])
    try:
        time.sleep(0.3)
        refused = run_cluster(cluster_env, "up", "--hosts", "1", "--direct", "--port", str(servers.free_port()))
        still_there = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    finally:
        live.kill()
        live.wait()
    started = run_cluster(cluster_env, "up", "--hosts", "1", "--direct", "--port", str(servers.free_port()))
    stopped = run_cluster(cluster_env, "down")

    assert refused.returncode == 1 and "CLUSTER_NET 10.78 is in use" in refused.stderr, refused.stderr
    assert "gf78-host2" in still_there, "a namespace with a process in it is left alone"
    assert started.returncode == 0, started.stderr + started.stdout
    assert "removed what a cluster killed before `down` left: gf78-host2, gf78-front" in started.stdout
    assert stopped.returncode == 0, stopped.stderr
    figure("leftovers of a killed cluster: `up` refused while a process ran in gf78-host2, then removed "
           "gf78-host2 and gf78-front and came up")


@pytest.mark.database
@pytest.mark.skipif(not Settings.from_env().database_url, reason="DATABASE_URL is not set")
def test_up_with_database_url(cluster_env, figure):
    """PgBouncer in front of DATABASE_URL's server instead of the embedded one."""
    url = embedded.ensure_database(Settings.from_env().database_url, "greenflask_cluster")
    env = {**cluster_env, "DATABASE_URL": url}
    started = run_cluster(env, "up", "--hosts", "1", "--port", str(servers.free_port()))
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        balancer = started.stdout.strip().splitlines()[-1]
        todos = get_json(balancer + "/todos")
        report = cluster_status(env)
    finally:
        assert run_cluster(env, "down").returncode == 0
    assert len(todos["todos"]) == 50
    assert report["postgres"]["pid"] is None and not report["postgres"]["embedded"], "not started by the cluster"
    figure(f"cluster up against DATABASE_URL's server: {report['postgres']['url']}, GET /todos 200 through "
           "HAProxy and PgBouncer")


def test_replica_serves_the_reads(cluster_env, figure):
    """`up --replica`: reads through PgBouncer to a streaming replica, writes to the primary."""
    started = run_cluster(cluster_env, "up", "--hosts", "2", "--replica", "--port", str(servers.free_port()))
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        balancer = started.stdout.strip().splitlines()[-1]
        report = cluster_status(cluster_env)
        created = post_json(balancer + "/todos", {"title": "written to the primary"})
        visible_after = seconds_until(lambda: servers.status_of(f"{balancer}/todos/{created['id']}") == 200, 5)
        before = transactions_by_database(report["pgbouncer"])
        for _ in range(50):
            get_json(balancer + "/todos")
        after = transactions_by_database(report["pgbouncer"])
        stats = get_json(f"http://{report['hosts'][0]['address']}:8000/stats")["replica"]
    finally:
        assert run_cluster(cluster_env, "down").returncode == 0
    on_replica = after["greenflask_replica"] - before["greenflask_replica"]
    on_primary = after["greenflask"] - before["greenflask"]
    assert on_replica >= 50 and on_primary < 10, (on_replica, on_primary)  # the primary: health checks at most
    assert stats["in_recovery"] and stats["lag_seconds"] is not None and stats["lag_seconds"] < 5, stats
    assert not Path(report["replica"]["pgdata"]).exists(), "down removed the replica"
    figure(f"streaming replica: a todo written through HAProxy readable from the replica after "
           f"{visible_after * 1000:.0f} ms; 50 GET /todos: {on_replica} transactions on the replica, "
           f"{on_primary} on the primary (PgBouncer's SHOW STATS); "
           f"/stats lag {stats['lag_seconds']:.3f} s")


def requests_by_host(report: dict) -> dict[str, int]:
    """{host: requests HAProxy has sent it} (its admin socket's `stot`)."""
    return {name: int(row["stot"]) for name, row in haproxy_servers(report["haproxy"]["admin_socket"]).items()}


def transactions_by_database(pgbouncer: dict) -> dict[str, int]:
    """PgBouncer's count of transactions so far, per database (its admin console's SHOW STATS)."""
    return {row["database"]: row["total_xact_count"] for row in pgbouncer_admin(pgbouncer, "SHOW STATS")}
