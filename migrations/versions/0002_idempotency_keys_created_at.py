"""An index on idempotency_keys.created_at, for deleting expired keys in small batches.

Made CONCURRENTLY: a plain CREATE INDEX holds a SHARE lock, blocking every POST with a key
until the index is built. CONCURRENTLY cannot run in a transaction, hence the autocommit
block; IF NOT EXISTS makes a retry after a failure safe (a failed concurrent build leaves an
INVALID index behind: drop it, then run the upgrade again).

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"],
                        postgresql_concurrently=True, if_not_exists=True)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index("ix_idempotency_keys_created_at", "idempotency_keys",
                      postgresql_concurrently=True, if_exists=True)
