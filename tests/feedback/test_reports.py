"""Campaign and programme reports against counts computed here from what the test sent;
the CSV form; contacts counted once per tracking id even when re-sent with another time."""

from __future__ import annotations

import csv
import io
import random
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from shared.bus import Bus
from shared.contracts.bus import ContactRecorded, DeliveryReported
from shared.stack import Stack
from tests.feedback.conftest import contact, publish, report, uid
from tests.helpers import eventually

FIELDS = ("targeted", "control", "offered", "sent", "delivered", "opened", "clicked", "accepted")


def _expected(
    contacts: list[ContactRecorded],
    sent: set[str],
    delivered: set[str],
    responses: set[tuple[str, str]],
) -> dict[str, Any]:
    """Totals and slices computed from the scenario, independently of the service."""
    slices: dict[str, dict[str, Counter[str]]] = {
        "by_treatment": defaultdict(Counter),
        "by_channel": defaultdict(Counter),
        "by_day": defaultdict(Counter),
    }
    totals: Counter[str] = Counter()
    for c in contacts:
        got: Counter[str] = Counter()
        got["control" if c.control else "targeted"] += 1
        if not c.control and c.touchpoint:
            got["offered"] += 1
        got["sent"] += c.tracking_id in sent
        got["delivered"] += c.tracking_id in delivered
        for outcome in ("opened", "clicked", "accepted"):
            got[outcome] += (c.tracking_id, outcome) in responses
        totals += got
        slices["by_treatment"][c.treatment or "none"] += got
        slices["by_channel"][c.channel or "none"] += got
        slices["by_day"][c.time[:10]] += got
    return {"totals": totals, **slices}


def _pick(counts: dict[str, Any]) -> dict[str, int]:
    return {f: int(counts.get(f, 0)) for f in FIELDS}


async def test_report_matches_the_scenario(gw: httpx.AsyncClient, bus: Bus) -> None:
    rnd = random.Random(7)
    cmp = f"cmp-{uid()}"
    now = datetime.now(UTC).replace(hour=12)
    contacts = []
    for i in range(60):
        control = rnd.random() < 0.25
        contacts.append(
            contact(
                f"c-{i}-{uid()}",
                cmp,
                at=now - timedelta(days=rnd.randrange(3)),
                control=control,
                treatment=None if control else rnd.choice(["A", "B"]),
                channel=None if control else rnd.choice(["push", "email", None]),
                touchpoint=None if control else rnd.choice(["pos", None]),
            )
        )
    await publish(bus, *contacts)
    await eventually(
        lambda: report(gw, cmp), lambda r: r["totals"]["targeted"] + r["totals"]["control"] == 60
    )

    targets = [c for c in contacts if not c.control]
    sent = {c.tracking_id for c in targets if rnd.random() < 0.8}
    delivered = {t for t in sent if rnd.random() < 0.7}
    await bus.publish_many(
        [
            DeliveryReported(tracking_id=t, customer_id="x", channel="push", status=s).to_event(
                source="kairos/dispatch"
            )
            for s, ids in (("sent", sent), ("delivered", delivered))
            for t in sorted(ids)
        ]
    )
    responses = {
        (c.tracking_id, o)
        for c in contacts
        for o in ("opened", "clicked", "accepted")
        if rnd.random() < 0.3
    }
    for t, o in sorted(responses):
        r = await gw.post("/v1/responses", json={"tracking_id": t, "outcome": o})
        assert r.status_code == 202, r.text

    # A re-planned page re-sends some contacts with another time: still counted once.
    again = [
        c.model_copy(update={"time": (now + timedelta(minutes=5)).isoformat()})
        for c in contacts[:10]
    ]
    await bus.publish_many(
        [c.to_event(source="kairos/decision", id_=f"contact-again-{c.tracking_id}") for c in again]
    )
    sentinel = contact(f"late-{uid()}", cmp, at=now, treatment="A", channel="push")
    contacts.append(sentinel)
    await publish(bus, sentinel)

    want = _expected(contacts, sent, delivered, responses)
    rep = await eventually(
        lambda: report(gw, cmp),
        lambda r: _pick(r["totals"]) == _pick(want["totals"]),
    )
    for slice_ in ("by_treatment", "by_channel", "by_day"):
        assert {k: _pick(v) for k, v in rep[slice_].items()} == {
            k: _pick(v) for k, v in want[slice_].items()
        }, slice_
    assert list(rep["by_day"]) == sorted(rep["by_day"])

    r = await gw.get(f"/v1/campaigns/{cmp}/report.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    total = next(row for row in rows if row["slice"] == "total")
    assert {f: int(total[f]) for f in FIELDS} == _pick(want["totals"])
    by_day = {row["key"]: int(row["targeted"]) for row in rows if row["slice"] == "day"}
    assert by_day == {k: v["targeted"] for k, v in want["by_day"].items()}


async def test_report_of_a_campaign_without_contacts_and_bad_ids(gw: httpx.AsyncClient) -> None:
    r = await gw.get(f"/v1/campaigns/cmp-none-{uid()}/report")
    assert r.status_code == 200
    doc = r.json()
    assert doc["totals"]["targeted"] == 0 and doc["uplift"]["p_value"] == 1.0
    assert (await gw.get("/v1/campaigns/bad%20id!/report")).status_code == 422
    assert (await gw.get("/v1/reports/programme", params={"month": "2026-13"})).status_code == 422


async def test_reports_need_the_scope(stack: Stack) -> None:
    from tests.conftest import auth

    async with httpx.AsyncClient(base_url=stack.url("gateway"), headers=auth("reader")) as c:
        assert (await c.get("/v1/campaigns/x/report")).status_code == 403
        assert (await c.get("/v1/exports/contacts")).status_code == 403
        r = await c.post("/v1/responses", json={"tracking_id": "x", "outcome": "opened"})
        assert r.status_code == 403


async def test_programme_global_control_and_contact_pressure(
    gw: httpx.AsyncClient, bus: Bus
) -> None:
    before = (await gw.get("/v1/reports/programme")).json()
    month = datetime(2024, 2, 10, tzinfo=UTC)
    u = uid()
    # Contacts per customer in February 2024: 1, 1, 2, 3, 10 (control contacts do not count).
    per_customer = {f"p1-{u}": 1, f"p2-{u}": 1, f"p3-{u}": 2, f"p4-{u}": 3, f"p5-{u}": 10}
    old = [
        contact(cust, f"cmp-old-{u}-{i}", at=month + timedelta(hours=i))
        for cust, n in per_customer.items()
        for i in range(n)
    ]
    old.append(contact(f"p1-{u}", f"cmp-old-{u}", at=month, control=True, control_kind="global"))
    now = datetime.now(UTC)
    fresh = [contact(f"g-{i}-{u}", f"cmp-g-{u}", at=now) for i in range(4)]
    fresh += [
        contact(f"h-{i}-{u}", f"cmp-g-{u}", at=now, control=True, control_kind="global")
        for i in range(3)
    ]
    fresh.append(contact(f"k-{u}", f"cmp-g-{u}", at=now, control=True, control_kind="campaign"))
    await publish(bus, *old, *fresh)

    async def programme() -> dict[str, Any]:
        r = await gw.get("/v1/reports/programme", params={"month": "2024-02"})
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    doc = await eventually(
        programme,
        lambda d: (
            d["treated"]["targeted"] - before["treated"]["targeted"] == len(old) - 1 + 4
            and d["global_control"]["control"] - before["global_control"]["control"] == 4
        ),
    )
    assert doc["contacts_per_customer"] == {
        "month": "2024-02",
        "customers": 5,
        "median": 2.0,
        "p90": 10.0,
        "max": 10,
    }
    assert doc["uplift"]["control"]["contacts"] == doc["global_control"]["control"]
