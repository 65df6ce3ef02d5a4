"""Validate due_at_range on the rows that existed before it.

VALIDATE CONSTRAINT scans the table under SHARE UPDATE EXCLUSIVE, which lets reads and
writes go on; only another schema change waits for it.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE todos VALIDATE CONSTRAINT due_at_range")


def downgrade() -> None:
    pass  # a validated constraint and one NOT VALID are the same to every query
