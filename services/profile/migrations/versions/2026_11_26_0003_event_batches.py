"""Event batches announce their customers like imports: ``profile.import_batch`` gets a kind
and, for event batches, each customer's event types.

An event batch is announced with one ``profile.counted`` message naming no customer; its
customers, versions and event types are a row here (``kind`` ``events``), where erasure
removes them as it does from import rows. Event rows are kept for ``KAIROS_EVENT_BATCH_RETENTION_S`` (they are
many), import rows for the PROFILE stream's retention.

Revision ID: profile_0003
Revises: profile_0002
Create Date: 2026-11-26
"""

from alembic import op

revision = "profile_0003"
down_revision = "profile_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE profile.import_batch ADD COLUMN kind TEXT NOT NULL DEFAULT 'import'")
    op.execute("ALTER TABLE profile.import_batch ADD COLUMN event_types JSONB")


def downgrade() -> None:
    op.execute("ALTER TABLE profile.import_batch DROP COLUMN event_types")
    op.execute("ALTER TABLE profile.import_batch DROP COLUMN kind")
