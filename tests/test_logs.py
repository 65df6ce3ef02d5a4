"""Logs an operator can search: LOG_FORMAT=json gives one JSON object per line, and each
request's id (its X-Request-ID, or a new one) is in its answer and in every line it logged."""

import json

from conftest import send_many

from greenflask import logs


def test_json_lines_carry_each_requests_id(start_server, seeded):
    # A pool of one and a short wait: of three concurrent pg_sleeps, two answer 503 and log why.
    server = start_server("-k", "gevent", env={"LOG_FORMAT": "json", "ACCESS_LOG": "1", "DB_POOL_SIZE": "1",
                                               "DB_POOL_TIMEOUT": "0.2"})
    try:
        answers = [server.get("/sleep/postgres/?seconds=1", headers={"X-Request-ID": "trace-0"})]
        answers += send_many("GET", server.url("/sleep/postgres/?seconds=1"), [None] * 3)
        unnamed = server.get("/todos/1")
    finally:
        server.stop()
    lines = [line for line in server.log().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]  # every one a JSON object
    assert answers[0].headers["x-request-id"] == "trace-0"
    assert len(unnamed.headers["x-request-id"]) == 32, "a new id when the caller sends none"
    refused = [answer for answer in answers if answer.status == 503]
    assert refused, [answer.status for answer in answers]
    for answer in refused:
        rid = answer.headers["x-request-id"]
        mine = [record for record in records if record.get("request_id") == rid]
        assert any(record.get("message", "").startswith("503 pool_exhausted") for record in mine), mine
        assert any(record.get("status") == 503 and record.get("path") == "/sleep/postgres/" for record in mine), mine
    assert any(record.get("request_id") == "trace-0" and record.get("status") == 200 for record in records)


def test_a_request_id_that_is_not_sane_is_replaced(client):
    answer = client.get("/todos/1", headers={"X-Request-ID": "no spaces\\or; quotes\""})
    assert answer.headers["x-request-id"] != "no spaces\\or; quotes\"" and len(answer.headers["x-request-id"]) == 32
    assert logs.request_id.get() is None, "nothing left behind outside the request"
