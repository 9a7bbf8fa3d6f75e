"""decision: the contact policy (one document).

Revision ID: decision_0003
Revises: decision_0002
Create Date: 2026-11-24
"""

from alembic import op

revision = "decision_0003"
down_revision = "decision_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE decision.contact_policy (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        body JSONB NOT NULL,
        version INTEGER NOT NULL DEFAULT 1,
        updated_at TIMESTAMPTZ NOT NULL,
        updated_by TEXT)""")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS decision.contact_policy")
