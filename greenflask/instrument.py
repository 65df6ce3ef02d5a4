"""The per-request instrumentation as one WSGI middleware around Flask's `wsgi_app`: the
request id (greenflask/requestid.py) and, with METRICS on, the request's duration by URL
rule, method and status (greenflask/metrics.py).

One function call per request instead of six Flask hooks (three for metrics, three for the
request id), and no Prometheus file written for the in-flight gauge on the hot path: the
count is a plain integer that metrics.publish() writes out (BENCHMARKS.md, "Speed").
"""

import time

from flask import request
from gevent import getcurrent

from greenflask import logs, metrics, requestid

HEADER = requestid.HEADER


class Instrumented:
    """`app.wsgi_app = Instrumented(app.wsgi_app, timed)`."""

    def __init__(self, wsgi_app, timed: bool):
        self.wsgi_app = wsgi_app
        self.timed = timed

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        request_id = environ[requestid.ENVIRON_KEY] = requestid.of(environ)
        token = logs.request_id.set(request_id)
        setattr(getcurrent(), requestid.ATTRIBUTE, request_id)
        code, route = "500", "unmatched"  # what an exception out of Flask itself counts as

        def start(status, headers, exc_info=None):
            nonlocal code, route
            headers.append((HEADER, request_id))
            # Called by Flask's response while the request context is still pushed.
            rule = request.url_rule
            code, route = status[:3], rule.rule if rule else "unmatched"
            return start_response(status, headers, exc_info)

        metrics.in_flight.count += 1
        try:
            return self.wsgi_app(environ, start)
        finally:
            metrics.in_flight.count -= 1
            logs.request_id.reset(token)
            if self.timed:
                metrics.observe(route, environ["REQUEST_METHOD"], code, time.perf_counter() - started)
