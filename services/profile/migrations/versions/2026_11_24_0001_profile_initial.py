"""Profile initial schema: customers, identities, devices, counters, merges, outbox.

Revision ID: profile_0001
Revises:
Create Date: 2026-11-24
"""

from alembic import op

from shared.db import outbox_table_ddl

revision = "profile_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE profile.customer (
        customer_id TEXT PRIMARY KEY,
        attributes JSONB NOT NULL DEFAULT '{}',
        tags TEXT[] NOT NULL DEFAULT '{}',
        consents JSONB NOT NULL DEFAULT '{}',
        timezone TEXT, locale TEXT,
        created_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL,
        version BIGINT NOT NULL DEFAULT 1,
        merged_into TEXT)""")
    op.execute(
        "CREATE INDEX ix_customer_merged_into ON profile.customer (merged_into) WHERE merged_into IS NOT NULL"
    )
    op.execute("""
    CREATE TABLE profile.identity (
        kind TEXT NOT NULL, value TEXT NOT NULL, customer_id TEXT NOT NULL,
        CONSTRAINT pk_identity PRIMARY KEY (kind, value))""")
    op.execute("CREATE INDEX ix_identity_customer_id ON profile.identity (customer_id)")
    op.execute("""
    CREATE TABLE profile.device (
        token TEXT PRIMARY KEY, customer_id TEXT NOT NULL, platform TEXT NOT NULL,
        app_id TEXT NOT NULL, registered_at TIMESTAMPTZ NOT NULL)""")
    op.execute("CREATE INDEX ix_device_customer_id ON profile.device (customer_id)")
    op.execute("""
    CREATE TABLE profile.counter (
        customer_id TEXT NOT NULL, event_type TEXT NOT NULL, total BIGINT NOT NULL,
        first_seen TIMESTAMPTZ NOT NULL, last_seen TIMESTAMPTZ NOT NULL,
        buckets JSONB NOT NULL, last JSONB NOT NULL DEFAULT '{}',
        CONSTRAINT pk_counter PRIMARY KEY (customer_id, event_type))""")
    op.execute("""
    CREATE TABLE profile.processed_event (
        event_id TEXT PRIMARY KEY, at TIMESTAMPTZ NOT NULL)""")
    op.execute("CREATE INDEX ix_processed_event_at ON profile.processed_event (at)")
    op.execute("""
    CREATE TABLE profile.merge (
        merge_id BIGSERIAL PRIMARY KEY, target TEXT NOT NULL, source TEXT NOT NULL,
        principal TEXT, at TIMESTAMPTZ NOT NULL, moved JSONB NOT NULL DEFAULT '{}')""")
    op.execute("CREATE INDEX ix_merge_target ON profile.merge (target)")
    for ddl in outbox_table_ddl("profile"):
        op.execute(ddl)


def downgrade() -> None:
    for t in ("outbox", "merge", "processed_event", "counter", "device", "identity", "customer"):
        op.execute(f"DROP TABLE IF EXISTS profile.{t}")
