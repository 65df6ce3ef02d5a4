"""Lose the primary, lose no write: `up --ha` (etcd, Patroni on 3 nodes in namespaces of their
own, HAProxy routing by Patroni's REST API, PgBouncer in front of the app hosts) under load.

One cluster for the module (2 app hosts, CLUSTER_NET 10.83), brought up and down with the
CLI. It starts on the release before todos.due_at, so that the first test migrates Patroni's
primary and rolls this checkout out under load; the tests after it run this checkout (without
git history the cluster starts on this checkout and the first test skips). Writes are a client
of the test's own (POSTs each with an Idempotency-Key, sent again after a 503 as its
Retry-After says); reads are `loadtest.py --rate`. Every 201's row is read back from the
primary afterwards.
"""

import contextlib
import json
import time
from collections import Counter
from pathlib import Path

import psycopg2
import pytest
import yaml
from conftest import (
    WRITES_PER_SECOND,
    cluster_environment,
    cluster_marks,
    cluster_status,
    cluster_up,
    get_json,
    in_background,
    loadtest_report,
    release_before,
    request,
    run_cluster,
    writes,
)

from deploy import credentials, ha
from greenflask import PROJECT_DIR

INSTALL = f"{ha.PACKAGES} pgbouncer haproxy"
pytestmark = [*cluster_marks("pgbouncer", "haproxy", "etcd", "patroni", install=INSTALL),
              # PostgreSQL's server binaries: Debian's, which Patroni runs (deploy/ha.py).
              pytest.mark.skipif(not list(Path("/usr/lib/postgresql").glob("*/bin/pg_rewind")),
                                 reason=f"not installed: apt-get install {INSTALL}")]

READS_PER_SECOND = 50


@pytest.fixture(scope="module")
def release_before_due_at(tmp_path_factory) -> Path | None:
    return release_before("migrations/versions/0003_todos_due_at.py", tmp_path_factory.mktemp("ha") / "release")


@pytest.fixture(scope="module")
def cluster(release_before_due_at):
    release = ["--release", str(release_before_due_at)] if release_before_due_at else []
    with cluster_environment("10.83") as env, cluster_up(env, "--ha", "--hosts", "2", *release) as balancer:
        yield env, balancer


def reads(url: str, seconds: float, rate: int = READS_PER_SECOND) -> dict:
    return loadtest_report(url, "--rate", str(rate), "-d", str(seconds), "/todos?limit=5", timeout=seconds + 60)


def under_load(balancer: str, action, seconds: float, tag: str):
    """`action()` 5 s into `seconds` of writes and reads; (its result, the writes, the reads,
    when it ran in the writes' clock)."""
    written = in_background(writes, balancer, seconds, tag)
    read = in_background(reads, balancer, seconds)
    time.sleep(5)
    at = time.monotonic()
    result = action()
    written.join()
    read.join()
    return result, written.result, read.result, at


def rows_on_the_primary(report: dict, ids: list[int]) -> set[int]:
    """Which of `ids` the primary has, asked through PgBouncer as the app."""
    host, port = report["pgbouncer"]["address"].rsplit(":", 1)
    connection = psycopg2.connect(host=host, port=port, dbname="greenflask", user=credentials.APP_ROLE,
                                  passfile=report["passfile"], sslmode="verify-full",
                                  sslrootcert=report["pgbouncer"]["ca"], connect_timeout=5)
    with contextlib.closing(connection), connection.cursor() as cursor:
        cursor.execute("SELECT id FROM todos WHERE id = ANY(%s)", (ids,))
        return {row[0] for row in cursor.fetchall()}


def statuses(records: list[dict]) -> dict:
    """{"201": n, "503 pool_exhausted": n, ...} over every attempt of every write."""
    return dict(Counter(f"{status} {code or ''}".strip() for record in records
                        for _, status, code in record["attempts"]))


def seconds_without_a_first_201(records: list[dict], since: float) -> float:
    """From `since` to the first write sent after it whose first attempt got a 201 and after
    which every first attempt did: how long new writes were refused."""
    firsts = sorted((record["attempts"][0][0], record["attempts"][0][1]) for record in records)
    refused = [sent for sent, status in firsts if sent >= since and status != 201]
    if not refused:
        return 0.0
    back = next(sent for sent, status in firsts if sent > refused[-1] and status == 201)
    return back - since


def todo_keys(url: str) -> set[str]:
    return set(get_json(url + "/todos?limit=1")["todos"][0])


def test_a_migration_on_the_primary_during_a_rollout_drops_nothing(cluster, release_before_due_at, figure):
    """Expand -> deploy: the cluster runs the release before todos.due_at; `rollout` of this
    checkout first applies its migrations (0003 adds the column, 0004 validates its range) on
    Patroni's primary, through the database side's HAProxy, while the old hosts serve; then it
    replaces both hosts; all under 100 GET/s and 50 POST/s. No request fails, and every
    acknowledged write is on the primary and reads back with the new field."""
    if release_before_due_at is None:
        pytest.skip("no git history that adds migrations/versions/0003_todos_due_at.py (a shallow checkout?)")
    env, balancer = cluster
    assert "due_at" not in todo_keys(balancer), "the old release knows no due_at"
    written = in_background(writes, balancer, 24, "rollout", 50)
    read = in_background(reads, balancer, 24, 100)
    time.sleep(3)
    rolled = run_cluster(env, "rollout", timeout=200)
    written.join()
    read.join()
    after = cluster_status(env)
    acknowledged = [record["id"] for record in written.result if record["id"] is not None]
    read_back = [get_json(f"{balancer}/todos/{todo_id}") for todo_id in acknowledged]
    due = "2027-03-01T09:00:00+00:00"
    made = request(balancer + "/todos", "POST", {"title": "due after the rollout", "due_at": due}, timeout=5)
    made_back = get_json(f"{balancer}/todos/{made.json()['id']}")

    assert rolled.returncode == 0, rolled.stderr + rolled.stdout
    schema = rolled.stdout.splitlines()[0]
    assert schema.startswith("schema: alembic upgrade head") and "0002 -> 0003, 0003 -> 0004" in schema, schema
    attempts = [attempt for record in written.result for attempt in record["attempts"]]
    assert len(acknowledged) == len(written.result) == 24 * 50
    assert [status for _, status, _ in attempts] == [201] * len(attempts), statuses(written.result)
    assert rows_on_the_primary(after, acknowledged) == set(acknowledged)
    assert all(todo["due_at"] is None and todo["id"] == todo_id for todo, todo_id in zip(read_back, acknowledged,
                                                                                         strict=True))
    figures = read.result
    assert figures["statuses"] == {"200": figures["requests"]} and not figures["errors"], figures["statuses"]
    assert made.status == 201 and made.json()["due_at"] == due and made_back["due_at"] == due
    assert {host["release"] for host in after["hosts"]} == {str(PROJECT_DIR)}
    figure(f"--ha: migration 0002 -> 0004 on Patroni's primary {after['primary']}, then rollout of 2 hosts, under "
           f"100 GET/s and 50 POST/s: {figures['requests']} reads and {len(acknowledged)} writes, 0 failed, every "
           f"write on the primary and read back with due_at; {schema}; "
           + "; ".join(rolled.stdout.strip().splitlines()[1:]))


def test_primary_killed_under_load_loses_no_acknowledged_write(cluster, figure):
    env, balancer = cluster
    before = cluster_status(env)
    old_primary = before["primary"]
    clock = time.monotonic()

    def kill_the_primary():
        return run_cluster(env, "kill", old_primary)

    killed, records, read_figures, at = under_load(balancer, kill_the_primary, 30, "failover")
    after = cluster_status(env)
    ids = [record["id"] for record in records if record["id"] is not None]
    on_primary = rows_on_the_primary(after, ids)
    refused_for = seconds_without_a_first_201(records, at - clock)
    started = run_cluster(env, "start", old_primary)
    rejoined = ha_seconds_until(env, lambda report: node(report, old_primary)["role"] in ("replica", "sync_standby")
                                and node(report, old_primary)["state"] == "running"
                                and node(report, old_primary)["lag"] == 0, 90)

    assert killed.returncode == 0, killed.stderr
    assert before["primary"] and {n["role"] for n in before["db_nodes"]} == {"leader", "sync_standby", "replica"}
    assert after["primary"] not in (None, old_primary), after
    assert all(record["id"] for record in records), f"every write got its 201 in the end: {statuses(records)}"
    assert set(statuses(records)) <= {"201", "503 database_unavailable", "503 pool_exhausted"}, statuses(records)
    assert len(set(ids)) == len(ids), "no key made two rows"
    assert on_primary == set(ids), f"acknowledged writes missing: {sorted(set(ids) - on_primary)[:10]}"
    assert set(read_figures["statuses"]) <= {"200", "503"}, read_figures["statuses"]
    assert refused_for < 25, f"writes refused for {refused_for:.1f} s"  # the goal, 15 s, is RELIABILITY.md's
    assert started.returncode == 0, started.stderr
    figure(f"primary {old_primary} killed (SIGKILL, Patroni and PostgreSQL) under {WRITES_PER_SECOND} POST/s and "
           f"{READS_PER_SECOND} GET/s: new primary {after['primary']}; new writes refused (503) for "
           f"{refused_for:.1f} s; {len(records)} writes, every one 201 in the end (attempts: {statuses(records)}), "
           f"all {len(ids)} rows on the new primary, 0 missing, 0 duplicated; reads {read_figures['statuses']}; "
           f"{old_primary} back as a replica (pg_rewind) {rejoined:.1f} s after its start")


def test_switchover_under_load(cluster, figure):
    env, balancer = cluster
    before = cluster_status(env)["primary"]
    switched, records, read_figures, _ = under_load(balancer, lambda: run_cluster(env, "switchover"), 15, "switchover")
    after = cluster_status(env)
    ids = [record["id"] for record in records if record["id"] is not None]
    first_attempts = [record["attempts"][0][1] for record in records]

    assert switched.returncode == 0, switched.stderr + switched.stdout
    assert after["primary"] not in (None, before)
    assert read_figures["statuses"] == {"200": read_figures["requests"]}, read_figures["statuses"]
    assert all(record["id"] for record in records) and rows_on_the_primary(after, ids) == set(ids)
    # Writes wait in PgBouncer while it is paused; one that waits with the host's pool full
    # may get 503 pool_exhausted, and its retry a 201. Measured: 0 to 3 of 300.
    assert first_attempts.count(201) >= 0.9 * len(records), statuses(records)
    figure(f"switchover {before} -> {after['primary']} behind PgBouncer PAUSE/RESUME under {WRITES_PER_SECOND} "
           f"POST/s and {READS_PER_SECOND} GET/s: {switched.stdout.strip()}; reads {read_figures['statuses']}, "
           f"max {read_figures['latency_service']['max']:.2f} s; writes {statuses(records)}")


def node(report: dict, name: str) -> dict:
    return next(entry for entry in report["db_nodes"] if entry["name"] == name)


def ha_seconds_until(env: dict, check, within: float) -> float:
    started = time.monotonic()
    while not check(report := cluster_status(env)):
        if time.monotonic() - started > within:
            pytest.fail(f"not within {within:.0f} s: {report['db_nodes']}")
        time.sleep(1)
    return time.monotonic() - started


def test_patroni_validated_each_node_config_before_it_ran(cluster):
    """`patroni --validate-config` of each node's config (written by the same code as the
    render's, deploy/ha.py) in the node's namespace, as postgres, with etcd up: `up` and
    `start` run it before each Patroni, and stop at a config it refuses."""
    env, _ = cluster
    report = cluster_status(env)
    assert [node["validated"] for node in report["db_nodes"]] == ["patroni --validate-config: ok"] * 3
    state = json.loads((Path(env["CLUSTER_DIR"]) / "state.json").read_text())
    assert all(node["config"].startswith(f"{report['rendered']}/{node['name']}/") for node in state["ha"]["nodes"])
    for node in state["ha"]["nodes"]:  # its passwords are in its environment, not its config
        users = yaml.safe_load(Path(node["config"]).read_text())["postgresql"]["authentication"]
        assert not any("password" in user for user in users.values()), node["config"]
