"""greenflask: Flask + plain SQLAlchemy + PostgreSQL serving many slow requests at once.

    gunicorn app:app                        # sync worker: everything serialises
    PSYCOGREEN=0 gunicorn app:app -k gevent # gevent, blocking psycopg2: /sleep/postgres/ serialises
    gunicorn app:app -k gevent              # gevent + green wait callback: both routes concurrent
"""

import logging

from flask import Flask

import db
import metrics
import views
from config import Settings
from errors import register_error_handlers
from jsonprovider import OrjsonProvider


def create_app(settings: Settings | None = None) -> Flask:
    """The app factory. It opens no connection: the engine is made per process on first use."""
    settings = settings or Settings.from_env()
    _configure_logging()
    app = Flask(__name__)
    app.json = OrjsonProvider(app)
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes, GREENFLASK=settings)
    db.init_app(app, settings)
    if settings.metrics:
        metrics.init_app(app)
    register_error_handlers(app)
    app.register_blueprint(views.bp)
    return app


def _configure_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(process)d] [%(levelname)s] %(name)s: %(message)s")


app = create_app()
