"""An event batch's announcement row is kept for a while only: a selection replica that was
down longer meets announcements whose rows are gone. It cannot know whom they named, so it
reads every profile again (version-guarded) and its counts come right."""

from __future__ import annotations

import json
import uuid

import asyncpg
import httpx

from shared.stack import Stack
from tests.helpers import eventually


async def _count(gw: httpx.AsyncClient, rule: dict[str, object]) -> int:
    r = await gw.post("/v1/segments:preview", json={"rule": rule})
    return int(r.json()["count"]) if r.status_code == 200 else -1  # -1: the index is loading


async def test_a_gone_event_batch_makes_selection_read_every_profile_again(
    stack: Stack, gw: httpx.AsyncClient
) -> None:
    u = uuid.uuid4().hex[:8]
    ids = [f"gone-{u}-{i}" for i in range(3)]
    for cid in ids:
        assert (
            await gw.put(f"/v1/customers/{cid}", json={"tags": [f"gone:{u}"]})
        ).status_code == 200
    mine = {"tag": f"gone:{u}"}
    opened = {"all": [mine, {"event": "app.opened", "count": {"gte": 2}, "within": "1d"}]}
    await eventually(lambda: _count(gw, mine), lambda n: n == 3)
    stack.stop("selection")  # it saves its index and where in the stream it stands
    try:
        events = [{"type": "app.opened", "customer_id": c} for c in ids for _ in range(2)]
        assert (await gw.post("/v1/events", json={"events": events})).status_code == 202
        conn = await asyncpg.connect(stack.env["KAIROS_DATABASE_URL"].replace("+asyncpg", ""))
        try:

            async def named() -> set[str]:
                rows = await conn.fetch(
                    "SELECT customers FROM profile.import_batch WHERE kind = 'events'"
                    " AND customers ?| $1::text[]",
                    ids,
                )
                return {c for r in rows for c in json.loads(r[0]) if c in ids}

            await eventually(named, lambda got: got == set(ids))
            # Past their retention, as if this replica had been down for longer.
            await conn.execute(
                "DELETE FROM profile.import_batch WHERE kind = 'events' AND customers ?| $1::text[]",
                ids,
            )
        finally:
            await conn.close()
    finally:
        stack.start("selection")
    await eventually(lambda: _count(gw, opened), lambda n: n == 3, timeout=60)
    # … by reading every profile again, not by a cold rebuild (its saved index was loaded).
    log = (stack.run_dir / "logs" / "selection.log").read_text()
    assert "is gone; reading every profile" in log
