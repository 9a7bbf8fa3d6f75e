"""feedback history: contacts and responses partitioned by month, keys, report aggregates,
conversion windows, contact pressure.

Revision ID: feedback_0002
Revises: feedback_0001
Create Date: 2026-11-25
"""

from alembic import op

revision = "feedback_0002"
down_revision = "feedback_0001"
branch_labels = None
depends_on = None

S = "feedback"

DDL = [
    # Idempotency by tracking id across partitions: a re-planned batch page sends the same
    # tracking id with another time, so the partitioned table's key cannot decide alone.
    f"""CREATE TABLE {S}.contact_key (
        tracking_id TEXT PRIMARY KEY, at TIMESTAMPTZ NOT NULL)""",
    f"""CREATE TABLE {S}.contacts (
        tracking_id TEXT NOT NULL,
        at TIMESTAMPTZ NOT NULL,
        customer_id TEXT NOT NULL,
        campaign_id TEXT NOT NULL,
        decision_id TEXT,
        treatment TEXT,
        offer_id TEXT,
        touchpoint TEXT,
        channel TEXT,
        placement TEXT,
        control BOOLEAN NOT NULL DEFAULT false,
        control_kind TEXT,
        status TEXT NOT NULL,
        conversion_event TEXT,
        conversion_within_s INTEGER,
        reward JSONB,
        value DOUBLE PRECISION,
        run_id TEXT,
        sent_at TIMESTAMPTZ,
        delivered_at TIMESTAMPTZ,
        failed_at TIMESTAMPTZ,
        bounced_at TIMESTAMPTZ,
        expired_at TIMESTAMPTZ,
        -- When the row was written: its lag behind the contact is what operators watch.
        recorded_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (tracking_id, at)
    ) PARTITION BY RANGE (at)""",
    f"CREATE INDEX ix_contacts_customer ON {S}.contacts (customer_id, at DESC)",
    f"CREATE INDEX ix_contacts_at ON {S}.contacts (at, tracking_id)",
    f"""CREATE TABLE {S}.response_key (
        tracking_id TEXT NOT NULL, outcome TEXT NOT NULL, at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (tracking_id, outcome))""",
    f"""CREATE TABLE {S}.responses (
        tracking_id TEXT NOT NULL,
        outcome TEXT NOT NULL,
        at TIMESTAMPTZ NOT NULL,
        customer_id TEXT NOT NULL,
        campaign_id TEXT NOT NULL,
        treatment TEXT,
        offer_id TEXT,
        channel TEXT,
        control BOOLEAN NOT NULL DEFAULT false,
        value DOUBLE PRECISION,
        link TEXT,
        text TEXT,
        choice TEXT,
        source TEXT,
        event_id TEXT,
        recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (tracking_id, outcome, at)
    ) PARTITION BY RANGE (at)""",
    f"CREATE INDEX ix_responses_customer ON {S}.responses (customer_id, at DESC)",
    f"CREATE INDEX ix_responses_at ON {S}.responses (at, tracking_id, outcome)",
    # Report aggregates: one row per campaign x contact day x treatment x channel x control.
    # Every count is the contact's cohort (its day), so a report reads only these rows.
    f"""CREATE TABLE {S}.report_daily (
        campaign_id TEXT NOT NULL,
        day DATE NOT NULL,
        treatment TEXT NOT NULL,
        channel TEXT NOT NULL,
        control BOOLEAN NOT NULL,
        control_kind TEXT NOT NULL,
        targeted BIGINT NOT NULL DEFAULT 0,
        control_n BIGINT NOT NULL DEFAULT 0,
        offered BIGINT NOT NULL DEFAULT 0,
        sent BIGINT NOT NULL DEFAULT 0,
        delivered BIGINT NOT NULL DEFAULT 0,
        failed BIGINT NOT NULL DEFAULT 0,
        bounced BIGINT NOT NULL DEFAULT 0,
        expired BIGINT NOT NULL DEFAULT 0,
        impression BIGINT NOT NULL DEFAULT 0,
        opened BIGINT NOT NULL DEFAULT 0,
        clicked BIGINT NOT NULL DEFAULT 0,
        accepted BIGINT NOT NULL DEFAULT 0,
        declined BIGINT NOT NULL DEFAULT 0,
        dismissed BIGINT NOT NULL DEFAULT 0,
        converted BIGINT NOT NULL DEFAULT 0,
        replied BIGINT NOT NULL DEFAULT 0,
        unsubscribed BIGINT NOT NULL DEFAULT 0,
        revenue DOUBLE PRECISION NOT NULL DEFAULT 0,
        PRIMARY KEY (campaign_id, day, treatment, channel, control, control_kind)
    )""",
    f"""CREATE TABLE {S}.click_key (
        tracking_id TEXT NOT NULL, link TEXT NOT NULL, PRIMARY KEY (tracking_id, link))""",
    f"""CREATE TABLE {S}.link_clicks (
        campaign_id TEXT NOT NULL, link TEXT NOT NULL, clicks BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (campaign_id, link))""",
    # Contact pressure: a counter per customer and month, and the histogram of those counters
    # (how many customers had n contacts), so the distribution is read from a few rows.
    f"""CREATE TABLE {S}.contact_pressure (
        customer_id TEXT NOT NULL, month DATE NOT NULL, n INTEGER NOT NULL,
        PRIMARY KEY (customer_id, month))""",
    f"""CREATE TABLE {S}.pressure_hist (
        month DATE NOT NULL, n INTEGER NOT NULL, customers BIGINT NOT NULL,
        PRIMARY KEY (month, n))""",
    # Conversion attribution, order-independent: open windows of contacts with a rule, and
    # the recent events of the types some rule names.
    f"""CREATE TABLE {S}.conversion_types (
        event_type TEXT PRIMARY KEY, max_within_s INTEGER NOT NULL)""",
    f"""CREATE TABLE {S}.open_windows (
        tracking_id TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        opens_at TIMESTAMPTZ NOT NULL,
        closes_at TIMESTAMPTZ NOT NULL)""",
    f"CREATE INDEX ix_open_windows_customer ON {S}.open_windows (customer_id, event_type)",
    f"CREATE INDEX ix_open_windows_closes ON {S}.open_windows (closes_at)",
    f"""CREATE TABLE {S}.recent_events (
        event_id TEXT PRIMARY KEY,
        customer_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        at TIMESTAMPTZ NOT NULL,
        revenue DOUBLE PRECISION)""",
    f"CREATE INDEX ix_recent_events_customer ON {S}.recent_events (customer_id, event_type, at)",
    f"CREATE INDEX ix_recent_events_at ON {S}.recent_events (at)",
    # Pseudonyms of erased customers: a contact still in flight when its customer was erased
    # is stored under the pseudonym (the id itself is not kept anywhere).
    f"""CREATE TABLE {S}.erased (
        pseudonym TEXT PRIMARY KEY, at TIMESTAMPTZ NOT NULL DEFAULT now())""",
    # Monthly partitions, created idempotently (by the writer before a batch of a month it
    # has not seen, and here for the months around now).
    f"""CREATE OR REPLACE FUNCTION {S}.ensure_partitions(months DATE[]) RETURNS void
    LANGUAGE plpgsql AS $$
    DECLARE m DATE; t TEXT; name TEXT;
    BEGIN
      FOREACH m IN ARRAY months LOOP
        m := date_trunc('month', m)::date;
        FOREACH t IN ARRAY ARRAY['contacts', 'responses'] LOOP
          name := t || '_' || to_char(m, 'YYYYMM');
          IF to_regclass('{S}.' || name) IS NULL THEN
            BEGIN
              EXECUTE format(
                'CREATE TABLE {S}.%I PARTITION OF {S}.%I FOR VALUES FROM (%L) TO (%L)',
                name, t, m, (m + interval '1 month')::date);
            EXCEPTION WHEN duplicate_table THEN NULL;
            END;
          END IF;
        END LOOP;
      END LOOP;
    END $$""",
    f"""SELECT {S}.ensure_partitions(ARRAY(
        SELECT (date_trunc('month', now()) + make_interval(months => i))::date
        FROM generate_series(-2, 3) AS i))""",
]


def upgrade() -> None:
    for ddl in DDL:
        op.execute(ddl)


def downgrade() -> None:
    for table in (
        "erased",
        "recent_events",
        "open_windows",
        "conversion_types",
        "pressure_hist",
        "contact_pressure",
        "link_clicks",
        "click_key",
        "report_daily",
        "responses",
        "response_key",
        "contacts",
        "contact_key",
    ):
        op.execute(f"DROP TABLE IF EXISTS {S}.{table} CASCADE")
    op.execute(f"DROP FUNCTION IF EXISTS {S}.ensure_partitions(DATE[])")
