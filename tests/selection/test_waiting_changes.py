"""A profile change whose projection is not there (yet) waits on its own account: the index
applies the messages around it and moves on, and a restart resumes before it.

It used to hold back its whole consumer batch (nak'ed together, the index's stream position
stuck) until it gave up after ``MAX_PROJECTION_WAITS`` deliveries, and when it gave up, it
gave up on every fresh change that had joined its batch with a projection still being
written: an import's customers could go missing from the index for good."""

from __future__ import annotations

import pickle
import uuid
from typing import Any

import httpx
import orjson

from shared.bus import Bus
from shared.contracts.bus import ProfileChanged
from shared.stack import Stack
from tests.helpers import eventually


async def _count(gw: httpx.AsyncClient, rule: dict[str, Any]) -> int:
    r = await gw.post("/v1/segments:preview", json={"rule": rule})
    return int(r.json()["count"]) if r.status_code == 200 else -1  # -1: the index is loading


async def _profile_seq(gw: httpx.AsyncClient) -> int:
    r = await gw.get("/v1/segments:status")
    return int(r.json()["profile_seq"]) if r.status_code == 200 else -1


async def test_a_change_that_cannot_be_applied_holds_back_nothing_else(
    stack: Stack, gw: httpx.AsyncClient
) -> None:
    u = uuid.uuid4().hex[:8]
    mine, later = {"tag": f"wait:{u}"}, {"tag": f"wait-later:{u}"}
    a = f"wait-{u}-a"
    assert (await gw.put(f"/v1/customers/{a}", json={"tags": [f"wait:{u}"]})).status_code == 200
    await eventually(lambda: _count(gw, mine), lambda n: n == 1)

    bus = Bus(stack.env["KAIROS_NATS_URL"], prefix=stack.env["KAIROS_BUS_PREFIX"])
    await bus.connect()
    stack.stop("selection")  # so that what follows reaches it as one batch
    try:
        # A change announced for a version the profile never writes (as for a customer
        # erased right after it changed: the projection is gone).
        ghost = ProfileChanged(customer_id=f"wait-{u}-ghost", version=7, changed=["tags"])
        await bus.publish(*ghost.to_event(source="test"))
        ghost_seq = (await bus.js.stream_info(bus.stream("PROFILE"))).state.last_seq
        r = await gw.patch(f"/v1/customers/{a}", json={"tags_add": [f"wait-later:{u}"]})
        assert r.status_code == 200, r.text
        lines = [{"customer_id": f"wait-{u}-imp{i}", "tags": [f"wait:{u}"]} for i in range(3)]
        r = await gw.post(
            "/v1/customers:import",
            content=b"".join(orjson.dumps(x) + b"\n" for x in lines),
            headers={"content-type": "application/x-ndjson"},
        )
        assert r.status_code == 200 and r.json()["imported"] == 3, r.text
        last = (await bus.js.stream_info(bus.stream("PROFILE"))).state.last_seq
    finally:
        stack.start("selection")
    try:
        await eventually(lambda: _count(gw, mine), lambda n: n == 4, timeout=20)
        assert await _count(gw, later) == 1
        # The position passes the waiting change well before it gives up (30 deliveries).
        await eventually(lambda: _profile_seq(gw), lambda n: n >= last, timeout=10)
        # A restart while it waits resumes before it, not at the position shown.
        stack.stop("selection")
        path = stack.run_dir / "selection" / "index.pickle"
        saved = pickle.loads(path.read_bytes())
        assert saved["pop"].seq >= last
        assert saved["resume_seq"] < ghost_seq
    finally:
        stack.start("selection")
        await bus.close()
    await eventually(lambda: _count(gw, mine), lambda n: n == 4)
