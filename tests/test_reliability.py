"""Faults, overload and concurrent writes with real gunicorn and PostgreSQL processes.

The database-down test stops and restarts a PostgreSQL of its own (embedded, in a temporary
folder), so it never touches the shared server or the machine's own."""

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import (
    burst,
    busy_connections,
    in_background,
    loadtest_report,
    open_connections,
    request,
    row_count,
    send_many,
    wait_for_new_worker,
)
from sqlalchemy import text

import seed
from greenflask import embedded, servers


@pytest.fixture(scope="module")
def own_postgres(tmp_path_factory):
    """An embedded PostgreSQL only this module uses; stopped by its own pg_ctl at the end."""
    pgdata = tmp_path_factory.mktemp("own") / "pgdata"
    url = embedded.ensure_database(embedded.start(pgdata), "greenflask")
    engine = embedded.script_engine(url)
    seed.seed(engine)
    yield pgdata, url, engine
    engine.dispose()
    embedded.stop(pgdata)


def test_database_stopped_then_back(own_postgres, start_server, figure):
    pgdata, url, engine = own_postgres
    server = start_server("-k", "gevent", database=url, env={"DB_POOL_TIMEOUT": "1"})
    try:
        worker_pid = server.stats()["pid"]
        assert {o.status for o in burst(server.url("/todos"), 10)[0]} == {200}
        in_flight = in_background(send_many, "GET", server.url("/sleep/postgres/?seconds=3"), [None] * 5)
        time.sleep(0.5)
        embedded.stop(pgdata)
        in_flight.join()
        started = time.monotonic()
        while_down = send_many("GET", server.url("/todos"), [None] * 20)
        down_wall = time.monotonic() - started
        healthz_down = server.get("/healthz")
        embedded.start(pgdata)
        first_after = server.get("/todos")
        after = send_many("GET", server.url("/todos"), [None] * 50)
        same_worker = server.stats()["pid"] == worker_pid
    finally:
        server.stop()
        embedded.start(pgdata)  # for the module's other tests, whatever happened above

    for answer in [*in_flight.result, *while_down, healthz_down]:
        assert answer.status == 503, answer
        assert answer.json()["error"]["code"] == "database_unavailable"
        assert answer.headers["retry-after"] == "1"
    assert down_wall < 1 + 1, "every answer within DB_POOL_TIMEOUT + 1 s"
    assert first_after.status == 200, first_after
    assert {answer.status for answer in after} == {200}
    assert same_worker, "no worker died"
    figure(f"5 in-flight + 20 new + healthz all 503 while down (20 new in {down_wall:.2f} s); "
           f"first request after restart 200, then 50/50 200; worker pid unchanged")


def test_embedded_server_listens_on_a_socket_only(own_postgres):
    _, _, engine = own_postgres
    with engine.connect() as conn:
        assert conn.scalar(text("SHOW listen_addresses")) == ""


def test_terminated_backends_are_replaced_without_errors(green_server, engine, figure):
    burst(green_server.url("/sleep/postgres/?seconds=0.3"), 20)
    with engine.connect() as conn:
        killed = conn.execute(
            text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :name"),
            {"name": green_server.application_name},
        ).scalar()
    outcomes, wall = burst(green_server.url("/todos"), 100)
    statuses = [outcome.status for outcome in outcomes]
    assert killed >= 20
    assert statuses == [200] * 100, sorted(set(map(str, statuses)))
    figure(f"{killed} backends terminated; next 100 requests: {statuses.count(200)} x 200 in {wall:.2f} s")


def test_overload_1000_requests_get_200_or_fast_503(start_server, engine, figure):
    server = start_server("-k", "gevent", env={"DB_POOL_SIZE": "20", "DB_POOL_TIMEOUT": "2"})
    try:
        started = time.monotonic()
        answers = send_many("GET", server.url("/sleep/postgres/?seconds=1"), [None] * 1000)
        wall = time.monotonic() - started
        pool = server.stats()["pool"]
        busy = busy_connections(engine, server.application_name)
        opened = open_connections(engine, server.application_name)
    finally:
        server.stop()
    statuses = [answer.status for answer in answers]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert all(answer.headers.get("retry-after") == "1" for answer in answers if answer.status == 503)
    assert statuses.count(200) >= 40, "at least two waves of the pool answer"
    assert wall < 20
    assert pool["checked_out"] == 0 and busy == 0 and opened <= 20
    figure(f"1000 x pg_sleep(1), pool 20, timeout 2 s: {statuses.count(200)} x 200, "
           f"{statuses.count(503)} x 503 (Retry-After), 0 other, {wall:.1f} s; "
           f"after: checked_out 0, busy backends 0, open {opened}")


def test_sigterm_lets_in_flight_requests_finish(start_server, figure):
    server = start_server("-k", "gevent")
    in_flight = in_background(send_many, "GET", server.url("/sleep/postgres/?seconds=2"), [None] * 5)
    time.sleep(0.5)
    started = time.monotonic()
    os.kill(server.pid, signal.SIGTERM)
    exit_code = server.process.wait(35)
    in_flight.join()
    assert [answer.status for answer in in_flight.result] == [200] * 5
    assert exit_code == 0
    figure(f"5 in-flight 2 s requests all 200; master exited 0 {time.monotonic() - started:.1f} s after SIGTERM")


def test_sigkill_of_a_worker_is_replaced(start_server, figure):
    server = start_server("-k", "gevent")
    try:
        killed_pid = server.stats()["pid"]
        os.kill(killed_pid, signal.SIGKILL)
        started = time.monotonic()
        new_pid = wait_for_new_worker(server, killed_pid)
        replaced_in = time.monotonic() - started
        outcomes, _ = burst(server.url("/sleep/postgres/?seconds=0.2"), 20)
    finally:
        server.stop()
    assert new_pid != killed_pid
    assert [outcome.status for outcome in outcomes] == [200] * 20
    figure(f"worker {killed_pid} killed; new worker answering after {replaced_in:.1f} s; 20/20 200 after")


def test_500_concurrent_creates_lose_and_duplicate_nothing(green_server, seeded, figure):
    before = row_count(seeded)
    bodies = [{"title": f"concurrent {i}", "priority": i % 10} for i in range(500)]
    answers = send_many("POST", green_server.url("/todos"), bodies)
    created = [answer.json() for answer in answers if answer.status == 201]
    statuses = {answer.status for answer in answers}
    assert statuses <= {201, 503}, statuses
    assert row_count(seeded) - before == len(created)
    assert len({todo["id"] for todo in created}) == len(created)
    assert len({todo["title"] for todo in created}) == len(created)
    figure(f"500 concurrent POST: {len(created)} x 201, rows added {row_count(seeded) - before}, ids unique")


def test_200_concurrent_patches_of_one_row(green_server, seeded, figure):
    writes = [{"title": f"write {i}", "priority": i % 10, "done": i % 2 == 0} for i in range(200)]
    answers = send_many("PATCH", green_server.url("/todos/1"), writes)
    statuses = sorted({answer.status for answer in answers})
    final = request(green_server.url("/todos/1")).json()
    assert statuses == [200], statuses
    assert {key: final[key] for key in ("title", "priority", "done")} in writes
    figure(f"200 concurrent PATCH of one row: all 200; final row is write '{final['title']}'")


def children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def reload_under_load(server, signals) -> tuple[dict, dict, int | None]:
    """GET /todos at 200/s for 10 s and 20 sleeps of 6 s in flight through `server` while
    `signals(server)` runs, 2 s in; (the load's report, the sleeps' report, a new master's pid)."""
    load = in_background(loadtest_json, server, "--rate", "200", "-d", "10", "/todos")
    time.sleep(1)
    sleeps = in_background(loadtest_json, server, "20", "--seconds", "6", "--routes", "python")
    time.sleep(1)
    new_master = signals(server)
    load.join()
    sleeps.join()
    return load.result, sleeps.result, new_master


def loadtest_json(server, *args: str) -> dict:
    return loadtest_report(server.base_url, *args)


def hup_twice(server) -> None:
    os.kill(server.pid, signal.SIGHUP)
    time.sleep(3)
    os.kill(server.pid, signal.SIGHUP)


def binary_upgrade(server) -> int:
    """USR2: a new master (new code) beside the old; then TERM to the old one, whose workers
    finish what they hold. (WINCH, nginx's way to stop the old workers first, is ignored by
    gunicorn unless daemonized.)"""
    before = set(children(server.pid))
    os.kill(server.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (set(children(server.pid)) - before):
        time.sleep(0.1)
    new_master = (set(children(server.pid)) - before).pop()
    time.sleep(2)  # its workers boot
    os.kill(server.pid, signal.SIGTERM)
    return new_master


@pytest.mark.parametrize("how", ["HUP twice", "USR2 then TERM"])
def test_reload_under_load_drops_nothing(start_server, how, figure):
    server = start_server("-k", "gevent", "-w", "2")
    new_master = None
    try:
        load, sleeps, new_master = reload_under_load(server, hup_twice if how == "HUP twice" else binary_upgrade)
        after = request(server.url("/todos"))
    finally:
        server.stop()
        servers.stop(new_master)
    assert load["statuses"] == {"200": 2000} and not load["errors"], (load["statuses"], load["errors"])
    assert sleeps["statuses"] == {"200": 20} and not sleeps["errors"], (sleeps["statuses"], sleeps["errors"])
    assert after.status == 200
    figure(f"{how} with 2 workers under 200 GET/s for 10 s and 20 sleeps of 6 s in flight: "
           f"{load['statuses']}, max {load['latency_service']['max'] * 1000:.0f} ms; sleeps {sleeps['statuses']}")
