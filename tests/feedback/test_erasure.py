"""Erasure: a customer who went through every flow (contact, delivery, click, open, SMS
reply, accept, conversion, unsubscribe) leaves no trace of their id or address in any of
feedback's tables within 10 s, and the campaign's counts stay as they were."""

from __future__ import annotations

from datetime import timedelta

import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from shared.bus import Bus
from shared.contracts.bus import DeliveryReported, ResponseReceived
from shared.events import utcnow
from shared.links import LinkSigner
from shared.stack import Stack
from tests.feedback.conftest import contact, publish, publish_event, report, stored, uid
from tests.helpers import eventually


async def _traces(stack: Stack, needles: list[str]) -> dict[str, int]:
    """Rows of every table of the feedback schema whose text holds any needle."""
    engine = create_async_engine(stack.env["KAIROS_DATABASE_URL"])
    found: dict[str, int] = {}
    try:
        async with engine.connect() as conn:
            tables = (
                await conn.execute(
                    sa.text(
                        "SELECT c.relname FROM pg_class c JOIN pg_namespace n"
                        " ON n.oid = c.relnamespace WHERE n.nspname = 'feedback'"
                        " AND c.relkind IN ('r', 'p') AND NOT c.relispartition"
                    )
                )
            ).scalars()
            for table in list(tables):
                text = "convert_from(t.payload, 'UTF8')" if table == "outbox" else "CAST(t AS text)"
                where = " OR ".join(f"{text} LIKE :n{i}" for i in range(len(needles)))
                n = await conn.scalar(
                    sa.text(f'SELECT count(*) FROM feedback."{table}" t WHERE {where}'),
                    {f"n{i}": f"%{x}%" for i, x in enumerate(needles)},
                )
                if n:
                    found[table] = int(n)
    finally:
        await engine.dispose()
    return found


async def test_erasure_leaves_no_personal_data_and_keeps_counts(
    gw: httpx.AsyncClient, stack: Stack, bus: Bus, signer: LinkSigner
) -> None:
    u = uid()
    cust, cmp = f"erase-me-{u}", f"cmp-e-{u}"
    email, msisdn = f"ana.{u}@example.com", "+4915112345678"
    r = await gw.put(
        f"/v1/customers/{cust}",
        json={
            "attributes": {"first_name": "Ana"},
            "tags": [],
            "consents": {"email": True, "sms": True},
            "identities": {"email": email, "msisdn": msisdn},
        },
    )
    assert r.status_code == 200, r.text
    etype = f"topup.done_{u}"
    t0 = utcnow() - timedelta(minutes=30)
    mail = contact(cust, cmp, at=t0, channel="email", treatment="A", conversion=(etype, "1d"))
    sms = contact(cust, cmp, at=t0, channel="sms", treatment="A")
    await publish(bus, mail, sms)
    await stored(gw, stack, cust, 2)

    await bus.publish_many(
        [
            DeliveryReported(
                tracking_id=mail.tracking_id, customer_id=cust, channel="email", status="delivered"
            ).to_event(source="kairos/dispatch"),
            ResponseReceived(
                tracking_id=sms.tracking_id,
                outcome="replied",
                text=f"call me at {msisdn} or {email}",
                choice="2",
                customer_id=cust,
                source="sms",
            ).to_event(source="kairos/dispatch"),
        ]
    )
    async with httpx.AsyncClient(follow_redirects=False) as public:
        click = signer.url("t", mail.tracking_id, channel="email", url="https://example.com/o")
        assert (await public.get(click)).status_code == 302
        assert (
            await public.get(signer.url("o", mail.tracking_id, channel="email"))
        ).status_code == 200
        unsub = signer.url("u", mail.tracking_id, channel="email")
        assert (await public.post(unsub)).status_code == 200
    r = await gw.post("/v1/responses", json={"tracking_id": sms.tracking_id, "outcome": "accepted"})
    assert r.status_code == 202
    await publish_event(bus, cust, etype, t0 + timedelta(minutes=5), value=15)

    def complete(rep: dict[str, int]) -> bool:
        return (
            rep["delivered"],
            rep["clicked"],
            rep["opened"],
            rep["unsubscribed"],
            rep["accepted"],
            rep["converted"],
        ) == (1, 1, 1, 1, 1, 1)

    before = await eventually(lambda: report(gw, cmp), lambda r: complete(r["totals"]))
    assert await _traces(stack, [cust, email, msisdn])  # the scan does see the data

    r = await gw.delete(f"/v1/customers/{cust}")
    assert r.status_code == 202, r.text
    await eventually(lambda: _traces(stack, [cust, email, msisdn]), lambda f: f == {}, timeout=10)

    after = await report(gw, cmp)
    assert after["totals"] == before["totals"]
    assert after["uplift"] == before["uplift"]

    hist = await gw.get(f"/v1/customers/{cust}")
    assert hist.status_code == 404

    # A contact still in flight when the customer was erased is stored under the pseudonym.
    late = contact(cust, cmp, channel="push", treatment="A", conversion=(etype, "1d"))
    await publish(bus, late)
    await publish_event(bus, cust, etype, utcnow(), value=3)
    await eventually(lambda: report(gw, cmp), lambda r: r["totals"]["targeted"] == 3)
    assert await _traces(stack, [cust, email, msisdn]) == {}
