"""All SQL of the selection service."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import col

from services.selection.models import Segment, Snapshot
from shared.db import Repository


class SegmentRepository(Repository[Segment]):
    model = Segment

    async def lock_graph(self) -> None:
        """Serialise segment writes so two concurrent PUTs cannot close a cycle together."""
        await self.session.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('segments'))"))

    async def rules_of(self, ids: Sequence[str]) -> dict[str, Segment]:
        rows = await self.session.execute(
            sa.select(Segment).where(col(Segment.segment_id).in_(list(ids)))
        )
        return {s.segment_id: s for s in rows.scalars().all()}

    async def graph(self) -> dict[str, list[str]]:
        """Every segment's references (small: one row per segment)."""
        rows = await self.session.execute(sa.text("SELECT segment_id, refs FROM selection.segment"))
        return {r[0]: list(r[1]) for r in rows.all()}

    async def referenced_by(self, segment_id: str) -> list[str]:
        rows = await self.session.execute(
            sa.text("SELECT segment_id FROM selection.segment WHERE refs @> ARRAY[:s]::text[]"),
            {"s": segment_id},
        )
        return [r[0] for r in rows.all()]

    async def page(self, after: str, limit: int) -> Sequence[Segment]:
        rows = await self.session.execute(
            sa.select(Segment)
            .where(col(Segment.segment_id) > after)
            .order_by(col(Segment.segment_id))
            .limit(limit)
        )
        return rows.scalars().all()


class SnapshotRepository(Repository[Snapshot]):
    model = Snapshot

    async def write_members(self, snapshot_id: str, members: list[str], chunk_size: int) -> None:
        """Members in chunks of ``chunk_size`` ids (one array per row: 50 rows for 500,000)."""
        chunks = [members[i : i + chunk_size] for i in range(0, len(members), chunk_size)]
        if not chunks:
            return
        conn = await self.session.connection()
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        await driver.copy_records_to_table(
            "snapshot_chunk",
            schema_name="selection",
            columns=["snapshot_id", "chunk", "members"],
            records=[(snapshot_id, i, c) for i, c in enumerate(chunks)],
        )

    async def members(self, snapshot_id: str, first_chunk: int, last_chunk: int) -> list[str]:
        rows = await self.session.execute(
            sa.text(
                "SELECT members FROM selection.snapshot_chunk WHERE snapshot_id = :s"
                " AND chunk BETWEEN :a AND :b ORDER BY chunk"
            ),
            {"s": snapshot_id, "a": first_chunk, "b": last_chunk},
        )
        out: list[str] = []
        for (m,) in rows.all():
            out.extend(m)
        return out

    async def prune(self, before: datetime) -> int:
        r = await self.session.execute(
            sa.text("DELETE FROM selection.snapshot WHERE created_at < :t"), {"t": before}
        )
        return int(r.rowcount)  # type: ignore[attr-defined]
