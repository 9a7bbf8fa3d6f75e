"""What the profile keeps only for a while: processed event ids (the dedup memory) and event
batches' announcement rows. Pruning takes what is past its time and nothing newer."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from services.profile.customers.repository import CustomerRepository
from shared.db import Database
from shared.stack import Stack


async def test_pruning_forgets_old_event_ids_and_event_batches_only(stack: Stack) -> None:
    url = stack.env["KAIROS_DATABASE_URL"]
    now = datetime.now(UTC)
    tag = uuid.uuid4().hex[:8]
    old_ids = [f"prune-{tag}-old-{i}" for i in range(5)]
    new_ids = [f"prune-{tag}-new-{i}" for i in range(3)]
    conn = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        await conn.executemany(
            "INSERT INTO profile.processed_event (event_id, at) VALUES ($1, $2)",
            [(i, now - timedelta(days=9)) for i in old_ids]
            + [(i, now - timedelta(days=1)) for i in new_ids],
        )
        batches = [
            await conn.fetchval(
                "INSERT INTO profile.import_batch (created_at, size, customers, kind)"
                " VALUES ($1, 1, $2::jsonb, $3) RETURNING batch_id",
                at,
                f'{{"prune-{tag}": 1}}',
                kind,
            )
            for at, kind in (
                (now - timedelta(hours=2), "events"),
                (now - timedelta(minutes=5), "events"),
                (now - timedelta(hours=2), "import"),  # imports stay for the streams' 7 days
            )
        ]
        db = Database(url, "profile")
        try:
            async with db.transaction() as uow:
                repo = CustomerRepository(uow.session)
                await repo.prune_event_batches(now - timedelta(hours=1))
                gone = 0
                while True:  # in chunks, as the profile does
                    n = await repo.prune_processed(now - timedelta(days=8), 2)
                    gone += n
                    if n < 2:
                        break
        finally:
            await db.dispose()
        left = {
            r[0]
            for r in await conn.fetch(
                "SELECT event_id FROM profile.processed_event WHERE event_id LIKE $1",
                f"prune-{tag}-%",
            )
        }
        assert left == set(new_ids)
        assert gone >= len(old_ids)
        kept = {
            r[0]
            for r in await conn.fetch(
                "SELECT batch_id FROM profile.import_batch WHERE batch_id = ANY($1::bigint[])",
                batches,
            )
        }
        assert kept == set(batches[1:])
    finally:
        await conn.close()
