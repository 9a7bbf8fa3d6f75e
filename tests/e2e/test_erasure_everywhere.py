"""Right to erasure reaches every store: one customer goes through every flow (profile with
identities and a device, anonymous events folded in, a triggered campaign sent over push and
SMS to the providers' peers, a touchpoint decision, responses, a dead letter, idempotent
writes), is erased, and then nothing holds their id, e-mail, MSISDN, device token or anonymous
id: no stream message, no Redis key or value, no row of any service's table, not selection's
saved index file. Each store is scanned whole, not asked through an API."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import nats
import orjson
import pytest

from shared.events import CloudEvent
from shared.privacy import customer_subject
from shared.stack import Stack
from tests.conftest import auth
from tests.helpers import eventually
from tests.stores import Stores

pytestmark = pytest.mark.slow

ERASED_WITHIN_S = 10.0


@pytest.fixture
async def stores(stack: Stack) -> AsyncIterator[Stores]:
    async with Stores(stack) as s:
        yield s


async def _campaigns(gw: httpx.AsyncClient, u: str) -> str:
    offer = f"off-{u}"
    r = await gw.put(
        f"/v1/offers/{offer}",
        json={
            "name": "Roaming",
            "value": 2.0,
            "link": "https://example.com/roam",
            "content": {
                "default": {"title": "Hi {{ attributes.first_name }}", "body": "1 GB"},
                "sms": {"text": "Hi {{ attributes.first_name }}, 1 GB for 5 EUR"},
            },
        },
    )
    assert r.status_code == 200, r.text
    for cmp, body in (
        (f"push-{u}", {"type": "triggered", "trigger": {"event": f"roamed.{u}"}}),
        (f"sms-{u}", {"type": "triggered", "trigger": {"event": f"landed.{u}"}}),
        (f"tp-{u}", {"type": "realtime", "touchpoints": [f"app_{u}"]}),
    ):
        channels = {"push": ["push"], "sms-": ["sms"]}
        extra = next((v for k, v in channels.items() if cmp.startswith(k)), None)
        r = await gw.put(
            f"/v1/campaigns/{cmp}",
            json={
                "name": cmp,
                **body,
                **({"channels": extra} if extra else {}),
                "treatments": [{"id": "A", "offer": offer, "weight": 1}],
                "control_group": 0.0,
                "approval_required": False,
            },
        )
        assert r.status_code == 200, r.text
        assert (await gw.post(f"/v1/campaigns/{cmp}/activate")).status_code == 200
    await asyncio.sleep(0.6)  # every decision replica reloads its catalog
    return offer


async def _history(gw: httpx.AsyncClient, cid: str) -> dict[str, Any]:
    r = await gw.get(f"/v1/customers/{cid}")
    return r.json() if r.status_code == 200 else {}


async def _poison(stack: Stack, cid: str, marker: str) -> None:
    """A contact that names the customer but does not parse: every consumer dead-letters it."""
    prefix = stack.env["KAIROS_BUS_PREFIX"]
    nc = await nats.connect(stack.env["KAIROS_NATS_URL"])
    try:
        ev = CloudEvent.new(
            source="test",
            type="contact.recorded",
            subject=cid,
            data={"customer_id": cid, "campaign_id": marker},  # no tracking id
        )
        subject = customer_subject("contact.recorded", cid)
        await nc.jetstream().publish(f"{prefix}.{subject}", ev.to_bytes())
    finally:
        await nc.close()


async def _dead_letters(stores: Stores, marker: str) -> int:
    found = await stores._streams([marker])
    return sum(1 for f in found if f.startswith("stream:DLQ:"))


async def test_an_erased_customer_is_gone_from_every_store(
    stack: Stack, gw: httpx.AsyncClient, peers: dict[str, Any], stores: Stores
) -> None:
    u = uuid.uuid4().hex[:10]
    cid, anon = f"erase-{u}", f"anon-{u}"
    email, msisdn = f"erase-{u}@example.com", "+49" + str(uuid.uuid4().int % 10**11).zfill(11)
    device = uuid.uuid4().hex + uuid.uuid4().hex
    needles = [cid, anon, email, msisdn, device]
    await _campaigns(gw, u)

    # -- every flow ------------------------------------------------------------------
    key = {"Idempotency-Key": f"put-{u}"}
    r = await gw.put(
        f"/v1/customers/{cid}",
        headers=key,
        json={
            "attributes": {"first_name": "Ana"},
            "consents": {"push": True, "sms": True, "email": True},
            "identities": {"email": email, "msisdn": msisdn},
        },
    )
    assert r.status_code == 200, r.text
    # Imported too: the import's announcement names its customers (profile.import_batch).
    line = {
        "customer_id": cid,
        "attributes": {"first_name": "Ana", "plan": "prepaid"},
        "consents": {"push": True, "sms": True, "email": True},
        "identities": {"email": email, "msisdn": msisdn},
    }
    r = await gw.post(
        "/v1/customers:import",
        content=orjson.dumps(line) + b"\n",
        headers={"content-type": "application/x-ndjson"},
    )
    assert r.status_code == 200 and r.json()["imported"] == 1, r.text
    r = await gw.post(
        f"/v1/customers/{cid}/devices",
        json={"platform": "ios", "token": device, "app_id": "com.example.app"},
    )
    assert r.status_code in (200, 201), r.text
    async with httpx.AsyncClient(base_url=stack.url("gateway"), headers=auth("events")) as app:
        for _ in range(3):
            r = await app.post("/v1/events", json={"type": "page.viewed", "anonymous_id": anon})
            assert r.status_code == 202, r.text
        r = await app.post(
            "/v1/events",
            json={"type": "app.opened", "customer_id": cid, "anonymous_id": anon},
        )
        assert r.status_code == 202, r.text
        for trigger in (f"roamed.{u}", f"landed.{u}"):  # one sends a push, one an SMS
            r = await app.post(
                "/v1/events",
                json={"type": trigger, "customer_id": cid, "properties": {"country": "FR"}},
            )
            assert r.status_code == 202, r.text
    async with httpx.AsyncClient(base_url=stack.url("gateway"), headers=auth("pos")) as pos:
        r = await pos.post(
            "/v1/decisions",
            headers={"Idempotency-Key": f"decide-{u}"},
            json={"customer_id": cid, "touchpoint": f"app_{u}"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["offers"], r.text

    apns, sms = peers["apns"], peers["sms"]
    await eventually(
        _none,
        lambda _: (
            any(m.token == device for m in apns.received)
            and any(m.get("To") == msisdn for m in sms.received)
        ),
    )
    # Triggers judge a known customer's event without waiting for the profile, so the push
    # and the SMS can go out before the profile has applied the events: wait for both.
    view = await eventually(
        lambda: _history(gw, cid),
        lambda v: len(v.get("contacts", [])) >= 3 and "page.viewed" in v.get("counters", {}),
        timeout=30,
    )  # the contacts recorded, and the anonymous history folded in
    for contact in view["contacts"]:
        r = await gw.post(
            "/v1/responses", json={"tracking_id": contact["tracking_id"], "outcome": "clicked"}
        )
        assert r.status_code == 202, r.text
    await eventually(lambda: _history(gw, cid), lambda v: len(v.get("responses", [])) >= 3)
    marker = f"poison-{u}"
    await _poison(stack, cid, marker)
    await eventually(lambda: _dead_letters(stores, marker), lambda n: n >= 2)

    # Before: the scan sees the customer everywhere it looks (it can fail).
    t_scan = time.monotonic()
    before = await stores.find(needles)
    scan_s = time.monotonic() - t_scan
    kinds = {f.split(":")[0] + ":" + f.split(":")[1] for f in before}
    for where in (
        "stream:EVENTS",
        "stream:PROFILE",
        "stream:CONTACT",
        "stream:DISPATCH",
        "stream:DELIVERY",
        "stream:RESPONSE",
        "stream:DLQ",
        "table:profile.identity",
        "table:profile.device",
        "table:dispatch.message",
        "table:feedback.contacts",
    ):
        assert where in kinds, (where, sorted(kinds))
    assert any(f.startswith("redis:") for f in before), before

    # -- erase -------------------------------------------------------------------------
    started = time.time()
    r = await gw.delete(f"/v1/customers/{cid}", headers={"Idempotency-Key": f"erase-{u}"})
    assert r.status_code == 202, r.text
    assert set(r.json()["erased"]) >= {cid, f"anon:{anon}"}
    # Within 10 s of the DELETE, allowing for one scan's own reading time.
    await eventually(
        lambda: stores.find(needles), lambda f: f == [], timeout=ERASED_WITHIN_S + scan_s
    )
    index = stores.index_file()
    assert index.exists() and index.stat().st_mtime >= started  # saved again since
    assert (await gw.get(f"/v1/customers/{cid}")).status_code == 404


async def _none() -> None:
    return None
