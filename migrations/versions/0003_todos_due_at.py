"""Expand: todos.due_at, nullable, with its range as a constraint NOT VALID.

The first step of expand -> deploy -> contract (docs/operations.md, "Schema changes"). A
nullable column with no default is a change of the catalog only: ALTER TABLE holds its
ACCESS EXCLUSIVE lock for milliseconds (under the migrations' lock_timeout) and rewrites
nothing. The hosts still on the release before ignore the column: every statement of theirs
names its columns. NOT VALID: the constraint holds for new rows at once, and the existing
ones are checked by the next revision, in a transaction of its own that blocks no write.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# The API takes the years 1970 to 9998 in any offset (validation.py); a day wider each side,
# and every stored value is one a Python datetime can hold, so every row reads back.
DUE_AT_RANGE = "due_at >= '1969-12-30 00:00+00' AND due_at < '9999-01-03 00:00+00'"


def upgrade() -> None:
    op.add_column("todos", sa.Column("due_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(f"ALTER TABLE todos ADD CONSTRAINT due_at_range CHECK ({DUE_AT_RANGE}) NOT VALID")


def downgrade() -> None:
    op.drop_column("todos", "due_at")  # its constraint goes with it
