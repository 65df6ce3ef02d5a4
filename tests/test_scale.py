"""The walls past 1,000 at once, bounded: a few thousand requests at most, wide margins.
The 10,000 figures are the benchmark's (BENCHMARKS.md, `make bench`)."""

import json
import re
import resource
import time

from conftest import in_background, request, run_loadtest
from slotserver import SlotServer

from loadtester import walls


def burst_against(start_server, env: dict, count: int, seconds: float, route: str, tmp_path):
    """A server with `env`, one `python loadtest.py COUNT` burst against it: (its report, the run)."""
    server = start_server("-k", "gevent", env=env)
    try:
        result = run_loadtest(str(count), "--url", server.base_url, "--seconds", str(seconds), "--routes", route,
                              "--json", str(tmp_path / "r.json"))
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((tmp_path / "r.json").read_text())["reports"][0], result


def test_2000_at_once_come_back_in_one_wave_with_the_defaults(start_server, seeded, tmp_path):
    """gunicorn's own default of 1,000 connections per worker would answer them in two waves."""
    # A long pool timeout: this test is about connections, not about the read after the sleep.
    report, _ = burst_against(start_server, {"DB_POOL_TIMEOUT": "30"}, 2000, 2, "python", tmp_path)
    assert report["statuses"] == {"200": 2000}
    assert report["ok_waves"] == [2000], report["ok_waves"]
    assert report["wall_named"] is None


def test_waves_of_the_connection_limit_are_named(start_server, seeded, tmp_path):
    # A short keep-alive: each wave waits for the one before to close its connections.
    env = {"GUNICORN_WORKER_CONNECTIONS": "50", "GUNICORN_KEEPALIVE": "1"}
    report, result = burst_against(start_server, env, 150, 0.5, "python", tmp_path)
    assert report["statuses"] == {"200": 150}
    assert len(report["ok_waves"]) == 3 and min(report["ok_waves"]) >= 48, report["ok_waves"]
    named = "waves of 50: the worker's connection limit (GUNICORN_WORKER_CONNECTIONS 50)"
    assert report["wall_named"] == named and f"wall      {named}" in result.stdout


def test_waves_of_the_pool_are_named(start_server, seeded, tmp_path):
    report, _ = burst_against(start_server, {"DB_POOL_SIZE": "10", "DB_POOL_TIMEOUT": "30"}, 30, 0.5, "postgres",
                              tmp_path)
    assert report["ok_waves"] == [10, 10, 10]
    assert report["wall_named"] == "waves of 10: the pool (DB_POOL_SIZE 10 + DB_MAX_OVERFLOW 0)"


def test_stats_and_metrics_show_open_connections_against_the_limit(start_server, seeded):
    server = start_server("-k", "gevent", env={"GUNICORN_WORKER_CONNECTIONS": "50"})
    try:
        slow = in_background(run_loadtest, "30", "--url", server.base_url, "--seconds", "2", "--routes", "python",
                             "--quiet")
        time.sleep(1.2)
        during = server.stats()["connections"]
        metrics = server.get("/metrics").body.decode()
        slow.join()
        after = server.stats()["connections"]
    finally:
        server.stop()
    assert during["limit"] == 50 and during["workers"] == 1
    assert during["open"] >= 30, during
    assert float(re.search(r"^greenflask_http_connections_open (\S+)$", metrics, re.M).group(1)) >= 30
    assert float(re.search(r"^greenflask_http_connections_limit (\S+)$", metrics, re.M).group(1)) == 50
    assert after["peak"] >= 31 and after["open_files_limit"] >= 50 + 25


def test_a_worker_warns_when_its_open_files_cannot_hold_its_connections(start_server):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    connections = hard + 1  # more than any raise of the soft limit can hold
    server = start_server("-k", "gevent", env={"GUNICORN_WORKER_CONNECTIONS": str(connections)})
    try:
        answer = request(server.url("/stats"))
    finally:
        server.stop()
    assert answer.status == 200, "a warning, not a refusal to start"
    assert re.search(rf"open files: limit \d+ cannot hold {connections} client connections \+ pool 25 \+ 64 spare",
                     server.log()), server.log()[-2000:]


def test_the_load_tester_raises_its_soft_limit_or_names_ulimit():
    with SlotServer(slots=1000) as server:
        raised = run_loadtest("300", "--url", server.url, "--seconds", "0.2", "--routes", "python", "--quiet",
                          shell_limit="-Sn 100")
        stopped = run_loadtest("300", "--url", server.url, "--seconds", "0.2", "--routes", "python",
                           shell_limit="-n 100")
    assert raised.returncode == 0, raised.stderr
    assert stopped.returncode == 2
    assert stopped.stderr.strip().splitlines() == [
        "loadtest.py: 300 connections need 364 open files and this shell allows 100 (hard limit 100): "
        "raise it first, e.g. `ulimit -n 364`"]


STATS = {"connections": {"limit": 1000, "workers": 1}, "wait_callback": True,
         "pool": {"size": 100, "max_overflow": 0, "timeout": 3.0}}


def test_each_limit_is_named_from_the_waves_it_makes():
    name = walls.name_the_wall
    assert name([3000], STATS, "python") is None, "one wave: no wall"
    assert name([1000, 1000, 1000], STATS, "python") == (
        "waves of 1000: the worker's connection limit (GUNICORN_WORKER_CONNECTIONS 1000)")
    assert name([1, 999, 1, 999], STATS, "python").startswith("waves of 1000: "), "a wave split by an early answer"
    two = {**STATS, "connections": {"limit": 1000, "workers": 2}}
    assert name([2000, 1000], two, "python").endswith("(GUNICORN_WORKER_CONNECTIONS 1000 x 2 workers)")
    assert name([100] * 5, STATS, "postgres") == "waves of 100: the pool (DB_POOL_SIZE 100 + DB_MAX_OVERFLOW 0)"
    sync = {**STATS, "connections": {"limit": 1, "workers": 1}, "wait_callback": False}
    assert name([1] * 5, sync, "python") == "waves of 1: the sync worker answers one request at a time"
    blocking = {**STATS, "wait_callback": False}
    assert name([1] * 5, blocking, "postgres").startswith("waves of 1: pg_sleep blocks the worker")
    assert name([20] * 5, {**STATS, "pgbouncer": True}, "postgres").endswith("behind PgBouncer, its default_pool_size?")
    assert name([300, 20, 700], STATS, "python").startswith("uneven waves, none of the server's limits (1000)")
    assert name([20, 20], None, "python") is None, "a server without /stats"


def test_disconnects_are_named():
    stats = {**STATS, "connections": {**STATS["connections"], "keepalive": 2}}
    assert walls.name_the_disconnects({"disconnected": 5552}, stats) == (
        "disconnected x 5552: closed unanswered, their request not read within gunicorn's keepalive "
        "(2 s, GUNICORN_KEEPALIVE)")


def test_503s_of_the_pool_are_named():
    assert walls.name_the_503s({"pool_exhausted": 297}, STATS) == (
        "pool_exhausted x 297: waited past DB_POOL_TIMEOUT (3 s) for one of the pool's 100 connections")
    assert walls.name_the_503s({"database_unavailable": 3}, STATS) is None
