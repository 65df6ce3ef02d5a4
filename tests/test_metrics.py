"""GET /metrics summed over gunicorn's workers, and the detector of a blocked event loop,
against real gunicorn processes and PostgreSQL."""

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, burst, in_background, send_many, wait_for_new_worker
from prometheus_client.parser import text_string_to_metric_families

from greenflask import metrics


def scrape(server) -> dict:
    """Every sample of one scrape: {(name, frozenset of labels): value}."""
    answer = server.get("/metrics")
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/plain")
    families = text_string_to_metric_families(answer.body.decode())
    return {(sample.name, frozenset(sample.labels.items())): sample.value for family in families
            for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def two_workers(start_server, engine):
    server = start_server("-k", "gevent", "-w", "2", env={"DB_POOL_SIZE": "5", "DB_POOL_TIMEOUT": "0.3"})
    yield server
    server.stop()


def test_a_scrape_sums_both_workers_whoever_answers(two_workers, seeded):
    before = value(scrape(two_workers), "greenflask_http_request_duration_seconds_count",
                   route="/todos", method="GET", status="200")
    # In waves of 10, the two pools' size: 200 at once would wait past the module's 0.3 s
    # pool timeout on a loaded machine, and a 503 is another test's subject.
    outcomes = [outcome for _ in range(20) for outcome in burst(two_workers.url("/todos"), 10)[0]]
    pids = set()
    for _ in range(200):  # one connection each: one worker may take many in a row
        pids.add(two_workers.stats()["pid"])
        if len(pids) == 2:
            break
    counts = {value(scrape(two_workers), "greenflask_http_request_duration_seconds_count",
                    route="/todos", method="GET", status="200") - before for _ in range(10)}
    assert [outcome.status for outcome in outcomes] == [200] * 200
    assert len(pids) == 2, "both workers answered"
    assert counts == {200}, "every scrape, whichever worker answers it, counts all 200"
    samples = scrape(two_workers)
    assert value(samples, "greenflask_db_pool_size") == 10, "2 workers x DB_POOL_SIZE 5"
    time.sleep(2 * metrics.PUBLISH_SECONDS)  # the other worker publishes its gauges this often
    samples = scrape(two_workers)
    assert value(samples, "greenflask_http_requests_in_flight") == 1, "only the scrape itself"


def test_route_label_is_the_url_rule_not_the_path(two_workers, seeded):
    two_workers.get("/todos/3")
    two_workers.get("/no/such/path")
    samples = scrape(two_workers)
    assert value(samples, "greenflask_http_request_duration_seconds_count",
                 route="/todos/<int:todo_id>", method="GET", status="200") >= 1
    assert value(samples, "greenflask_http_request_duration_seconds_count",
                 route="unmatched", method="GET", status="404") >= 1
    assert not any("/todos/3" in dict(labels).get("route", "") for _, labels in samples)


def test_pool_timeouts_are_counted_and_checked_out_returns_to_0(two_workers):
    before = value(scrape(two_workers), "greenflask_db_pool_timeouts_total")
    answers = send_many("GET", two_workers.url("/sleep/postgres/?seconds=1"), [None] * 30)
    statuses = [answer.status for answer in answers]
    time.sleep(2 * metrics.PUBLISH_SECONDS)  # each worker publishes its gauges this often
    samples = scrape(two_workers)
    assert statuses.count(503) >= 10
    assert value(samples, "greenflask_db_pool_timeouts_total") - before == statuses.count(503)
    assert value(samples, "greenflask_db_pool_checked_out") == 0, "idle: nothing checked out on any worker"


def test_a_killed_worker_leaves_the_sums(two_workers):
    assert value(scrape(two_workers), "greenflask_db_pool_size") == 10
    killed = two_workers.stats()["pid"]
    os.kill(killed, signal.SIGKILL)
    assert wait_for_new_worker(two_workers, killed) is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len({two_workers.stats()["pid"] for _ in range(10)}) < 2:
        time.sleep(0.2)
    assert value(scrape(two_workers), "greenflask_db_pool_size") == 10, "2 live workers, not 3"


@pytest.mark.parametrize(("psycogreen", "blocks_expected"), [("0", True), ("auto", False)])
def test_loop_blocks_are_caught_where_they_happen(start_server, seeded, psycogreen, blocks_expected):
    server = start_server("-k", "gevent", env={"PSYCOGREEN": psycogreen})
    try:
        in_flight = in_background(send_many, "GET", server.url("/sleep/postgres/?seconds=0.5"), [None] * 4)
        in_flight.join()
        time.sleep(0.5)  # blocks are reported once the loop runs again
        samples = scrape(server)
        stats = server.stats()["loop_blocks"]
    finally:
        server.stop()
    blocked = value(samples, "greenflask_event_loop_blocked_total")
    warnings = [line for line in server.log().splitlines() if "event loop blocked for" in line]
    assert {answer.status for answer in in_flight.result} == {200}
    if blocks_expected:
        # A fresh clone's first request may also block briefly where it starts (imports on
        # first use): every block is counted, and those of the pg_sleeps name them.
        sleeps = [line for line in warnings if "models.py" in line and "in pg_sleep" in line]
        assert blocked == stats["count"] == len(warnings) and len(sleeps) >= 3, warnings
        ids = {answer.headers["x-request-id"] for answer in in_flight.result}
        assert all(line.rsplit("request_id=", 1)[-1] in ids for line in sleeps), "each names the blocking request"
        assert 0.3 < stats["longest_seconds"] < 1.0
        assert value(samples, "greenflask_event_loop_blocked_seconds_count") == blocked
    else:
        assert blocked == 0 and stats["count"] == 0 and not warnings


def test_detector_is_off_under_the_sync_worker_and_with_0(start_server):
    sync = start_server()
    off = start_server("-k", "gevent", env={"LOOP_BLOCK_WARN_MS": "0"})
    try:
        logs = sync.log() + off.log()
    finally:
        sync.stop()
        off.stop()
    assert "block detector on" not in logs


def test_the_metrics_folder_lives_as_long_as_the_server(start_server):
    server = start_server("-k", "gevent")
    folder = Path(re.search(r"metrics of all workers in (\S+)", server.log()).group(1))
    existed = folder.is_dir()
    server.stop()
    assert existed and not folder.exists(), "made at start, removed at exit"


@pytest.mark.skipif(os.geteuid() != 0, reason="a /dev/shm of its own (a mount namespace) needs root")
def test_a_server_that_cannot_start_leaves_no_metrics_folder():
    """In a mount namespace with an empty /dev/shm of its own: the servers other tests start
    meanwhile make and remove their folders in the machine's."""
    script = (f"mount -t tmpfs none /dev/shm && {shlex.quote(sys.executable)} -m gunicorn app:app -b 127.0.0.1:0;"
              " echo exit=$?; ls -A /dev/shm")
    failed = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], cwd=ROOT,
                            env={**os.environ, "GUNICORN_TIMEOUT": "soon"}, capture_output=True, text=True, timeout=30)
    assert "GUNICORN_TIMEOUT" in failed.stderr, failed.stderr
    assert failed.stdout.startswith("exit=") and not failed.stdout.startswith("exit=0"), failed.stdout
    assert failed.stdout.splitlines()[1:] == [], "a server that cannot start leaves no folder"
