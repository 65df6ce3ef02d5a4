"""greenflask: Flask + plain SQLAlchemy + PostgreSQL serving many slow requests at once.

    gunicorn app:app                        # sync worker: everything serialises
    PSYCOGREEN=0 gunicorn app:app -k gevent # gevent, blocking psycopg2: /sleep/postgres/ serialises
    gunicorn app:app -k gevent              # gevent + green wait callback: both routes concurrent
"""

import logging
import os
import time

from flask import Flask, current_app, jsonify, request, url_for

import db
import models
import validation
from config import Settings
from errors import ApiError, register_error_handlers


def create_app(settings: Settings | None = None) -> Flask:
    """The app factory. It opens no connection: the engine is made per process on first use."""
    settings = settings or Settings.from_env()
    _configure_logging()
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes, GREENFLASK=settings)
    app.json.sort_keys = False
    db.init_app(app)
    register_error_handlers(app)
    _register_routes(app)
    return app


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(process)d] [%(levelname)s] %(name)s: %(message)s")


def _settings() -> Settings:
    return current_app.config["GREENFLASK"]


def _register_routes(app: Flask) -> None:
    @app.get("/sleep/python/")
    def sleep_python():
        """`time.sleep(S)`: blocks the worker unless gevent has patched `time`."""
        seconds = validation.sleep_seconds(request.args, _settings().sleep_max_seconds)
        time.sleep(seconds)
        return jsonify(todos=models.all_todos(db.get_session(read_only=True)))

    @app.get("/sleep/postgres/")
    def sleep_postgres():
        """`SELECT pg_sleep(S)`: blocks the worker unless psycopg2's wait callback is green."""
        seconds = validation.sleep_seconds(request.args, _settings().sleep_max_seconds)
        session = db.get_session(read_only=True)
        models.pg_sleep(session, seconds)
        return jsonify(todos=models.all_todos(session))

    @app.get("/todos")
    def list_todos():
        limit, offset, done = validation.page(request.args)
        todos = models.list_todos(db.get_session(read_only=True), limit, offset, done)
        return jsonify(todos=todos, limit=limit, offset=offset)

    @app.post("/todos")
    def create_todo():
        fields = validation.todo_fields(validation.json_object(request), partial=False)
        session = db.get_session()
        todo = models.create_todo(session, fields)
        session.commit()
        response = jsonify(todo)
        response.status_code = 201
        response.headers["Location"] = url_for("get_todo", todo_id=todo["id"])
        return response

    @app.get("/todos/<int:todo_id>")
    def get_todo(todo_id: int):
        todo = models.get_todo(db.get_session(read_only=True), validation.todo_id(todo_id))
        return jsonify(_found(todo))

    @app.patch("/todos/<int:todo_id>")
    def patch_todo(todo_id: int):
        fields = validation.todo_fields(validation.json_object(request), partial=True)
        session = db.get_session()
        todo = _found(models.update_todo(session, validation.todo_id(todo_id), fields))
        session.commit()
        return jsonify(todo)

    @app.delete("/todos/<int:todo_id>")
    def delete_todo(todo_id: int):
        session = db.get_session()
        _found(models.delete_todo(session, validation.todo_id(todo_id)))
        session.commit()
        return "", 204

    @app.get("/healthz")
    def healthz():
        """200 when `SELECT 1` answers; otherwise the error handlers answer 503."""
        models.ping(db.get_session(read_only=True))
        return jsonify(status="ok")

    @app.get("/stats")
    def stats():
        """This worker's mode and pool, without taking a connection."""
        return jsonify(
            pid=os.getpid(),
            worker_class="gevent" if db.socket_is_green() else "sync",
            wait_callback=db.wait_callback_installed(),
            pool=db.pool_status(),
        )


def _found(value):
    if not value:
        raise ApiError(404, "not_found", "no such todo")
    return value


app = create_app()
