"""The thin flow: an event posted at the gateway reaches profile over JetStream and shows in the view."""

from __future__ import annotations

import os
import signal
import uuid

import httpx
import nats
import orjson

from shared.stack import Stack
from tests.helpers import eventually


async def _counter(gw: httpx.AsyncClient, cid: str, etype: str) -> int:
    r = await gw.get(f"/v1/customers/{cid}")
    if r.status_code != 200:
        return -1
    return int(r.json()["counters"].get(etype, {}).get("total", 0))


async def test_event_shows_in_view(gw: httpx.AsyncClient, cid: str) -> None:
    r = await gw.put(
        f"/v1/customers/{cid}", json={"attributes": {"age": 30}, "tags": ["value:gold"]}
    )
    assert r.status_code == 200, r.text
    r = await gw.post(
        "/v1/events",
        json={"type": "app.opened", "customer_id": cid, "properties": {"screen": "home"}},
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["accepted"] == 1
    assert len(body["ids"]) == 1
    view = await eventually(
        lambda: gw.get(f"/v1/customers/{cid}"), lambda r: "app.opened" in r.json()["counters"]
    )
    doc = view.json()
    assert doc["counters"]["app.opened"]["1d"] == 1
    assert doc["counters"]["app.opened"]["30d"] == 1
    assert doc["last"]["app.opened"] == {"screen": "home"}
    assert doc["attributes"] == {"age": 30}
    assert doc["partial"] is False
    assert doc["missing"] == []


async def test_unknown_customer_is_created_on_first_event(gw: httpx.AsyncClient, cid: str) -> None:
    assert (await gw.get(f"/v1/customers/{cid}")).status_code == 404
    await gw.post(
        "/v1/events", json={"type": "topup", "customer_id": cid, "properties": {"amount": 10}}
    )
    await eventually(lambda: _counter(gw, cid, "topup"), lambda n: n == 1)


async def test_duplicate_event_ids_count_once(gw: httpx.AsyncClient, cid: str) -> None:
    eid = str(uuid.uuid4())
    ev = {"id": eid, "type": "topup", "customer_id": cid}
    r1 = await gw.post("/v1/events", json=ev)
    r2 = await gw.post("/v1/events", json=ev)
    r3 = await gw.post("/v1/events", json={"events": [ev, ev]})
    assert r1.status_code == r2.status_code == r3.status_code == 202
    assert r2.json()["ids"] == [eid]
    marker = {"type": "app.opened", "customer_id": cid}
    await gw.post("/v1/events", json=marker)
    await eventually(lambda: _counter(gw, cid, "app.opened"), lambda n: n == 1)
    assert await _counter(gw, cid, "topup") == 1


async def test_batch_is_all_or_nothing(gw: httpx.AsyncClient, cid: str) -> None:
    good = {"type": "call.dropped", "customer_id": cid}
    bad = {"type": "Call Dropped!", "customer_id": cid}
    r = await gw.post("/v1/events", json={"events": [good, good, bad, {"type": "x"}]})
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    locs = [e["loc"][:2] for e in r.json()["errors"]]
    assert ["events", 2] in locs
    assert ["events", 3] in locs
    assert ["events", 0] not in locs
    await gw.post("/v1/events", json={"events": [{"type": "app.opened", "customer_id": cid}]})
    await eventually(lambda: _counter(gw, cid, "app.opened"), lambda n: n == 1)
    assert await _counter(gw, cid, "call.dropped") == 0


async def test_batch_of_many_events(gw: httpx.AsyncClient, cid: str) -> None:
    events = [{"type": "app.opened", "customer_id": cid} for _ in range(250)]
    r = await gw.post("/v1/events", json={"events": events})
    assert r.status_code == 202
    assert r.json()["accepted"] == 250
    assert len(set(r.json()["ids"])) == 250
    await eventually(lambda: _counter(gw, cid, "app.opened"), lambda n: n == 250)


async def test_poison_message_goes_to_dead_letter_and_consumer_continues(
    gw: httpx.AsyncClient, stack: Stack, cid: str
) -> None:
    prefix = stack.env["KAIROS_BUS_PREFIX"]
    nc = await nats.connect(stack.env["KAIROS_NATS_URL"])
    js = nc.jetstream()
    try:
        dlq = await js.subscribe(f"{prefix}.dlq.profile-events", durable=None)
        # Not a CloudEvent at all, and a CloudEvent whose data is not an event.
        await js.publish(f"{prefix}.events.garbage", b"\x00not json")
        bad = {
            "id": str(uuid.uuid4()),
            "source": "test",
            "type": "x",
            "specversion": "1.0",
            "time": "2026-01-01T00:00:00Z",
            "data": {"no": "type"},
        }
        await js.publish(f"{prefix}.events.broken", orjson.dumps(bad))
        reasons = []
        for _ in range(2):
            msg = await dlq.next_msg(timeout=30)
            reasons.append(msg.headers.get("Kairos-Dead-Reason", ""))
        assert any("undecodable" in r for r in reasons)
        # The consumer still applies new events.
        await gw.post("/v1/events", json={"type": "app.opened", "customer_id": cid})
        await eventually(lambda: _counter(gw, cid, "app.opened"), lambda n: n == 1)
    finally:
        await nc.close()


async def test_profile_restart_loses_no_accepted_event(
    gw: httpx.AsyncClient, stack: Stack, cid: str
) -> None:
    proc = stack.procs["profile"]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    try:
        # The gateway still accepts: JetStream holds the events until profile is back.
        for i in range(5):
            r = await gw.post(
                "/v1/events",
                json={
                    "events": [
                        {"type": "topup", "customer_id": cid, "properties": {"n": i}}
                        for _ in range(20)
                    ]
                },
            )
            assert r.status_code == 202
    finally:
        stack.start("profile")
        stack.wait_ready(["profile"])
    await eventually(lambda: _counter(gw, cid, "topup"), lambda n: n == 100, timeout=30)


async def test_sigterm_drains_without_losing_events(
    gw: httpx.AsyncClient, stack: Stack, cid: str
) -> None:
    """A rolling restart (SIGTERM) while events arrive loses and double-counts nothing."""
    sent = 0
    for i in range(10):
        r = await gw.post(
            "/v1/events",
            json={
                "events": [
                    {"type": "topup", "customer_id": cid, "properties": {"i": i}} for _ in range(30)
                ]
            },
        )
        assert r.status_code == 202
        sent += 30
        if i == 3:
            stack.stop("profile")  # SIGTERM: finish the batch in hand, then exit
            stack.start("profile")
    stack.wait_ready(["profile"])
    await eventually(lambda: _counter(gw, cid, "topup"), lambda n: n == sent, timeout=30)
