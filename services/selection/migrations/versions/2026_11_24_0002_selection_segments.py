"""selection: segments, snapshots and their member chunks.

Revision ID: selection_0002
Revises: selection_0001
Create Date: 2026-11-24
"""

from alembic import op

revision = "selection_0002"
down_revision = "selection_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE selection.segment (
        segment_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        description TEXT,
        rule JSONB NOT NULL,
        refs TEXT[] NOT NULL DEFAULT '{}',
        version INTEGER NOT NULL DEFAULT 1,
        created_at TIMESTAMPTZ NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        updated_by TEXT)""")
    op.execute("CREATE INDEX ix_segment_refs ON selection.segment USING GIN (refs)")
    op.execute("""
    CREATE TABLE selection.snapshot (
        snapshot_id TEXT PRIMARY KEY,
        segment_id TEXT NOT NULL,
        segment_version INTEGER NOT NULL,
        rule JSONB NOT NULL,
        count INTEGER NOT NULL,
        chunk_size INTEGER NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        created_by TEXT)""")
    op.execute(
        "CREATE INDEX ix_snapshot_segment ON selection.snapshot (segment_id, created_at DESC)"
    )
    op.execute("""
    CREATE TABLE selection.snapshot_chunk (
        snapshot_id TEXT NOT NULL REFERENCES selection.snapshot ON DELETE CASCADE,
        chunk INTEGER NOT NULL,
        members TEXT[] NOT NULL,
        PRIMARY KEY (snapshot_id, chunk))""")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS selection.snapshot_chunk")
    op.execute("DROP TABLE IF EXISTS selection.snapshot")
    op.execute("DROP TABLE IF EXISTS selection.segment")
