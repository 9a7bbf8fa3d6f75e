"""``contacted`` rules beyond the CONTACT stream's retention: a selection process that rebuilds
its index after the stream has aged out takes the older contacts from feedback's history."""

from __future__ import annotations

import uuid
from datetime import timedelta

import httpx
import nats

from shared.bus import Bus
from shared.contracts.bus import ContactRecorded
from shared.events import iso, utcnow
from shared.stack import Stack
from tests.helpers import eventually


async def _count(gw: httpx.AsyncClient, rule: dict[str, object]) -> int:
    r = await gw.post("/v1/segments:preview", json={"rule": rule})
    return int(r.json()["count"]) if r.status_code == 200 else -1  # -1: the index is loading


async def test_contacted_survives_the_stream_aging_out(stack: Stack, gw: httpx.AsyncClient) -> None:
    u = uuid.uuid4().hex[:8]
    cust = f"bf-{u}"
    r = await gw.put(f"/v1/customers/{cust}", json={"tags": [f"bf:{u}"]})
    assert r.status_code == 200, r.text
    rule = {
        "all": [{"tag": f"bf:{u}"}, {"contacted": {"campaign": f"cmp-bf-{u}", "within": "14d"}}]
    }
    bus = Bus(stack.env["KAIROS_NATS_URL"], prefix=stack.env["KAIROS_BUS_PREFIX"])
    await bus.connect(ensure_streams=False)
    try:
        contact = ContactRecorded(
            tracking_id=f"bf-{u}",
            customer_id=cust,
            campaign_id=f"cmp-bf-{u}",
            channel="email",
            time=iso(utcnow() - timedelta(days=3)),
        )
        await bus.publish(*contact.to_event(source="test", id_=f"contact-bf-{u}"))
    finally:
        await bus.close()
    await eventually(lambda: _count(gw, rule), lambda n: n == 1)
    # feedback has it in its history …
    await eventually(
        lambda: gw.get(f"/v1/customers/{cust}"),
        lambda r: any(c["tracking_id"] == f"bf-{u}" for c in r.json().get("contacts", [])),
    )
    # … then the stream ages out (purged here) and selection starts without its saved index.
    nc = await nats.connect(stack.env["KAIROS_NATS_URL"])
    try:
        await nc.jetstream().purge_stream(f"{stack.env['KAIROS_BUS_PREFIX'].upper()}_CONTACT")
    finally:
        await nc.close()
    stack.stop("selection")
    for saved in (stack.run_dir / "selection").glob("*"):
        saved.unlink()
    stack.start("selection")
    stack.wait_ready(["selection"])
    await eventually(lambda: _count(gw, rule), lambda n: n == 1, timeout=60)
