"""greenflask: Flask + plain SQLAlchemy + PostgreSQL serving many slow requests at once.

    gunicorn app:app                        # sync worker: everything serialises
    PSYCOGREEN=0 gunicorn app:app -k gevent # gevent, blocking psycopg2: /sleep/postgres/ serialises
    gunicorn app:app -k gevent              # gevent + green wait callback: both routes concurrent
"""

from flask import Flask

import db
import views
from errors import register_error_handlers
from greenflask import instrument, logs
from greenflask.jsonprovider import OrjsonProvider
from greenflask.settings import CONFIG_KEY, Settings


def create_app(settings: Settings | None = None) -> Flask:
    """The app factory. It opens no connection: the engines are made per process on first use."""
    settings = settings or Settings.from_env()
    logs.configure(settings.log_format)
    app = Flask(__name__)
    app.json = OrjsonProvider(app)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes)
    app.config[CONFIG_KEY] = settings
    db.init_app(app, settings)
    # The request id, and with METRICS on the request's duration, in one WSGI middleware.
    app.wsgi_app = instrument.Instrumented(app.wsgi_app, timed=settings.metrics)
    register_error_handlers(app)
    app.register_blueprint(views.bp)
    return app


app = create_app()
