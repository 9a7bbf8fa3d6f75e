"""decision: durable timers (delays, unless windows, deferred sends) and batch runs.

Revision ID: decision_0004
Revises: decision_0003
Create Date: 2026-11-24
"""

from alembic import op

revision = "decision_0004"
down_revision = "decision_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE decision.timer (
        timer_id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        due TIMESTAMPTZ NOT NULL,
        customer_id TEXT NOT NULL,
        campaign_id TEXT NOT NULL,
        unless_event TEXT,
        payload JSONB NOT NULL,
        created_at TIMESTAMPTZ NOT NULL,
        claimed_until TIMESTAMPTZ,
        attempts INTEGER NOT NULL DEFAULT 0)""")
    op.execute("CREATE INDEX timer_due ON decision.timer (due)")
    op.execute(
        "CREATE INDEX timer_unless ON decision.timer (customer_id, unless_event) "
        "WHERE unless_event IS NOT NULL"
    )
    op.execute("CREATE INDEX timer_campaign ON decision.timer (campaign_id)")
    op.execute("""
    CREATE TABLE decision.run (
        run_id TEXT PRIMARY KEY,
        campaign_id TEXT NOT NULL,
        status TEXT NOT NULL,
        dry_run BOOLEAN NOT NULL DEFAULT FALSE,
        tick TIMESTAMPTZ,
        snapshot_id TEXT,
        selected INTEGER NOT NULL DEFAULT 0,
        position INTEGER NOT NULL DEFAULT 0,
        counts JSONB NOT NULL,
        error TEXT,
        owner TEXT,
        lease_until TIMESTAMPTZ,
        started_at TIMESTAMPTZ NOT NULL,
        finished_at TIMESTAMPTZ,
        created_by TEXT,
        UNIQUE (campaign_id, tick))""")
    op.execute("CREATE INDEX run_campaign ON decision.run (campaign_id, started_at)")
    op.execute("CREATE INDEX run_active ON decision.run (status) WHERE status = 'running'")


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS decision.run")
    op.execute("DROP TABLE IF EXISTS decision.timer")
