"""Conversion attribution: the first event of the rule's type within the window after the
contact, for targets and controls alike, whatever order the event and the contact arrive in;
an event converts for every campaign whose window it falls in."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from shared.bus import Bus
from shared.events import utcnow
from shared.stack import Stack
from tests.feedback.conftest import contact, history, publish, publish_event, report, uid
from tests.helpers import eventually


async def _kept_events(stack: Stack, customer_id: str) -> int:
    engine = create_async_engine(stack.env["KAIROS_DATABASE_URL"])
    try:
        async with engine.connect() as conn:
            n = await conn.scalar(
                sa.text("SELECT count(*) FROM feedback.recent_events WHERE customer_id = :c"),
                {"c": customer_id},
            )
    finally:
        await engine.dispose()
    return int(n or 0)


async def test_attribution_for_target_and_control_in_any_order(
    gw: httpx.AsyncClient, stack: Stack, bus: Bus
) -> None:
    u = uid()
    cmp, cmp2 = f"cmp-{u}", f"cmp2-{u}"
    etype = f"purchase.done_{u}"
    rule = (etype, "1h")
    t0 = utcnow() - timedelta(hours=3)
    who = {k: f"{k}-{u}" for k in ("in", "before", "after", "twice", "early", "cin", "cout")}
    contacts = {
        "in": contact(who["in"], cmp, at=t0, conversion=rule, treatment="A", channel="push"),
        "before": contact(
            who["before"], cmp, at=t0, conversion=rule, treatment="A", channel="push"
        ),
        "after": contact(who["after"], cmp, at=t0, conversion=rule, treatment="A", channel="push"),
        "twice": contact(who["twice"], cmp, at=t0, conversion=rule, treatment="B", channel="sms"),
        "cin": contact(who["cin"], cmp, at=t0, conversion=rule, control=True),
        "cout": contact(who["cout"], cmp, at=t0, conversion=rule, control=True),
        # The same customer in another campaign with the same rule: the event counts there too.
        "other": contact(who["in"], cmp2, at=t0 + timedelta(minutes=1), conversion=rule),
    }
    await publish(bus, *contacts.values())
    await eventually(
        lambda: report(gw, cmp),
        lambda r: (r["totals"]["targeted"], r["totals"]["control"]) == (4, 2),
    )

    # An event that arrives before its contact is kept and attributed when the contact comes.
    await publish_event(bus, who["early"], etype, t0 + timedelta(minutes=5), value=10)
    await eventually(lambda: _kept_events(stack, who["early"]), lambda n: n == 1)
    early = contact(who["early"], cmp, at=t0, conversion=rule, treatment="A", channel="push")
    await publish(bus, early)

    await publish_event(bus, who["before"], etype, t0 - timedelta(minutes=5), value=99)
    await publish_event(bus, who["after"], etype, t0 + timedelta(hours=2), value=99)
    await publish_event(bus, who["twice"], etype, t0 + timedelta(minutes=10), value=7)
    await publish_event(bus, who["twice"], etype, t0 + timedelta(minutes=20), value=9)
    await publish_event(bus, who["cout"], f"other.type_{u}", t0 + timedelta(minutes=1))
    await publish_event(bus, who["cin"], etype, t0 + timedelta(minutes=30), amount=5)
    await publish_event(bus, who["in"], etype, t0 + timedelta(minutes=10), value=20)

    rep = await eventually(lambda: report(gw, cmp), lambda r: r["totals"]["converted"] >= 4)
    # Computed here from the scenario: targets in, early, twice converted (out of 5);
    # control cin converted (out of 2); before and after are outside their windows.
    assert rep["totals"]["converted"] == 4
    assert rep["totals"]["revenue"] == 20 + 10 + 7 + 5
    assert rep["by_treatment"]["A"]["converted"] == 2
    assert rep["by_treatment"]["B"]["converted"] == 1
    assert rep["by_channel"]["sms"]["revenue"] == 7
    up: dict[str, Any] = rep["uplift"]
    assert up["target"] == {"contacts": 5, "converted": 3, "revenue": 37.0}
    assert up["control"] == {"contacts": 2, "converted": 1, "revenue": 5.0}
    assert abs(up["target_rate"] - 3 / 5) < 1e-12 and abs(up["control_rate"] - 1 / 2) < 1e-12
    assert abs(up["incremental_revenue"] - (37 / 5 - 5 / 2) * 5) < 1e-9
    assert up["ci95"][0] < up["absolute"] < up["ci95"][1]

    rep2 = await eventually(lambda: report(gw, cmp2), lambda r: r["totals"]["converted"] == 1)
    assert rep2["totals"]["revenue"] == 20

    conv = [
        r for r in (await history(gw, stack, who["in"]))["responses"] if r["outcome"] == "converted"
    ]
    assert {r["campaign_id"] for r in conv} == {cmp, cmp2}
    assert {r["value"] for r in conv} == {20}
    twice = (await history(gw, stack, who["twice"]))["responses"]
    assert [(r["outcome"], r["value"]) for r in twice] == [("converted", 7)]
    for k in ("before", "after", "cout"):
        assert (await history(gw, stack, who[k]))["responses"] == [], k
