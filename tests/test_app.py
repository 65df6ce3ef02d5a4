"""The fast layer: the app in this process (Flask's test client) against the real database,
for routes, validation and error shapes. What needs a real server (concurrency, signals,
faults) is tested against gunicorn in the other modules."""

from conftest import assert_error, row_count

import seed


def test_crud_round_trip(client, seeded):
    created = client.get("/todos", method="POST", body={"title": "write tests", "priority": 3})
    assert created.status == 201, created
    todo = created.json()
    assert todo == {"id": todo["id"], "title": "write tests", "done": False, "priority": 3, "due_at": None}
    assert created.headers["location"] == f"/todos/{todo['id']}"
    assert client.get(created.headers["location"]).json() == todo

    patched = client.get(f"/todos/{todo['id']}", method="PATCH", body={"done": True})
    assert patched.status == 200 and patched.json()["done"] is True
    due = client.get(f"/todos/{todo['id']}", method="PATCH", body={"due_at": "2027-01-31T23:30:00-05:00"})
    assert due.status == 200 and due.json()["due_at"] == "2027-02-01T04:30:00+00:00"
    assert client.get(f"/todos/{todo['id']}").json()["due_at"] == "2027-02-01T04:30:00+00:00"
    undue = client.get(f"/todos/{todo['id']}", method="PATCH", body={"due_at": None})
    assert undue.status == 200 and undue.json()["due_at"] is None

    assert client.get(f"/todos/{todo['id']}", method="DELETE").status == 204
    assert client.get(f"/todos/{todo['id']}").status == 404
    assert client.get(f"/todos/{todo['id']}", method="DELETE").status == 404
    assert row_count(seeded) == 50


def test_list_pages_and_filters(client, seeded):
    first = client.get("/todos?limit=10&offset=5").json()
    assert [todo["id"] for todo in first["todos"]] == list(range(6, 16))
    done = client.get("/todos?done=true&limit=1000").json()["todos"]
    assert len(done) == 25 and all(todo["done"] for todo in done)
    assert len(client.get("/todos").json()["todos"]) == 50



def test_unknown_route_is_json_404(client):
    assert_error(client.get("/nope"), 404)


def test_bad_seconds_is_400(client):
    for value in ("abc", "-1", "nan", "inf", "61", "1e400"):
        assert_error(client.get(f"/sleep/python/?seconds={value}"), 400, "bad_request")


def test_body_over_limit_is_413(client):
    answer = client.get("/todos", method="POST", body="x" * 70_000, headers={"Content-Type": "application/json"})
    assert_error(answer, 413)


def test_malformed_json_is_400(client):
    answer = client.get("/todos", method="POST", body="{nope", headers={"Content-Type": "application/json"})
    assert_error(answer, 400)


def test_seed_twice_leaves_50_rows(seeded):
    assert seed.seed(seeded) == 0
    assert row_count(seeded) == 50
