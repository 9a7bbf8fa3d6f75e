"""dispatch: outbound messages (the queue, their state machine, attempts) and the in-app inbox.

Revision ID: dispatch_0003
Revises: dispatch_0001
Create Date: 2026-11-25
"""

from alembic import op

revision = "dispatch_0003"
down_revision = "dispatch_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE dispatch.message (
        tracking_id TEXT PRIMARY KEY,
        seq BIGSERIAL NOT NULL,
        customer_id TEXT NOT NULL,
        campaign_id TEXT NOT NULL,
        channel TEXT NOT NULL,
        lane TEXT NOT NULL,
        priority INTEGER NOT NULL,
        status TEXT NOT NULL,
        address_key TEXT,
        request JSONB NOT NULL,
        traceparent TEXT,
        provider TEXT,
        provider_id TEXT,
        reason TEXT,
        attempts JSONB NOT NULL DEFAULT '[]'::jsonb,
        attempt_count INTEGER NOT NULL DEFAULT 0,
        in_doubt BOOLEAN NOT NULL DEFAULT FALSE,
        claimed_by TEXT,
        claimed_until TIMESTAMPTZ,
        next_attempt_at TIMESTAMPTZ NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        requested_at TIMESTAMPTZ,
        expires_at TIMESTAMPTZ,
        sent_at TIMESTAMPTZ,
        delivered_at TIMESTAMPTZ,
        read_at TIMESTAMPTZ,
        updated_at TIMESTAMPTZ NOT NULL)""")
    # The send queue: per channel and lane, by priority, due first. Only waiting rows are in it.
    op.execute(
        "CREATE INDEX message_queue ON dispatch.message (channel, lane, priority DESC, next_attempt_at)"
        " WHERE status IN ('queued', 'in_doubt')"
    )
    op.execute(
        "CREATE INDEX message_sending ON dispatch.message (claimed_until) WHERE status = 'sending'"
    )
    op.execute(
        "CREATE INDEX message_inbox ON dispatch.message (customer_id, created_at DESC)"
        " WHERE channel = 'inapp'"
    )
    op.execute(
        "CREATE INDEX message_address ON dispatch.message (address_key, created_at DESC)"
        " WHERE address_key IS NOT NULL"
    )
    op.execute("CREATE INDEX message_customer ON dispatch.message (customer_id)")
    op.execute("CREATE INDEX message_local ON dispatch.message (seq) WHERE provider = 'local'")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS dispatch.message")
