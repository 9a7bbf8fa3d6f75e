"""dispatch: rewards granted through the bonus system's webhook, one per tracking id.

Revision ID: dispatch_0002
Revises: dispatch_0001
Create Date: 2026-11-25
"""

from alembic import op

revision = "dispatch_0002"
down_revision = "dispatch_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE dispatch.reward (
        tracking_id TEXT PRIMARY KEY,
        grant_id TEXT NOT NULL UNIQUE,
        customer_id TEXT NOT NULL,
        campaign_id TEXT NOT NULL,
        offer_id TEXT,
        type TEXT NOT NULL,
        amount DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'granted', 'revoked', 'failed')),
        reason TEXT,
        attempts JSONB NOT NULL DEFAULT '[]'::jsonb,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        granted_at TIMESTAMPTZ,
        revoked_at TIMESTAMPTZ)""")
    op.execute("CREATE INDEX reward_customer ON dispatch.reward (customer_id)")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS dispatch.reward")
