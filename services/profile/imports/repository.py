"""All SQL of an import batch: staging by COPY, then set-based statements over the stage."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from services.profile.imports.parser import Row


class ConcurrentClaim(Exception):
    """A concurrent writer took a customer or an identity after this batch checked it."""


STAGE = "kairos_import_stage"
STAGE_COLUMNS = [
    "line",
    "customer_id",
    "attributes",
    "tags",
    "consents",
    "timezone",
    "locale",
    "identities",
]
# One per connection, emptied by every commit (and by a rollback, being created per
# connection only once and written inside transactions).
CREATE_STAGE = f"""
CREATE TEMP TABLE IF NOT EXISTS {STAGE} (
  line int NOT NULL, customer_id text NOT NULL, attributes jsonb NOT NULL, tags text[] NOT NULL,
  consents jsonb NOT NULL, timezone text, locale text, identities jsonb NOT NULL
) ON COMMIT DELETE ROWS
"""
MERGED_AWAY = f"""
SELECT s.line, c.merged_into FROM {STAGE} s JOIN profile.customer c USING (customer_id)
WHERE c.merged_into IS NOT NULL
"""
DROP_LINES = f"DELETE FROM {STAGE} WHERE line = ANY(CAST(:lines AS int[]))"
# Within a batch the last line of a customer wins (as if the lines were PUT in order).
KEEP_LAST = f"""
DELETE FROM {STAGE} s USING {STAGE} t WHERE t.customer_id = s.customer_id AND t.line > s.line
"""
# Customers in id order, so that concurrent imports lock rows in the same order.
UPSERT = f"""
INSERT INTO profile.customer AS c (customer_id, attributes, tags, consents, timezone, locale,
                                   created_at, updated_at, version)
SELECT customer_id, attributes, tags, consents, timezone, locale, :now, :now, 1
FROM {STAGE} ORDER BY customer_id
ON CONFLICT (customer_id) DO UPDATE SET attributes = EXCLUDED.attributes, tags = EXCLUDED.tags,
  consents = EXCLUDED.consents, timezone = EXCLUDED.timezone, locale = EXCLUDED.locale,
  updated_at = EXCLUDED.updated_at, version = c.version + 1
WHERE c.merged_into IS NULL
RETURNING customer_id, version
"""
# PUT replaces the identities it names (anonymous links stay): drop the ones that changed.
DROP_IDENTITIES = f"""
DELETE FROM profile.identity i USING {STAGE} s
WHERE i.customer_id = s.customer_id AND i.kind <> 'anonymous_id'
  AND (s.identities ->> i.kind) IS DISTINCT FROM i.value
"""
# An identity another transaction took since the check (it committed in between) is not
# taken over: the no-op update touches only such rows and returns them, and the batch is
# then retried, when the rule reports the line.
ADD_IDENTITIES = f"""
WITH added AS (
  INSERT INTO profile.identity AS i (kind, value, customer_id)
  SELECT e.key, e.value, s.customer_id FROM {STAGE} s, jsonb_each_text(s.identities) e
  ORDER BY 1, 2
  ON CONFLICT (kind, value) DO UPDATE SET customer_id = i.customer_id
  WHERE i.customer_id <> EXCLUDED.customer_id
  RETURNING xmax)
SELECT count(*) FROM added WHERE xmax::text <> '0'
"""


class ImportRepository:
    """The statements of one import batch, inside the caller's transaction."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def stage(self, rows: list[Row]) -> None:
        """Create the connection's staging table if needed and COPY the rows into it."""
        await self.session.execute(sa.text(CREATE_STAGE))  # also begins the transaction
        conn = await self.session.connection()
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        await driver.copy_records_to_table(STAGE, records=rows, columns=STAGE_COLUMNS)

    async def merged_away(self) -> list[tuple[int, str]]:
        rows = await self.session.execute(sa.text(MERGED_AWAY))
        return [(r[0], r[1]) for r in rows.all()]

    async def drop_lines(self, lines: list[int]) -> None:
        if lines:
            await self.session.execute(sa.text(DROP_LINES), {"lines": lines})

    async def merge(self, now: datetime) -> dict[str, int]:
        """Upsert the staged customers (last line per customer) and their identities;
        returns each written customer's new version. Raises ``ConcurrentClaim`` when a
        concurrent writer took one of the identities since the check."""
        await self.session.execute(sa.text(KEEP_LAST))
        rows = await self.session.execute(sa.text(UPSERT), {"now": now})
        versions = {r[0]: r[1] for r in rows.all()}
        await self.session.execute(sa.text(DROP_IDENTITIES))
        lost = await self.session.execute(sa.text(ADD_IDENTITIES))
        if lost.scalar_one():  # updated, not inserted: a row someone else holds
            raise ConcurrentClaim("an identity was claimed meanwhile")
        return versions

    async def outbox(self, payloads: list[tuple[str, bytes]]) -> None:
        """Outbox rows by COPY (relayed once committed, like every other event)."""
        conn = await self.session.connection()
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        await driver.copy_records_to_table(
            "outbox", schema_name="profile", records=payloads, columns=["subject", "payload"]
        )
