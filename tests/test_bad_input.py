"""Garbage in, a 4xx JSON error out: never a 5xx, never a changed table, never a leak.

In process (Flask's test client, the real database): these need no real server. The
chunked-body case, which does, is in test_faults.py."""

import json
import re
import subprocess

from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

JSON = {"Content-Type": "application/json"}
URL_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:[^@\s/{]+@")

# (method, path, body, headers): each must answer a 4xx JSON error and change nothing.
MALFORMED = [
    ("POST", "/todos", "", JSON),
    ("POST", "/todos", "{nope", JSON),
    ("POST", "/todos", "[1, 2]", JSON),
    ("POST", "/todos", '"just a string"', JSON),
    ("POST", "/todos", "null", JSON),
    ("POST", "/todos", "{}", JSON),
    ("POST", "/todos", '{"title": ""}', JSON),
    ("POST", "/todos", '{"title": "' + "x" * 61 + '"}', JSON),
    ("POST", "/todos", '{"title": 42}', JSON),
    ("POST", "/todos", '{"title": null}', JSON),
    ("POST", "/todos", '{"title": "ok", "done": "yes"}', JSON),
    ("POST", "/todos", '{"title": "ok", "done": 1}', JSON),
    ("POST", "/todos", '{"title": "ok", "priority": "high"}', JSON),
    ("POST", "/todos", '{"title": "ok", "priority": 2.5}', JSON),
    ("POST", "/todos", '{"title": "ok", "priority": NaN}', JSON),
    ("POST", "/todos", '{"title": "ok", "priority": Infinity}', JSON),
    ("POST", "/todos", '{"title": "ok", "priority": -Infinity}', JSON),
    ("POST", "/todos", '{"title": "ok", "priority": 1e400}', JSON),
    ("POST", "/todos", '{"title": "ok", "priority": 99999999999999999999999999}', JSON),
    ("POST", "/todos", '{"title": "ok", "priority": -1}', JSON),
    ("POST", "/todos", '{"title": "ok", "priority": true}', JSON),
    ("POST", "/todos", '{"title": "ok", "owner": "me"}', JSON),
    ("POST", "/todos", '{"title": "\\u0000"}', JSON),
    ("POST", "/todos", '{"title": "\\ud800"}', JSON),
    ("POST", "/todos", b'{"title": "\xff\xfe"}', JSON),
    ("POST", "/todos", '{"title": "ok"}', {"Content-Type": "text/plain"}),
    ("POST", "/todos", '{"title": "ok"}', {}),
    ("POST", "/todos", "x" * 1_000_000, JSON),
    ("POST", "/todos", "[" * 50_000, JSON),
    ("POST", "/todos", '{"title": "\'; DROP TABLE todos; --"}', {"Content-Type": "application/xml"}),
    ("PATCH", "/todos/1", "{}", JSON),
    ("PATCH", "/todos/1", '{"due_at": "2027-01-31"}', JSON),
    ("PATCH", "/todos/1", '{"due_at": "2027-01-31T10:00:00"}', JSON),
    ("PATCH", "/todos/1", '{"due_at": "1969-12-31T23:00:00Z"}', JSON),
    ("PATCH", "/todos/1", '{"due_at": "2027-02-30T10:00:00Z"}', JSON),
    ("PATCH", "/todos/1", '{"due_at": "2016-12-31T23:59:60Z"}', JSON),
    ("PATCH", "/todos/1", '{"due_at": "2027-01-31T10:00:00+00:60"}', JSON),
    ("PATCH", "/todos/1", '{"due_at": 1735689600}', JSON),
    ("PATCH", "/todos/1", '{"id": 7}', JSON),
    ("PATCH", "/todos/1", '{"title": "ok", "priority": 10}', JSON),
    ("PATCH", "/todos/999999", '{"title": "absent"}', JSON),
    ("PATCH", "/todos/99999999999999999999", '{"title": "absent"}', JSON),
    ("DELETE", "/todos/0", None, {}),
    ("DELETE", "/todos/-1", None, {}),
    ("GET", "/todos/abc", None, {}),
    ("GET", "/todos/1;DROP%20TABLE%20todos", None, {}),
    ("GET", "/todos?limit=0", None, {}),
    ("GET", "/todos?limit=100000", None, {}),
    ("GET", "/todos?limit=-5", None, {}),
    ("GET", "/todos?limit=1e3", None, {}),
    ("GET", "/todos?offset=abc", None, {}),
    ("GET", "/todos?done=maybe", None, {}),
    # What schemathesis found int() and float() would take: non-ASCII digits, "1_0", "yes".
    ("GET", "/todos?limit=%D9%A3", None, {}),
    ("GET", "/todos?done=1", None, {}),
    ("GET", "/todos?done=yes", None, {}),
    ("GET", "/sleep/python/?seconds=1_0", None, {}),
    ("GET", "/sleep/python/?seconds=%205", None, {}),
    ("GET", "/todos?done=1%27%20OR%20%271%27=%271", None, {}),
    ("GET", "/sleep/postgres/?seconds=1;SELECT%201", None, {}),
    ("GET", "/sleep/postgres/?seconds=NaN", None, {}),
    ("GET", "/sleep/python/?seconds=Infinity", None, {}),
    ("GET", "/sleep/python/?seconds=-0.5", None, {}),
    ("GET", "/sleep/python/?seconds=" + "9" * 400, None, {}),
    ("PUT", "/todos/1", '{"title": "ok"}', JSON),
    ("DELETE", "/todos", None, {}),
    ("POST", "/healthz", None, {}),
    ("TRACE", "/todos", None, {}),
    ("GET", "/../etc/passwd", None, {}),
    ("GET", "/admin", None, {}),
]


def table_fingerprint(engine) -> tuple:
    with engine.connect() as conn:
        content = "md5(coalesce(string_agg(t::text, ',' ORDER BY id), ''))"
        return conn.execute(text(f"SELECT count(*), {content} FROM todos t")).one()


def test_malformed_requests_get_4xx_json_and_change_nothing(client, seeded, figure):
    before = table_fingerprint(seeded)
    failures, statuses = [], {}
    for method, path, body, headers in MALFORMED:
        answer = client.get(path, method=method, body=body, headers=headers)
        statuses[answer.status] = statuses.get(answer.status, 0) + 1
        problem = _problem(answer)
        if problem:
            failures.append(f"{method} {path[:40]} {str(body)[:40]!r}: {problem}")
    assert not failures, "\n".join(failures)
    assert table_fingerprint(seeded) == before
    assert client.get("/todos").status == 200, "the next request works"
    figure(f"{len(MALFORMED)} malformed requests: statuses {dict(sorted(statuses.items()))}; table unchanged")


def _problem(answer) -> str | None:
    if not 400 <= answer.status < 500:
        return f"status {answer.status}"
    try:
        error = json.loads(answer.body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"not a JSON error: {answer.body[:80]!r}"
    if error.get("status") != answer.status:
        return "status in body differs"
    if any(leak in answer.body for leak in (b"Traceback", b"SELECT", b"psycopg2", b"sqlalchemy", b"DROP")):
        return "leaks internals or echoes input"
    return None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
todo_bodies = st.dictionaries(
    st.sampled_from(["title", "done", "priority", "id", "owner", ""]) | st.text(max_size=8), json_values, max_size=5
) | json_values


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=todo_bodies, method=st.sampled_from(["POST /todos", "PATCH /todos/1"]))
def test_no_json_body_makes_a_5xx(client, body, method):
    verb, path = method.split()
    payload = json.dumps(body, allow_nan=True)
    answer = client.get(path, method=verb, body=payload, headers=JSON)
    assert answer.status < 500, (payload, answer)


def test_no_debug_mode_and_no_secrets_in_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    sources = [ROOT / name for name in tracked if name.endswith((".py", ".cfg", ".toml", ".txt", ".sh"))]
    sources = [path for path in sources if path.name != "test_bad_input.py"]
    for path in sources:
        content = path.read_text()
        for needle in ("debug=True", "DEBUG = True", "DEBUG=True", "SECRET_KEY", "FLASK_DEBUG"):
            assert needle not in content, f"{needle} in {path.name}"
        assert not URL_WITH_PASSWORD.search(content), f"a URL with a password in {path.name}"
