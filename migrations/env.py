"""Alembic's environment: which database, which metadata, and the rules every migration runs by.

- The database: a connection handed in by `seed.migrate()` (Alembic's cookbook, "Sharing a
  Connection"), else the app's own settings (DATABASE_URL, or the embedded server), so
  `alembic upgrade head` needs no URL in alembic.ini.
- Each migration in its own transaction, under `lock_timeout`: a migration that waits for a
  lock (ALTER TABLE needs ACCESS EXCLUSIVE) holds every query queued behind it, so it gives
  up after MIGRATION_LOCK_TIMEOUT instead; running it again is safe. Indexes are made
  CONCURRENTLY, outside the transaction (docs/operations.md, "Schema changes").
- Straight to PostgreSQL, never through PgBouncer: its transaction pooling would lose the
  session's SET and cannot run CREATE INDEX CONCURRENTLY across transactions.
"""

from logging.config import fileConfig

from alembic import context
from sqlalchemy import text

import models
from greenflask import embedded
from greenflask.settings import Settings

MIGRATION_LOCK_TIMEOUT = "3s"


def run(connection) -> None:
    connection.execute(text(f"SET lock_timeout = '{MIGRATION_LOCK_TIMEOUT}'"))
    connection.commit()
    context.configure(
        connection=connection,
        target_metadata=models.metadata,
        transaction_per_migration=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    if context.is_offline_mode():
        context.configure(url="postgresql://", target_metadata=models.metadata, literal_binds=True,
                          transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    if (connection := context.config.attributes.get("connection")) is not None:
        run(connection)
        return
    if context.config.config_file_name:  # the `alembic` command: its log lines to stderr
        fileConfig(context.config.config_file_name, disable_existing_loggers=False)
    engine = embedded.script_engine(embedded.database_url(Settings.from_env()))
    with engine.connect() as connection:
        run(connection)
    engine.dispose()


main()
