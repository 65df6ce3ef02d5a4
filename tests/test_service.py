"""The service: modes, routes, sessions and pool, failure answers, --preload."""

import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
from conftest import ROOT, assert_error, burst, busy_connections, request, send_many
from sqlalchemy import text

SLEEP_ROUTES = ["/sleep/python/", "/sleep/postgres/"]


def statuses(outcomes) -> list:
    return sorted(outcome.status or outcome.error for outcome in outcomes)


# --- the three modes ---------------------------------------------------------------------


@pytest.mark.parametrize("route", SLEEP_ROUTES)
def test_default_gevent_mode_runs_20_sleeps_at_once(green_server, route):
    outcomes, wall = burst(green_server.url(f"{route}?seconds=1"), 20)
    assert statuses(outcomes) == [200] * 20
    assert wall < 3, f"20 concurrent 1 s sleeps took {wall:.2f} s"


def test_worker_reports_gevent_and_wait_callback(green_server):
    stats = green_server.stats()
    assert stats["worker_class"] == "gevent"
    assert stats["wait_callback"] is True
    assert stats["pool"]["size"] == 25 and stats["pool"]["max_overflow"] == 0
    assert "wait_callback=on" in green_server.log()


def test_sleep_routes_return_all_todos(green_server):
    answer = green_server.get("/sleep/postgres/?seconds=0")
    todos = answer.json()["todos"]
    assert answer.status == 200
    assert [todo["id"] for todo in todos] == sorted(todo["id"] for todo in todos)
    assert {"id", "title", "done", "priority", "due_at"} == set(todos[0])


def test_without_wait_callback_postgres_sleeps_serialise(start_server):
    server = start_server("-k", "gevent", env={"PSYCOGREEN": "0"})
    try:
        assert server.stats()["wait_callback"] is False
        _, python_wall = burst(server.url("/sleep/python/?seconds=0.5"), 5)
        _, postgres_wall = burst(server.url("/sleep/postgres/?seconds=0.5"), 5)
    finally:
        server.stop()
    assert python_wall < 1.5, "time.sleep is patched by gevent: concurrent"
    assert postgres_wall > 2.0, f"5 x 0.5 s pg_sleep took {postgres_wall:.2f} s: expected them in series"


def test_sync_worker_serialises_both_routes(start_server):
    server = start_server()
    try:
        stats = server.stats()
        _, postgres_wall = burst(server.url("/sleep/postgres/?seconds=0.5"), 4)
    finally:
        server.stop()
    assert stats["worker_class"] == "sync" and stats["wait_callback"] is False
    assert postgres_wall > 1.7, f"4 x 0.5 s took {postgres_wall:.2f} s under the sync worker"


def test_preload_with_two_workers_answers_concurrently(start_server):
    server = start_server("-k", "gevent", "-w", "2", "--preload")
    try:
        outcomes, wall = burst(server.url("/sleep/postgres/?seconds=1"), 20)
    finally:
        server.stop()
    assert statuses(outcomes) == [200] * 20
    assert wall < 3
    assert server.log().count("wait_callback=on") == 2, "each worker installs the callback after fork"


# --- CRUD ----------------------------------------------------------------------------------


# --- failure answers -----------------------------------------------------------------------


def test_pool_exhausted_is_fast_503_with_retry_after(start_server):
    server = start_server("-k", "gevent", env={"DB_POOL_SIZE": "2", "DB_POOL_TIMEOUT": "0.5"})
    try:
        outcomes, wall = burst(server.url("/sleep/postgres/?seconds=2"), 6)
        after = server.get("/todos")
        healthz = request(server.url("/healthz"))
    finally:
        server.stop()
    assert statuses(outcomes) == [200, 200, 503, 503, 503, 503]
    rejected = [o for o in outcomes if o.status == 503]
    assert all(o.latency < 1.5 for o in rejected), "a 503 comes after the pool timeout, not after the sleep"
    assert wall < 4
    assert after.status == 200 and healthz.status == 200


def test_pool_exhausted_answer_has_retry_after(start_server):
    server = start_server("-k", "gevent", env={"DB_POOL_SIZE": "1", "DB_POOL_TIMEOUT": "0.2"})
    try:
        holder = threading.Thread(target=server.get, args=("/sleep/postgres/?seconds=1.5",))
        holder.start()
        answer = server.get("/todos") if _wait_checked_out(server) else None
        holder.join()
    finally:
        server.stop()
    assert_error(answer, 503, "pool_exhausted")
    assert answer.headers["retry-after"] == "1"


def _wait_checked_out(server, within: float = 5) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if server.stats()["pool"]["checked_out"]:
            return True
        time.sleep(0.02)
    return False


def test_statement_timeout_is_504_and_next_request_works(start_server):
    server = start_server("-k", "gevent", env={"DB_STATEMENT_TIMEOUT": "300", "DB_POOL_SIZE": "1"})
    try:
        slow = server.get("/sleep/postgres/?seconds=2")
        after = server.get("/todos")
    finally:
        server.stop()
    assert_error(slow, 504, "statement_timeout")
    assert slow.headers["retry-after"] == "1"
    assert after.status == 200


def test_unreachable_database_is_503_and_worker_survives(start_server):
    server = start_server("-k", "gevent", database="postgresql://postgres@127.0.0.1:9/nowhere")
    try:
        answers = [server.get("/todos"), server.get("/healthz")]
        stats = server.stats()
    finally:
        server.stop()
    for answer in answers:
        assert_error(answer, 503, "database_unavailable")
        assert answer.headers["retry-after"] == "1"
    assert stats["pool"]["checked_out"] == 0


def test_no_connection_left_checked_out_after_a_burst(green_server, engine):
    burst(green_server.url("/sleep/postgres/?seconds=0.2"), 25)
    burst(green_server.url("/nope"), 10)
    assert green_server.stats()["pool"]["checked_out"] == 0
    assert busy_connections(engine, green_server.application_name) == 0


def test_workers_warn_when_pools_exceed_max_connections(start_server):
    server = start_server("-k", "gevent", "-w", "2", env={"DB_POOL_SIZE": "400"})
    try:
        assert server.get("/todos").status == 200, "the pool opens connections only on demand"
    finally:
        server.stop()
    log = server.log()
    assert "pool may exceed the server: 2 workers x (pool_size 400 + max_overflow 0) = 800" in log
    assert "mode=gevent wait_callback=on pool_size=400 max_overflow=0" in log


# --- Idempotency-Key ---------------------------------------------------------------------


def test_a_create_sent_again_with_its_idempotency_key_makes_one_row(green_server, engine, figure):
    """Ten copies at once and one later, as a client that lost its answers would send them:
    one row, and every answer the first one."""
    key = str(uuid.uuid4())
    title = f"once {key[:8]}"
    url = green_server.url("/todos")
    answers = send_many("POST", url, [{"title": title}] * 10, headers={"Idempotency-Key": key})
    later = request(url, "POST", {"title": title}, headers={"Idempotency-Key": key})
    other_fields = request(url, "POST", {"title": "something else"}, headers={"Idempotency-Key": key})
    bad_key = request(url, "POST", {"title": title}, headers={"Idempotency-Key": "x" * 256})
    with engine.connect() as conn:
        rows = conn.scalar(text("SELECT count(*) FROM todos WHERE title = :title"), {"title": title})

    assert [answer.status for answer in answers] == [201] * 10, answers
    assert len({answer.body for answer in [*answers, later]}) == 1, "every answer is the first one"
    assert later.status == 201 and later.headers["idempotent-replayed"] == "true"
    assert sum(answer.headers.get("idempotent-replayed") == "true" for answer in answers) == 9
    assert rows == 1
    assert_error(other_fields, 422, "idempotency_key_reused")
    assert_error(bad_key, 400, "bad_request")
    figure(f"Idempotency-Key: 10 concurrent POSTs and 1 later with one key -> 11 x 201, one body, {rows} row")


def expire_keys(database_url: str, hours: str = "24") -> subprocess.CompletedProcess:
    """`flask --app app expire-idempotency-keys`, as an operator's timer runs it."""
    env = {**os.environ, "DATABASE_URL": database_url, "IDEMPOTENCY_KEY_HOURS": hours}
    return subprocess.run([sys.executable, "-m", "flask", "--app", "app", "expire-idempotency-keys", "--batch", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_expired_idempotency_keys_are_deleted_and_a_replay_then_makes_a_new_row(green_server, engine, database_url):
    """Keys older than IDEMPOTENCY_KEY_HOURS go, in batches (here of 2); a younger one and one
    a request holds right now (FOR UPDATE SKIP LOCKED) stay; a key sent again after it
    expired makes a second todo."""
    url = green_server.url("/todos")
    keys = [f"expire-{uuid.uuid4()}" for _ in range(5)]
    first = [request(url, "POST", {"title": f"expiring {i}"}, headers={"Idempotency-Key": key})
             for i, key in enumerate(keys)]
    assert [answer.status for answer in first] == [201] * 5
    with engine.begin() as conn:  # the first four were stored 25 hours ago
        conn.execute(text("UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = ANY(:k)"),
                     {"k": keys[:4]})
    with engine.connect() as holder:  # a request holding the fourth
        holder.execute(text("SELECT 1 FROM idempotency_keys WHERE key = :k FOR UPDATE"), {"k": keys[3]})
        done = expire_keys(database_url)
        holder.rollback()
    with engine.connect() as conn:
        left = set(conn.scalars(text("SELECT key FROM idempotency_keys WHERE key = ANY(:k)"), {"k": keys}))
    again = request(url, "POST", {"title": "expiring 0"}, headers={"Idempotency-Key": keys[0]})
    kept = request(url, "POST", {"title": "expiring 4"}, headers={"Idempotency-Key": keys[4]})

    assert done.returncode == 0, done.stderr
    assert "deleted 3 idempotency keys older than 24 h" in done.stdout
    assert left == {keys[3], keys[4]}
    assert again.status == 201 and "idempotent-replayed" not in again.headers
    assert again.json()["id"] != first[0].json()["id"]
    assert kept.headers["idempotent-replayed"] == "true" and kept.json()["id"] == first[4].json()["id"]


def test_what_schemathesis_found_is_fixed(green_server):
    """A priority of 3.0 is the integer 3; the largest offset the document allows answers;
    a key replayed after its todo was deleted answers 409, not a 201 pointing at nothing;
    a 405 names what is allowed."""
    url = green_server.url("/todos")
    made = request(url, "POST", {"title": "three", "priority": 3.0})
    far = request(url + "?offset=1000000000&limit=1")
    key = f"spent-{uuid.uuid4()}"
    first = request(url, "POST", {"title": "soon gone"}, headers={"Idempotency-Key": key})
    deleted = request(green_server.url(f"/todos/{first.json()['id']}"), "DELETE")
    replay = request(url, "POST", {"title": "soon gone"}, headers={"Idempotency-Key": key})
    wrong_method = request(url, "PUT", {"title": "x"})

    assert made.status == 201 and made.json()["priority"] == 3 and b'"priority":3,' in made.body
    assert far.status == 200 and far.json()["todos"] == []
    assert deleted.status == 204
    assert_error(replay, 409, "idempotency_key_spent")
    assert_error(wrong_method, 405)
    assert set(wrong_method.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST", "HEAD", "OPTIONS"}
