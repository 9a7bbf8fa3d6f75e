"""feedback initial schema: the outbox (the service's own tables come with its issue).

Revision ID: feedback_0001
Revises:
Create Date: 2026-11-24
"""

from alembic import op

from shared.db import outbox_table_ddl

revision = "feedback_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    for ddl in outbox_table_ddl("feedback"):
        op.execute(ddl)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS feedback.outbox")
