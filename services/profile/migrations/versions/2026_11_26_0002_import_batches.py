"""Import batches: who one ``profile.imported`` announcement names.

An import announces each committed batch with one message instead of one per customer; the
customers and their new versions stay here, where erasure can remove one of them (a stream
message cannot be edited), and consumers read them with ``GET /internal/import-batches/{id}``.
Rows older than the PROFILE stream's retention are pruned by the next import.

Revision ID: profile_0002
Revises: profile_0001
Create Date: 2026-11-26
"""

from alembic import op

revision = "profile_0002"
down_revision = "profile_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE profile.import_batch (
        batch_id BIGSERIAL PRIMARY KEY,
        created_at TIMESTAMPTZ NOT NULL,
        size INT NOT NULL,
        customers JSONB NOT NULL)""")
    op.execute("CREATE INDEX ix_import_batch_created_at ON profile.import_batch (created_at)")


def downgrade() -> None:
    op.execute("DROP TABLE profile.import_batch")
