"""``POST /v1/responses``: counted once under concurrent duplicates, 404 for an unknown
tracking id, 422 naming the field; delivery statuses in the history and the report."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
import nats

from shared.bus import Bus
from shared.contracts.bus import DeliveryReported, ResponseReceived, ResponseRecorded, Reward
from shared.events import CloudEvent, iso, utcnow
from shared.stack import Stack
from tests.feedback.conftest import contact, history, publish, report, stored, uid
from tests.helpers import eventually


async def test_concurrent_duplicates_count_once(
    gw: httpx.AsyncClient, stack: Stack, bus: Bus
) -> None:
    cust, cmp = f"c-{uid()}", f"cmp-{uid()}"
    c = contact(cust, cmp, treatment="A", channel="push", offer_id="off-1")
    await publish(bus, c)
    await stored(gw, stack, cust, 1)

    body = {"tracking_id": c.tracking_id, "outcome": "accepted", "value": 12.5}
    answers = await asyncio.gather(*(gw.post("/v1/responses", json=body) for _ in range(12)))
    assert {r.status_code for r in answers} == {202}
    assert sum(r.json()["recorded"] for r in answers) == 1

    rep = await report(gw, cmp)
    assert rep["totals"]["accepted"] == 1
    assert rep["by_treatment"]["A"]["accepted"] == 1
    h = await history(gw, stack, cust)
    assert [(x["tracking_id"], x["outcome"]) for x in h["responses"]] == [
        (c.tracking_id, "accepted")
    ]


async def test_a_response_waits_briefly_for_its_contact(
    gw: httpx.AsyncClient, stack: Stack, bus: Bus
) -> None:
    cust, cmp = f"c-{uid()}", f"cmp-{uid()}"
    c = contact(cust, cmp, touchpoint="pos")
    # The response is sent first; the contact follows while the request waits for it.
    pending = asyncio.create_task(
        gw.post("/v1/responses", json={"tracking_id": c.tracking_id, "outcome": "clicked"})
    )
    await asyncio.sleep(0.3)
    await publish(bus, c)
    r = await pending
    assert r.status_code == 202, r.text


async def test_unknown_tracking_id_is_404(gw: httpx.AsyncClient) -> None:
    r = await gw.post("/v1/responses", json={"tracking_id": f"nope-{uid()}", "outcome": "opened"})
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")


async def test_bad_input_names_the_field(gw: httpx.AsyncClient) -> None:
    future = iso(utcnow() + timedelta(hours=1))
    cases = [
        ({"tracking_id": "t-1", "outcome": "loved"}, "outcome"),
        ({"tracking_id": "t-1", "outcome": "accepted", "value": "12.5"}, "value"),
        ({"tracking_id": "t-1", "outcome": "accepted", "value": True}, "value"),
        ({"tracking_id": "t-1", "outcome": "accepted", "time": future}, "time"),
        ({"tracking_id": "t-1", "outcome": "accepted", "time": "yesterday"}, "time"),
        ({"tracking_id": "t-1", "outcome": "accepted", "time": "2001-01-01T00:00:00Z"}, "time"),
        ({"tracking_id": "t-1", "outcome": "accepted", "time": "2026-01-01T00:00:00"}, "time"),
        ({"outcome": "accepted"}, "tracking_id"),
    ]
    for body, field in cases:
        r = await gw.post("/v1/responses", json=body)
        assert r.status_code == 422, (body, r.text)
        assert field in [e["loc"][0] for e in r.json()["errors"]], (body, r.json())
    # A clock a little ahead is fine (skew), and validation did not need the contact.
    ok = await gw.post(
        "/v1/responses",
        json={
            "tracking_id": f"nope-{uid()}",
            "outcome": "opened",
            "time": iso(utcnow() + timedelta(seconds=30)),
        },
    )
    assert ok.status_code == 404


async def test_delivery_statuses_show_in_history_and_report(
    gw: httpx.AsyncClient, stack: Stack, bus: Bus
) -> None:
    cust, cmp = f"c-{uid()}", f"cmp-{uid()}"
    a = contact(cust, cmp, channel="email", treatment="A")
    b = contact(cust, cmp, channel="email", treatment="A")
    await publish(bus, a, b)
    await stored(gw, stack, cust, 2)
    reports = [
        DeliveryReported(
            tracking_id=a.tracking_id, customer_id=cust, channel="email", status="sent"
        ),
        DeliveryReported(
            tracking_id=a.tracking_id, customer_id=cust, channel="email", status="delivered"
        ),
        # Delivered twice (a provider retrying its webhook): counted once.
        DeliveryReported(
            tracking_id=a.tracking_id, customer_id=cust, channel="email", status="delivered"
        ),
        DeliveryReported(
            tracking_id=b.tracking_id, customer_id=cust, channel="email", status="sent"
        ),
        DeliveryReported(
            tracking_id=b.tracking_id, customer_id=cust, channel="email", status="bounced"
        ),
    ]
    await bus.publish_many([r.to_event(source="kairos/dispatch") for r in reports])

    def statuses(h: dict[str, object]) -> dict[str, str]:
        return {x["tracking_id"]: x["status"] for x in h["contacts"]}  # type: ignore[index, union-attr]

    h = await eventually(
        lambda: history(gw, stack, cust),
        lambda h: statuses(h) == {a.tracking_id: "delivered", b.tracking_id: "bounced"},
    )
    assert h
    rep = await report(gw, cmp)
    t = rep["totals"]
    assert (t["targeted"], t["sent"], t["delivered"], t["bounced"]) == (2, 2, 1, 1)
    assert rep["by_channel"]["email"]["delivered"] == 1


async def test_a_real_touchpoint_decision_is_recorded_and_answered(
    gw: httpx.AsyncClient, stack: Stack
) -> None:
    from tests.decision.test_decisions import _campaign, _offer

    u = uid()
    tp, cmp, cust = f"pos_{u}", f"cmp-{u}", f"c-{u}"
    offer = await _offer(gw, u)
    await _campaign(gw, cmp, tp, offer)

    async def decide() -> dict[str, object]:
        r = await gw.post("/v1/decisions", json={"customer_id": cust, "touchpoint": tp})
        assert r.status_code == 200, r.text
        doc: dict[str, object] = r.json()
        return doc

    got = await eventually(decide, lambda d: bool(d["offers"]))
    tracking = got["offers"][0]["tracking_id"]  # type: ignore[index]
    # Answered at once: feedback waits for the contact if it is still on its way.
    r = await gw.post("/v1/responses", json={"tracking_id": tracking, "outcome": "accepted"})
    assert r.status_code == 202, r.text
    rep = await report(gw, cmp)
    assert (rep["totals"]["targeted"], rep["totals"]["offered"], rep["totals"]["accepted"]) == (
        1,
        1,
        1,
    )
    assert rep["by_treatment"]["A"]["accepted"] == 1


async def _recorded(stack: Stack, tracking_ids: set[str], n: int) -> list[ResponseRecorded]:
    """The ``response.recorded`` messages of these contacts, read back from JetStream."""
    nc = await nats.connect(stack.env["KAIROS_NATS_URL"])
    out: list[ResponseRecorded] = []
    try:
        sub = await nc.jetstream().subscribe(
            f"{stack.env['KAIROS_BUS_PREFIX']}.response.recorded.*", ordered_consumer=True
        )
        while len(out) < n:
            msg = await sub.next_msg(timeout=10)
            rec = ResponseRecorded.parse(CloudEvent.from_bytes(msg.data))
            if rec.tracking_id in tracking_ids:
                out.append(rec)
    finally:
        await nc.close()
    return out


async def test_bus_responses_are_announced_with_their_contact(
    gw: httpx.AsyncClient, stack: Stack, bus: Bus
) -> None:
    cust, cmp = f"c-{uid()}", f"cmp-{uid()}"
    reward = Reward(type="bonus_points", amount=500)
    target = contact(
        cust, cmp, channel="sms", treatment="B", offer_id="off-9", reward=reward, value=4.0
    )
    ctrl = contact(cust, cmp, control=True, reward=reward)
    await publish(bus, target, ctrl)
    await stored(gw, stack, cust, 2)
    replies = [
        ResponseReceived(
            tracking_id=target.tracking_id, outcome="replied", text="2", choice="2", source="sms"
        ),
        # The same reply delivered twice by the SMS gateway: recorded once.
        ResponseReceived(
            tracking_id=target.tracking_id, outcome="replied", text="2", choice="2", source="sms"
        ),
        ResponseReceived(tracking_id=ctrl.tracking_id, outcome="converted", value=9.5),
    ]
    await bus.publish_many([r.to_event(source="kairos/dispatch") for r in replies])
    got = await _recorded(stack, {target.tracking_id, ctrl.tracking_id}, 2)
    by = {r.tracking_id: r for r in got}
    t = by[target.tracking_id]
    assert (t.customer_id, t.campaign_id, t.offer_id, t.treatment, t.channel) == (
        cust,
        cmp,
        "off-9",
        "B",
        "sms",
    )
    assert (t.outcome, t.choice, t.control, t.reward) == ("replied", "2", False, reward)
    c = by[ctrl.tracking_id]
    # A control contact was offered nothing: its conversion grants no reward.
    assert (c.outcome, c.control, c.value, c.reward) == ("converted", True, 9.5, None)
    rep = await eventually(
        lambda: report(gw, cmp), lambda r: r["uplift"]["control"]["converted"] == 1
    )
    assert rep["totals"]["converted"] == 1
