"""All SQL of an import batch: staging by COPY, then set-based statements over the stage."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from services.profile.customers.repository import conflicts_sql, projection_columns
from services.profile.imports.parser import Row
from services.profile.projection import Doc, counters_part, doc_from_row, profile_part
from shared.contracts.bus import ImportBatch


class ConcurrentClaim(Exception):
    """A concurrent writer took a customer or an identity after this batch checked it."""


STAGE = "kairos_import_stage"
_UPDATED = "NOT (c.xmax = 0)"  # in an upsert's RETURNING: the row existed (it was updated)
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
  line int NOT NULL, customer_id text COLLATE "C" NOT NULL, attributes jsonb NOT NULL,
  tags text[] NOT NULL,
  consents jsonb NOT NULL, timezone text, locale text, identities jsonb NOT NULL
) ON COMMIT DELETE ROWS
"""
# Staged lines are few next to the tables they are checked against, and a temporary table
# has no statistics: lookups go row by row through the indexes (a LATERAL subquery with a
# LIMIT is never flattened into a hash join over the whole table).
MERGED_AWAY = f"""
SELECT s.line, m.merged_into FROM {STAGE} s
CROSS JOIN LATERAL (SELECT c.merged_into FROM profile.customer c
                    WHERE c.customer_id = s.customer_id AND c.merged_into IS NOT NULL LIMIT 1) m
"""
DROP_LINES = f"DELETE FROM {STAGE} WHERE line = ANY(CAST(:lines AS int[]))"
# Within a batch the last line of a customer wins (as if the lines were PUT in order).
KEEP_LAST = f"""
DELETE FROM {STAGE} s USING {STAGE} t WHERE t.customer_id = s.customer_id AND t.line > s.line
"""
# The identity rule (``conflicts_sql``) over the staged lines' identities.
STAGED_CONFLICTS = conflicts_sql(
    f"SELECT s.line, s.customer_id, e.key, e.value FROM {STAGE} s, jsonb_each_text(s.identities) e"
)
# Customers in id order, so that concurrent imports lock rows in the same order. The upsert
# returns the parts of each updated customer's projection document (the identities are
# written first, so the document holds them). A customer it creates is known from its line
# alone: only its id, version and times come back. The batch's announcement row names each
# written customer with its version.
UPSERT = (
    f"""
WITH up AS (
INSERT INTO profile.customer AS c (customer_id, attributes, tags, consents, timezone, locale,
                                   created_at, updated_at, version)
SELECT customer_id, attributes, tags, consents, timezone, locale, :now, :now, 1
FROM {STAGE} ORDER BY customer_id
ON CONFLICT (customer_id) DO UPDATE SET attributes = EXCLUDED.attributes, tags = EXCLUDED.tags,
  consents = EXCLUDED.consents, timezone = EXCLUDED.timezone, locale = EXCLUDED.locale,
  updated_at = EXCLUDED.updated_at, version = c.version + 1
WHERE c.merged_into IS NULL
RETURNING """
    + projection_columns(profile=_UPDATED, counters=_UPDATED)
    + """),
announced AS (
INSERT INTO profile.import_batch (created_at, size, customers)
SELECT :now, count(*), COALESCE(jsonb_object_agg(customer_id, version), '{}') FROM up
RETURNING batch_id)
SELECT announced.batch_id, up.* FROM announced LEFT JOIN up ON true
"""
)
UPSERT_PG = UPSERT.replace(":now", "$1::timestamptz")
# Announcements older than the PROFILE stream's retention name messages no longer there.
PRUNE = "DELETE FROM profile.import_batch WHERE kind = 'import' AND created_at < :before"
BATCH = "SELECT batch_id, customers, event_types FROM profile.import_batch WHERE batch_id = :b"
# PUT replaces the identities it names (anonymous links stay): drop the ones that changed.
DROP_IDENTITIES = f"""
DELETE FROM profile.identity i USING (
  SELECT x.kind, x.value FROM {STAGE} s
  CROSS JOIN LATERAL (SELECT kind, value FROM profile.identity
                      WHERE customer_id = s.customer_id AND kind <> 'anonymous_id'
                      OFFSET 0) x
  WHERE (s.identities ->> x.kind) IS DISTINCT FROM x.value) d
WHERE i.kind = d.kind AND i.value = d.value
"""
# An identity another transaction took since the check (it committed in between) is not
# taken over: the no-op update touches only such rows and returns them, and the batch is
# then retried, when the rule reports the line.
ADD_IDENTITIES = f"""
WITH added AS (
  INSERT INTO profile.identity AS i (kind, value, customer_id)
  SELECT e.key, e.value, s.customer_id FROM {STAGE} s, jsonb_each_text(s.identities) e
  ORDER BY e.key COLLATE "C", e.value COLLATE "C"
  ON CONFLICT (kind, value) DO UPDATE SET customer_id = i.customer_id
  WHERE i.customer_id <> EXCLUDED.customer_id
  RETURNING xmax)
SELECT count(*) FROM added WHERE xmax::text <> '0'
"""


def docs_of(written: list[Sequence[Any]], lines: Mapping[str, Row], now: datetime) -> list[Doc]:
    """The projection documents of what ``merge`` wrote (``lines``: the line it kept for
    each customer)."""
    return [_doc(r, lines, now) for r in written]


def _doc(row: Sequence[Any], lines: Mapping[str, Row], now: datetime) -> Doc:
    """A written customer's projection document: from the row's parts when the upsert
    updated it, from its line when the upsert created it (the line is all it has: its
    identities are the line's, and it has no devices, counters or last values yet)."""
    if row[3] is not None:
        return doc_from_row(row)
    _, cid, attrs, tags, consents, tz, lc, idents = lines[row[0]]
    return Doc(
        cid,
        int(row[1]),
        int(row[2]),
        counters_part("{}", "{}", now),
        profile_part(cid, attrs, tags, consents, idents, "[]", tz, lc, now, now),
    )


class ImportRepository:
    """The statements of one import batch, inside the caller's transaction."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def _driver(self) -> Any:
        """The transaction's asyncpg connection, for what SQLAlchemy adds nothing to."""
        conn = await self.session.connection()
        raw = await conn.get_raw_connection()
        return raw.driver_connection

    async def stage(self, rows: list[Row]) -> None:
        """Create the connection's staging table if needed and COPY the rows into it."""
        await self.session.execute(sa.text(CREATE_STAGE))  # also begins the transaction
        driver = await self._driver()
        await driver.copy_records_to_table(STAGE, records=rows, columns=STAGE_COLUMNS)

    async def merged_away(self) -> list[tuple[int, str]]:
        rows = await self.session.execute(sa.text(MERGED_AWAY))
        return [(r[0], r[1]) for r in rows.all()]

    async def drop_lines(self, lines: list[int]) -> None:
        if lines:
            await self.session.execute(sa.text(DROP_LINES), {"lines": lines})

    async def conflicts(self) -> list[tuple[int, str, str, int | None]]:
        """The identity rule's failures among the staged lines."""
        rows = await self.session.execute(sa.text(STAGED_CONFLICTS))
        return [(r[0], r[1], r[2], r[3]) for r in rows.all()]

    async def merge(self, now: datetime) -> tuple[int, list[Sequence[Any]]]:
        """Write the staged identities, then upsert the staged customers (last line per
        customer) and record the batch's announcement; returns (batch id, the projection
        columns of each written customer, for ``docs_of`` once committed). Raises
        ``ConcurrentClaim`` when a concurrent writer took one of the identities since the
        check."""
        await self.session.execute(sa.text(KEEP_LAST))
        await self.session.execute(sa.text(DROP_IDENTITIES))
        lost = await self.session.execute(sa.text(ADD_IDENTITIES))
        if lost.scalar_one():  # updated, not inserted: a row someone else holds
            raise ConcurrentClaim("an identity was claimed meanwhile")
        # Straight through asyncpg: 5,000 rows of 15 columns, which SQLAlchemy's result
        # rows would only wrap.
        rows = await (await self._driver()).fetch(UPSERT_PG, now)
        return int(rows[0][0]), [r[1:] for r in rows if r[1] is not None]

    async def prune(self, before: datetime) -> None:
        await self.session.execute(sa.text(PRUNE), {"before": before})

    async def batch(self, batch_id: int) -> ImportBatch | None:
        """The customers (their versions, and for an event batch their event types) an
        announcement names; None once pruned."""
        row = (await self.session.execute(sa.text(BATCH), {"b": batch_id})).one_or_none()
        if row is None:
            return None
        return ImportBatch(batch_id=batch_id, customers=dict(row[1]), event_types=row[2])
