"""The routes, in one Blueprint: the original demo's two sleeps, the todos, health and stats.
The public ones are described in openapi.yaml, served at /openapi.json."""

import copy
import functools
import hashlib
import json
import os
import time
from pathlib import Path

import yaml
from flask import Blueprint, jsonify, request, url_for

import db
import models
import validation
from errors import ApiError, not_found
from greenflask import connections, green, limits, loopblock, metrics, settings

bp = Blueprint("todos", __name__)


@bp.get("/sleep/python/")
def sleep_python():
    """`time.sleep(S)`: blocks the worker unless gevent has patched `time`."""
    seconds = validation.sleep_seconds(request.args, settings.current().sleep_max_seconds)
    time.sleep(seconds)
    return jsonify(todos=db.read(models.all_todos))


@bp.get("/sleep/postgres/")
def sleep_postgres():
    """`SELECT pg_sleep(S)`: blocks the worker unless psycopg2's wait callback is green."""
    seconds = validation.sleep_seconds(request.args, settings.current().sleep_max_seconds)
    db.read(models.pg_sleep, seconds)
    return jsonify(todos=db.read(models.all_todos))


@bp.get("/todos")
def list_todos():
    limit, offset, done = validation.page(request.args)
    todos = db.read(models.list_todos, limit, offset, done)
    return jsonify(todos=todos, limit=limit, offset=offset)


@bp.post("/todos")
def create_todo():
    """201 and the new todo. With `Idempotency-Key`, a request sent again gets the first
    answer (and `Idempotent-Replayed: true`) instead of a second row; 409 once that todo
    has been deleted."""
    fields = validation.todo_fields(validation.json_object(request), partial=False)
    key = validation.idempotency_key(request.headers)
    session = db.write_session()
    if key is not None:
        fingerprint = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
        if (first := models.claim_idempotency_key(session, key, fingerprint)) is not None:
            if first["fingerprint"] != fingerprint:
                raise ApiError(422, "idempotency_key_reused", "this Idempotency-Key was sent with other fields")
            made = json.loads(first["body"])
            if models.get_todo(session, made["id"]) is None:
                # The first answer would point at a todo that is no more; making another
                # would do twice what the key was sent to do once.
                raise ApiError(409, "idempotency_key_spent",
                               f"this Idempotency-Key made todo {made['id']}, which has since been deleted")
            response = _created(made)
            response.headers["Idempotent-Replayed"] = "true"
            return response
    response = _created(models.create_todo(session, fields))
    if key is not None:
        models.store_answer(session, key, response.status_code, response.get_data(as_text=True))
    session.commit()
    return response


def _created(todo: dict):
    response = jsonify(todo)
    response.status_code = 201
    response.headers["Location"] = url_for("todos.get_todo", todo_id=todo["id"])
    return response


@bp.get("/todos/<int:todo_id>")
def get_todo(todo_id: int):
    return jsonify(_found(db.read(models.get_todo, validation.todo_id(todo_id))))


@bp.patch("/todos/<int:todo_id>")
def patch_todo(todo_id: int):
    fields = validation.todo_fields(validation.json_object(request), partial=True)
    session = db.write_session()
    todo = _found(models.update_todo(session, validation.todo_id(todo_id), fields))
    session.commit()
    return jsonify(todo)


@bp.delete("/todos/<int:todo_id>")
def delete_todo(todo_id: int):
    session = db.write_session()
    _found(models.delete_todo(session, validation.todo_id(todo_id)))
    session.commit()
    return "", 204


@bp.get("/healthz")
def healthz():
    """200 when this worker reaches the database (`db.check_reachable`); otherwise 503."""
    db.check_reachable()
    return jsonify(status="ok")


@bp.get("/stats")
def stats():
    """This host and worker's mode, pool, client connections against their limit and
    event-loop blocks, without taking a connection (but one to ask a read replica, when
    there is one, its lag)."""
    return jsonify(
        host=settings.current().host_name,
        pid=os.getpid(),
        worker_class="gevent" if green.socket_is_green() else "sync",
        wait_callback=green.installed(),
        pgbouncer=settings.current().pgbouncer,
        pool=db.engines().pool_status(),
        connections={**connections.stats, "open_files_limit": limits.open_files()[0]},
        replica=db.engines().replica_status(),
        loop_blocks=loopblock.stats,
    )


@bp.get("/metrics")
def prometheus_metrics():
    """Prometheus text format, summed over every live worker (greenflask/metrics.py)."""
    body, content_type = metrics.exposition(settings.current().metrics_dir)
    return body, 200, {"Content-Type": content_type}


OPENAPI_FILE = Path(__file__).resolve().parent / "openapi.yaml"


@functools.cache
def _openapi_document() -> dict:
    return yaml.safe_load(OPENAPI_FILE.read_text())


@bp.get("/openapi.json")
def openapi():
    """openapi.yaml as JSON, with this server's SLEEP_MAX_SECONDS as the sleeps' maximum."""
    document = copy.deepcopy(_openapi_document())
    document["components"]["parameters"]["seconds"]["schema"]["maximum"] = settings.current().sleep_max_seconds
    return jsonify(document)


def _found(value):
    if not value:
        raise not_found()
    return value
