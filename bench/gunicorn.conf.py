"""gunicorn settings for the bench's floor and peer servers: nothing of the app's start-up
(no engine, no connection budget query), so the floor measures only itself; the same
connection limit, backlog and keep-alive as the app's, so a burst meets the same walls."""

from greenflask import limits
from greenflask.settings import Server

_server = Server.from_env()
control_socket_disable = True
worker_connections = _server.worker_connections
backlog = _server.backlog
keepalive = _server.keepalive


def on_starting(server):
    limits.raise_open_files(worker_connections + limits.SPARE + 100)
