"""gunicorn settings for the bench's floor and peer servers: nothing of the app's start-up
(no engine, no connection budget query), so the floor measures only itself."""

control_socket_disable = True
