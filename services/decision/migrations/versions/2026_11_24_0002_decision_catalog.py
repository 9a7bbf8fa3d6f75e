"""decision: offers, campaigns and their lifecycle transitions.

Revision ID: decision_0002
Revises: decision_0001
Create Date: 2026-11-24
"""

from alembic import op

revision = "decision_0002"
down_revision = "decision_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE decision.offer (
        offer_id TEXT PRIMARY KEY,
        body JSONB NOT NULL,
        version INTEGER NOT NULL DEFAULT 1,
        created_at TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL)""")
    op.execute("""
    CREATE TABLE decision.campaign (
        campaign_id TEXT PRIMARY KEY,
        body JSONB NOT NULL,
        state TEXT NOT NULL DEFAULT 'draft',
        version INTEGER NOT NULL DEFAULT 1,
        submitted_by TEXT,
        created_at TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        updated_by TEXT)""")
    op.execute("CREATE INDEX ix_campaign_state ON decision.campaign (state)")
    op.execute("""
    CREATE TABLE decision.campaign_transition (
        id BIGSERIAL PRIMARY KEY,
        campaign_id TEXT NOT NULL,
        from_state TEXT,
        to_state TEXT NOT NULL,
        principal TEXT,
        at TIMESTAMPTZ NOT NULL)""")
    op.execute(
        "CREATE INDEX ix_campaign_transition_campaign_id ON decision.campaign_transition (campaign_id, id)"
    )


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS decision.campaign_transition")
    op.execute("DROP TABLE IF EXISTS decision.campaign")
    op.execute("DROP TABLE IF EXISTS decision.offer")
