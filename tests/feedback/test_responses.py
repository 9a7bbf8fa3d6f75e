"""``POST /v1/responses``: counted once under concurrent duplicates, 404 for an unknown
tracking id, 422 naming the field; delivery statuses in the history and the report."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx

from shared.bus import Bus
from shared.contracts.bus import DeliveryReported
from shared.events import iso, utcnow
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
