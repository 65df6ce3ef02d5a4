"""Never hang: real gunicorn workers talk to the real PostgreSQL through a fault-injecting
proxy (tests/faultproxy.py) that the tests stall, black-hole, reset and slow down.

Bounds are shortened for the tests: connecting and the liveness check 1 s
(DB_CONNECT_TIMEOUT), statements 2 s on the server (DB_STATEMENT_TIMEOUT) + 1 s of margin
in the worker. Each test records the slowest answer, the time to recovery once the proxy
forwards again, and the connections left checked out (RELIABILITY.md's table).
"""

import time

import pytest
from conftest import in_background, request, send_many
from faultproxy import FaultProxy

from greenflask import engine

CONNECT_BOUND = 1.0
STATEMENT_BOUND = 2.0 + 1.0
FAULT_ENV = {
    "DB_CONNECT_TIMEOUT": str(CONNECT_BOUND),
    "DB_STATEMENT_TIMEOUT": "2000",
    "DB_POOL_SIZE": "10",
    "DB_POOL_TIMEOUT": "1",
    "GUNICORN_TIMEOUT": "4",
}
# Time for gevent, the client and a busy 2-core machine on top of a bound.
SLACK = 1.5


@pytest.fixture
def proxy(database_url, seeded):
    with FaultProxy(database_url) as proxy:
        yield proxy


@pytest.fixture
def proxied_server(start_server, proxy):
    """Factory: a gunicorn whose DATABASE_URL goes through the proxy."""

    def start(*worker_args: str):
        return start_server(*worker_args, database=proxy.url, env=FAULT_ENV)

    return start


def timed(function, *args):
    started = time.monotonic()
    result = function(*args)
    return result, time.monotonic() - started


def codes(answers) -> set:
    return {(answer.status, answer.json()["error"]["code"] if answer.status >= 400 else None) for answer in answers}


def recovery_seconds(server, within: float = 15) -> float | None:
    """Seconds until GET /todos answers 200 again, polling every 0.1 s."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        try:
            if server.get("/todos", timeout=5).status == 200:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.1)
    return None


def forward_and_recover(proxy, server) -> tuple[float, int]:
    """Let the proxy forward again; (seconds until GET /todos answers 200, connections left
    checked out once idle), both checked: back within a few seconds, nothing left held."""
    proxy.set_mode("forward")
    recovered = recovery_seconds(server)
    left = checked_out_when_idle(server)
    assert recovered is not None and recovered < 5, "back without a restart"
    assert left == 0, "no connection left checked out"
    return recovered, left


def checked_out_when_idle(server, within: float = 5) -> int:
    deadline = time.monotonic() + within
    while (checked_out := server.stats()["pool"]["checked_out"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return checked_out


def test_stall_mid_query_answers_504_and_recovers(proxied_server, proxy, figure):
    server = proxied_server("-k", "gevent")
    assert server.get("/todos").status == 200
    time.sleep(engine.LIVENESS_BYPASS_SECONDS + 0.2)  # so the new requests below find no unchecked connection
    in_flight = in_background(timed, send_many, "GET", server.url("/sleep/postgres/?seconds=1"), [None] * 5)
    time.sleep(0.3)
    proxy.set_mode("stall")
    stats, stats_seconds = timed(server.get, "/stats")
    new, new_seconds = timed(send_many, "GET", server.url("/todos"), [None] * 5)
    in_flight.join()
    stuck, stuck_seconds = in_flight.result
    recovered, left = forward_and_recover(proxy, server)

    assert stats.status == 200 and stats_seconds < 0.5, "a route without the database answers at once"
    assert codes(stuck) == {(504, "statement_timeout")}, stuck
    assert all(answer.headers["retry-after"] == "1" for answer in stuck + new)
    assert stuck_seconds < STATEMENT_BOUND + SLACK
    assert codes(new) == {(503, "database_unavailable")}, new
    assert new_seconds < CONNECT_BOUND + SLACK
    assert server.log().count("504 statement_timeout: statement: no answer") == 5, "logged once per request"
    figure(f"stall mid-query | statement {STATEMENT_BOUND:g} s | 5 in flight: 504 in {stuck_seconds:.2f} s; "
           f"5 new: 503 in {new_seconds:.2f} s; /stats in {stats_seconds * 1000:.0f} ms | "
           f"recovered in {recovered:.2f} s | checked out {left}")


def test_stall_between_requests_answers_503_and_recovers(proxied_server, proxy, figure):
    server = proxied_server("-k", "gevent")
    assert {answer.status for answer in send_many("GET", server.url("/todos"), [None] * 10)} == {200}
    time.sleep(engine.LIVENESS_BYPASS_SECONDS + 0.2)  # idle long enough to be checked on checkout
    proxy.set_mode("stall")
    new, new_seconds = timed(send_many, "GET", server.url("/todos"), [None] * 10)
    healthz, healthz_seconds = timed(server.get, "/healthz")
    recovered, left = forward_and_recover(proxy, server)

    assert codes(new + [healthz]) == {(503, "database_unavailable")}, new
    assert max(new_seconds, healthz_seconds) < CONNECT_BOUND + SLACK
    assert "liveness: no answer from the database within 1 s" in server.log()
    figure(f"stall between requests (idle pooled connections) | liveness {CONNECT_BOUND:g} s | "
           f"10 new: 503 in {new_seconds:.2f} s, /healthz 503 in {healthz_seconds:.2f} s | "
           f"recovered in {recovered:.2f} s | checked out {left}")


@pytest.mark.parametrize("worker", ["gevent", "sync"])
def test_black_hole_at_start_answers_503_and_recovers(proxied_server, proxy, worker, figure):
    proxy.set_mode("blackhole")
    server = proxied_server(*(["-k", "gevent"] if worker == "gevent" else []))
    answers, seconds = timed(lambda: [server.get(path) for path in ("/todos", "/healthz")])
    stats, stats_seconds = timed(server.get, "/stats")
    recovered, left = forward_and_recover(proxy, server)

    # libpq's own connect_timeout (sync worker) counts whole seconds, at least 2.
    bound = CONNECT_BOUND if worker == "gevent" else 2.0
    assert codes(answers) == {(503, "database_unavailable")}, answers
    assert seconds < 2 * (bound + SLACK), "two requests, one after the other"
    assert stats.status == 200 and stats_seconds < 0.5
    figure(f"black hole at start ({worker}) | connect {bound:g} s | /todos then /healthz: 503 in "
           f"{seconds:.2f} s for both | recovered in {recovered:.2f} s | checked out {left}")


def test_every_connection_reset_answers_503_and_recovers(proxied_server, proxy, figure):
    server = proxied_server("-k", "gevent")
    assert {answer.status for answer in send_many("GET", server.url("/todos"), [None] * 5)} == {200}
    proxy.set_mode("reset")
    new, new_seconds = timed(send_many, "GET", server.url("/todos"), [None] * 10)
    recovered, left = forward_and_recover(proxy, server)

    assert codes(new) == {(503, "database_unavailable")}, new
    assert new_seconds < 1.0, "a reset is an answer: no bound needs to pass"
    figure(f"every connection reset | none needed | 10 new: 503 in {new_seconds:.2f} s | "
           f"recovered in {recovered:.2f} s | checked out {left}")


def test_added_latency_slows_answers_but_they_stay_200(proxied_server, proxy, figure):
    server = proxied_server("-k", "gevent")
    baseline, baseline_seconds = timed(send_many, "GET", server.url("/todos"), [None] * 20)
    proxy.set_mode("forward", delay=0.005)
    slowed, slowed_seconds = timed(send_many, "GET", server.url("/todos"), [None] * 20)
    one_slowed, one_seconds = timed(server.get, "/todos")
    proxy.set_mode("forward")
    left = checked_out_when_idle(server)

    assert {answer.status for answer in baseline + slowed + [one_slowed]} == {200}
    assert one_seconds > 0.005, "the delay is really there"
    assert left == 0
    figure(f"5 ms added per chunk | none reached | 20 concurrent: 200 in {slowed_seconds:.2f} s "
           f"(without delay {baseline_seconds:.2f} s), one alone {one_seconds * 1000:.0f} ms | - | checked out {left}")


def status_or_zero(url: str) -> int:
    """The status of one GET with no retry, or 0 when the connection ends without an answer."""
    try:
        return request(url).status
    except OSError:
        return 0


def test_sync_worker_stalled_mid_query_is_ended_by_gunicorn_timeout(proxied_server, proxy, figure):
    """What holds under the sync worker: libpq blocks in a stalled read, no callback can
    bound it, so gunicorn's worker timeout ends the request and a new worker takes over."""
    server = proxied_server()
    assert server.get("/todos").status == 200
    old_pid = server.stats()["pid"]
    stuck = in_background(timed, status_or_zero, server.url("/sleep/postgres/?seconds=1"))
    time.sleep(0.3)
    proxy.set_mode("stall")
    stuck.join()
    status, stuck_seconds = stuck.result
    proxy.set_mode("forward")
    recovered = recovery_seconds(server)
    new_pid = server.stats()["pid"]

    assert status == 0, "the worker was killed: the connection closed without an answer"
    assert stuck_seconds < int(FAULT_ENV["GUNICORN_TIMEOUT"]) + 2 * SLACK
    assert new_pid != old_pid, "gunicorn replaced the stuck worker"
    assert recovered is not None and recovered < 5
    figure(f"stall mid-query (sync) | GUNICORN_TIMEOUT {FAULT_ENV['GUNICORN_TIMEOUT']} s | "
           f"connection closed without an answer after {stuck_seconds:.2f} s (worker killed, replaced) | "
           f"recovered in {recovered:.2f} s | new worker")


def test_chunked_body_over_the_limit_is_413(green_server):
    body = b'{"title": "' + b"x" * 2_000_000 + b'"}'
    answer = request(green_server.url("/todos"), "POST", body=iter([body]),
                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    assert answer.status == 413, answer
    assert answer.json()["error"]["status"] == 413
    small = request(green_server.url("/todos"), "POST", body=iter([b'{"title": "chunked"}']),
                    headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    assert small.status == 201, small
