"""Triggered campaigns end to end on real servers: events through the gateway, the profile
applying them, the decision consumer matching campaigns, the channel choice, the ledger,
durable timers (delay and ``unless``, across a restart), quiet hours, survey follow-ups,
and ``dispatch.requested.<channel>`` as dispatch will read it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nats
import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from shared.bus import Bus
from shared.contracts.bus import DispatchRequested, ResponseRecorded, TimerFailed
from shared.events import CloudEvent
from shared.stack import Stack
from tests.conftest import auth
from tests.helpers import eventually


async def _async(value: Any) -> Any:
    return value


def _u() -> str:
    return uuid.uuid4().hex[:8]


def _num() -> str:
    return "+49" + str(uuid.uuid4().int % 10**11).zfill(11)


class Listener:
    """Every ``dispatch.requested`` and ``contact.recorded`` of the run's namespace."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.dispatch: list[CloudEvent] = []
        self.contacts: list[CloudEvent] = []

    async def __aenter__(self) -> Listener:
        prefix = self.stack.env["KAIROS_BUS_PREFIX"]
        self.nc = await nats.connect(self.stack.env["KAIROS_NATS_URL"])
        js = self.nc.jetstream()

        async def on_dispatch(msg: Any) -> None:
            self.dispatch.append(CloudEvent.from_bytes(msg.data))

        async def on_contact(msg: Any) -> None:
            self.contacts.append(CloudEvent.from_bytes(msg.data))

        await js.subscribe(f"{prefix}.dispatch.requested.>", cb=on_dispatch, ordered_consumer=True)
        await js.subscribe(f"{prefix}.contact.recorded.*", cb=on_contact, ordered_consumer=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    def sent(self, campaign: str) -> list[dict[str, Any]]:
        return [e.data for e in self.dispatch if e.data.get("campaign_id") == campaign]

    def recorded(self, campaign: str) -> list[dict[str, Any]]:
        return [e.data for e in self.contacts if e.data.get("campaign_id") == campaign]

    async def wait(self, campaign: str, n: int, timeout: float = 20) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 1):
            if len(self.sent(campaign)) >= n or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        return self.sent(campaign)


@pytest.fixture
async def listen(stack: Stack) -> AsyncIterator[Listener]:
    async with Listener(stack) as lst:
        yield lst


@pytest.fixture
async def app(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url("gateway"), headers=auth("events")) as c:
        yield c


@pytest.fixture
async def policy(gw: httpx.AsyncClient) -> AsyncIterator[Any]:
    """Set the contact policy for one test; back to none afterwards."""

    async def put(body: dict[str, Any]) -> None:
        r = await gw.put("/v1/contact-policy", json=body)
        assert r.status_code == 200, r.text
        await asyncio.sleep(0.6)  # every replica reloads its catalog

    yield put
    await gw.put("/v1/contact-policy", json={"rules": []})
    await asyncio.sleep(0.3)


async def _offer(gw: httpx.AsyncClient, oid: str) -> None:
    body = {
        "name": "Roaming",
        "link": "https://example.com/roam",
        "reward": {"type": "bonus_points", "amount": 100},
        "content": {
            "default": {"title": "Hi {{ attributes.first_name }}", "body": "Go"},
            "sms": {
                "text": "Welcome to {{ event.properties.country }}, {{ attributes.first_name }}"
            },
            "push": {"title": "In {{ event.properties.country }}?", "body": "Data pack inside"},
        },
    }
    r = await gw.put(f"/v1/offers/{oid}", json=body)
    assert r.status_code == 200, r.text


async def _campaign(gw: httpx.AsyncClient, cid: str, offer: str, **kw: Any) -> None:
    body = {
        "name": cid,
        "type": "triggered",
        "channels": ["push", "sms"],
        "treatments": [{"id": "A", "offer": offer, "weight": 1}],
        "approval_required": False,
        **kw,
    }
    r = await gw.put(f"/v1/campaigns/{cid}", json=body)
    assert r.status_code == 200, r.text
    r = await gw.post(f"/v1/campaigns/{cid}/activate")
    assert r.status_code == 200, r.text
    await asyncio.sleep(0.6)  # the catalog reloads on every replica


async def _customer(
    gw: httpx.AsyncClient,
    cid: str,
    *,
    consents: dict[str, bool],
    msisdn: str | None = None,
    email: str | None = None,
    device: bool = False,
    tags: list[str] | None = None,
    timezone: str | None = None,
) -> None:
    ids = {k: v for k, v in (("msisdn", msisdn), ("email", email)) if v}
    body: dict[str, Any] = {
        "attributes": {"first_name": "Ana"},
        "tags": tags or [],
        "consents": consents,
        "identities": ids,
    }
    if timezone:
        body["timezone"] = timezone
    r = await gw.put(f"/v1/customers/{cid}", json=body)
    assert r.status_code == 200, r.text
    if device:
        r = await gw.post(
            f"/v1/customers/{cid}/devices",
            json={"platform": "ios", "token": f"tok-{cid}-0123456789", "app_id": "app"},
        )
        assert r.status_code in (200, 201, 202), r.text


async def _event(app: httpx.AsyncClient, cid: str, etype: str, **props: Any) -> None:
    r = await app.post("/v1/events", json={"type": etype, "customer_id": cid, "properties": props})
    assert r.status_code == 202, r.text


async def _settle(
    app: httpx.AsyncClient, gw: httpx.AsyncClient, cid: str, etype: str, n: int
) -> None:
    """Wait until the profile has counted n events of a type for the customer."""
    for _ in range(200):
        r = await gw.get(f"/v1/customers/{cid}")
        c = (r.json().get("counters") or {}).get(etype) or {}
        if int(c.get("total", 0)) >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{etype} of {cid} never reached {n}")


async def test_roaming_event_one_capped_consenting_dispatch_on_the_best_channel(
    gw: httpx.AsyncClient, app: httpx.AsyncClient, listen: Listener
) -> None:
    u = _u()
    await _offer(gw, f"off-{u}")
    cmp = f"roam-{u}"
    await _campaign(
        gw,
        cmp,
        f"off-{u}",
        trigger={
            "event": f"roaming.started.{u}",
            "where": {"prop": "country", "op": "ne", "value": "DE"},
        },
        reentry={"max": 1, "per": "30d"},
    )
    sms_only, push_ok, nobody, no_way = (f"{n}-{u}" for n in ("sms", "push", "none", "noway"))
    number = _num()
    await _customer(gw, sms_only, consents={"push": False, "sms": True}, msisdn=number)
    await _customer(gw, push_ok, consents={"push": True, "sms": True}, device=True, msisdn=_num())
    await _customer(gw, nobody, consents={})
    await _customer(gw, no_way, consents={"push": True, "sms": True})  # no token, no number
    await _event(app, sms_only, f"roaming.started.{u}", country="DE")  # where: not abroad
    await _event(app, sms_only, f"roaming.started.{u}", country="FR")
    await _event(app, push_ok, f"roaming.started.{u}", country="ES")
    await _event(app, nobody, f"roaming.started.{u}", country="FR")
    await _event(app, no_way, f"roaming.started.{u}", country="FR")
    sent = await listen.wait(cmp, 2)
    await asyncio.sleep(1.0)
    await _event(app, sms_only, f"roaming.started.{u}", country="IT")  # re-entry: 1 per 30d
    await asyncio.sleep(1.5)
    sent = listen.sent(cmp)
    assert len(sent) == 2, sent
    by = {d["customer_id"]: d for d in sent}
    sms = by[sms_only]
    assert sms["channel"] == "sms" and sms["address"] == {"msisdn": number}
    assert sms["content"] == {"text": "Welcome to FR, Ana"}
    assert (
        sms["idempotency_key"] == sms["tracking_id"] and sms["link"] == "https://example.com/roam"
    )
    assert sms["reward"] == {"type": "bonus_points", "amount": 100.0}
    assert sms["offer_id"] == f"off-{u}" and sms["treatment"] == "A" and sms["event_id"]
    push = by[push_ok]
    assert push["channel"] == "push" and push["content"]["title"] == "In ES?"
    assert push["address"]["devices"][0]["token"] == f"tok-{push_ok}-0123456789"
    rec = {d["customer_id"]: d for d in listen.recorded(cmp)}
    assert rec[sms_only]["tracking_id"] == sms["tracking_id"] and rec[sms_only]["channel"] == "sms"
    assert nobody not in rec and no_way not in rec

    # Simulating a triggered campaign replays the last day of its events, sending nothing
    r = await gw.post(f"/v1/campaigns/{cmp}/simulate")
    assert r.status_code == 200, r.text
    sim = r.json()
    assert sim["kind"] == "triggers" and sim["events"] == 6
    assert sim["ineligible"] == {"where": 1}  # the DE one
    assert sim["suppressed"]["consent"] == 1 and sim["suppressed"]["unreachable"] == 1
    assert sim["suppressed"]["reentry"] == 3  # the two already reached, and the IT one
    assert sim["dispatched"] == 0 and listen.sent(cmp) == sent


async def test_counters_include_the_firing_event_and_campaigns_compete(
    gw: httpx.AsyncClient, app: httpx.AsyncClient, listen: Listener
) -> None:
    u = _u()
    await _offer(gw, f"off-{u}")
    etype = f"topup.{u}"
    third = f"third-{u}"
    await _campaign(
        gw,
        third,
        f"off-{u}",
        priority=90,
        trigger={"event": etype, "exclusive": False},  # sent whatever else fires
        audience={"event": etype, "count": {"gte": 3}, "within": "30d"},
    )
    # two campaigns on every top-up: only one message per event (the better priority)
    low, high = f"low-{u}", f"high-{u}"
    await _campaign(gw, low, f"off-{u}", priority=1, trigger={"event": etype}, channels=["sms"])
    await _campaign(gw, high, f"off-{u}", priority=60, trigger={"event": etype}, channels=["sms"])
    c = f"c-{u}"
    await _customer(gw, c, consents={"sms": True}, msisdn=_num())
    for _ in range(3):
        await _event(app, c, etype, amount=10)
        await asyncio.sleep(0.3)
    await listen.wait(third, 1)
    await asyncio.sleep(1.0)
    assert len(listen.sent(third)) == 1  # the third top-up, counted before the rule ran
    per_event: dict[str, list[str]] = {}
    for cmp in (low, high):
        for d in listen.sent(cmp):
            per_event.setdefault(d["event_id"], []).append(cmp)
    assert len(per_event) == 3 and all(len(v) == 1 for v in per_event.values()), per_event


async def test_triggers_count_events_the_profile_has_not_applied_yet(
    gw: httpx.AsyncClient, app: httpx.AsyncClient, listen: Listener, stack: Stack
) -> None:
    """A known customer's event is evaluated on "projection + this event" without waiting
    for the profile: with the profile stopped, a burst in one request and a later event are
    each counted once (the third top-up fires, the second does not), and once the profile is
    back and has applied them, the next one is counted on top of the projection."""
    u = _u()
    await _offer(gw, f"off-{u}")
    etype = f"topup.{u}"
    cmp = f"third-{u}"
    await _campaign(
        gw,
        cmp,
        f"off-{u}",
        channels=["sms"],
        trigger={"event": etype, "exclusive": False},
        audience={"event": etype, "count": {"gte": 3}, "within": "30d"},
    )
    c = f"c-{u}"
    await _customer(gw, c, consents={"sms": True}, msisdn=_num())
    stack.stop("profile")
    try:
        burst = [{"type": etype, "customer_id": c, "properties": {"n": n}} for n in (1, 2)]
        r = await app.post("/v1/events", json={"events": burst})
        assert r.status_code == 202, r.text
        await asyncio.sleep(1.0)  # a double count would fire on the second top-up
        assert listen.sent(cmp) == []
        r = await app.post("/v1/events", json={"type": etype, "customer_id": c})
        assert r.status_code == 202, r.text
        third = r.json()["ids"][0]
        sent = await listen.wait(cmp, 1)
        assert [d["event_id"] for d in sent] == [third]  # counted the two before it
    finally:
        stack.start("profile")
        stack.wait_ready(["profile"])
    await _settle(app, gw, c, etype, 3)  # applied once each
    r = await app.post("/v1/events", json={"type": etype, "customer_id": c})
    fourth = r.json()["ids"][0]
    sent = await listen.wait(cmp, 2)
    assert [d["event_id"] for d in sent] == [third, fourth]
    # An identifying event folds anonymous history the trigger cannot see: it waits for the
    # profile, and then counts the two anonymous top-ups before it (judged on its own it
    # would count one and never fire).
    c2, anon = f"c2-{u}", f"anon-{u}"
    await _customer(gw, c2, consents={"sms": True}, msisdn=_num())
    stack.stop("profile")
    try:
        burst = [{"type": etype, "anonymous_id": anon} for _ in range(2)]
        burst.append({"type": etype, "customer_id": c2, "anonymous_id": anon})
        r = await app.post("/v1/events", json={"events": burst})
        assert r.status_code == 202, r.text
        identifying = r.json()["ids"][2]
        await asyncio.sleep(1.0)
        assert [d["customer_id"] for d in listen.sent(cmp)] == [c, c]
    finally:
        stack.start("profile")
        stack.wait_ready(["profile"])
    await eventually(
        lambda: _async([d["event_id"] for d in listen.sent(cmp) if d["customer_id"] == c2]),
        lambda ids: identifying in ids,
        timeout=40,
    )


async def test_unless_fires_only_without_the_follow_up_and_survives_a_restart(
    gw: httpx.AsyncClient, app: httpx.AsyncClient, listen: Listener, stack: Stack
) -> None:
    u = _u()
    await _offer(gw, f"off-{u}")
    cmp = f"cart-{u}"
    await _campaign(
        gw,
        cmp,
        f"off-{u}",
        channels=["sms"],
        trigger={
            "event": f"cart.updated.{u}",
            "unless": {"event": f"order.placed.{u}", "within": "4s"},
        },
    )
    bought, left, restart, both = f"bought-{u}", f"left-{u}", f"restart-{u}", f"both-{u}"
    for c in (bought, left, restart, both):
        await _customer(gw, c, consents={"sms": True}, msisdn=_num())
    # cart and order in one request: handled in one batch, the order still answers the cart
    r = await app.post(
        "/v1/events",
        json={
            "events": [
                {"type": f"cart.updated.{u}", "customer_id": both, "properties": {"total": 9}},
                {"type": f"order.placed.{u}", "customer_id": both, "properties": {"total": 9}},
            ]
        },
    )
    assert r.status_code == 202, r.text
    await _event(app, bought, f"cart.updated.{u}", total=30)
    await _event(app, left, f"cart.updated.{u}", total=40)
    await _settle(app, gw, left, f"cart.updated.{u}", 1)
    await asyncio.sleep(0.5)
    await _event(app, bought, f"order.placed.{u}", total=30)
    await _event(app, restart, f"cart.updated.{u}", total=50)
    await _settle(app, gw, restart, f"cart.updated.{u}", 1)
    await asyncio.sleep(0.5)
    stack.stop("decision", kill=True)  # every pending timer lives in Postgres
    await asyncio.sleep(1.0)
    stack.start("decision")
    stack.wait_ready(["decision"])
    sent = await listen.wait(cmp, 2, timeout=30)
    await asyncio.sleep(2.0)
    sent = listen.sent(cmp)
    assert sorted(d["customer_id"] for d in sent) == sorted([left, restart]), sent
    for d in sent:
        due = datetime.fromisoformat(d["due"])
        assert datetime.fromisoformat(d["requested_at"]) >= due


async def test_delay_and_quiet_hours_hold_outbound_messages(
    gw: httpx.AsyncClient, app: httpx.AsyncClient, listen: Listener, stack: Stack, policy: Any
) -> None:
    u = _u()
    await _offer(gw, f"off-{u}")
    late, inapp = f"late-{u}", f"inapp-{u}"
    # quiet hours that contain "now" in the customer's zone (Asia/Tokyo)
    now = datetime.now(UTC).astimezone(__import__("zoneinfo").ZoneInfo("Asia/Tokyo"))
    start = (now - timedelta(hours=1)).strftime("%H:%M")
    end = (now + timedelta(hours=2)).strftime("%H:%M")
    await policy({"rules": [], "quiet_hours": {"start": start, "end": end}})
    await _campaign(
        gw, late, f"off-{u}", channels=["sms"], trigger={"event": f"app.opened.{u}", "delay": "1s"}
    )
    await _campaign(gw, inapp, f"off-{u}", channels=["inapp"], trigger={"event": f"app.opened.{u}"})
    c = f"c-{u}"
    await _customer(
        gw,
        c,
        consents={"sms": True, "inapp": True},
        msisdn=_num(),
        device=True,
        timezone="Asia/Tokyo",
    )
    t0 = time.monotonic()
    await _event(app, c, f"app.opened.{u}")
    assert len(await listen.wait(inapp, 1)) == 1  # in-app is never held
    await asyncio.sleep(2.5)
    assert listen.sent(late) == []  # the delay passed, but it is night in Tokyo
    engine = create_async_engine(stack.env["KAIROS_DATABASE_URL"])
    try:
        async with engine.begin() as conn:
            rows = (
                await conn.execute(
                    sa.text(
                        "SELECT kind, due FROM decision.timer WHERE customer_id = :c "
                        "AND campaign_id = :k"
                    ),
                    {"c": c, "k": late},
                )
            ).all()
            assert [r[0] for r in rows] == ["send"]
            wall = rows[0][1].astimezone(now.tzinfo)
            assert wall.strftime("%H:%M") == end and rows[0][1] > datetime.now(UTC)
            # the night ends: the held message goes out as it was prepared
            await conn.execute(
                sa.text("UPDATE decision.timer SET due = now() WHERE customer_id = :c"), {"c": c}
            )
    finally:
        await engine.dispose()
    (sent,) = await listen.wait(late, 1)
    assert sent["channel"] == "sms" and time.monotonic() - t0 > 2.5


async def test_defer_on_cap_keeps_a_timer_and_drop_does_not(
    gw: httpx.AsyncClient, app: httpx.AsyncClient, listen: Listener, stack: Stack, policy: Any
) -> None:
    u = _u()
    await _offer(gw, f"off-{u}")
    cmp = f"cap-{u}"
    await policy({"rules": [{"channel": "sms", "max": 1, "per": "1h", "on_cap": "defer"}]})
    await _campaign(gw, cmp, f"off-{u}", channels=["sms"], trigger={"event": f"bill.{u}"})
    c = f"c-{u}"
    await _customer(gw, c, consents={"sms": True}, msisdn=_num())
    await _event(app, c, f"bill.{u}")
    await listen.wait(cmp, 1)
    await _event(app, c, f"bill.{u}")
    await _settle(app, gw, c, f"bill.{u}", 2)
    engine = create_async_engine(stack.env["KAIROS_DATABASE_URL"])
    try:
        for _ in range(100):
            async with engine.begin() as conn:
                rows = (
                    await conn.execute(
                        sa.text("SELECT kind, due FROM decision.timer WHERE customer_id = :c"),
                        {"c": c},
                    )
                ).all()
            if rows:
                break
            await asyncio.sleep(0.05)
    finally:
        await engine.dispose()
    assert [r[0] for r in rows] == ["retry"]
    wait = (rows[0][1] - datetime.now(UTC)).total_seconds()
    assert 3500 < wait <= 3600  # when the first SMS leaves the one-hour window
    assert len(listen.sent(cmp)) == 1


async def test_survey_reply_fires_the_next_step(
    gw: httpx.AsyncClient, listen: Listener, stack: Stack
) -> None:
    u = _u()
    await _offer(gw, f"off-{u}")
    cmp = f"survey-{u}"
    await _campaign(
        gw,
        cmp,
        f"off-{u}",
        channels=["sms"],
        trigger={
            "event": "response.recorded",
            "where": {
                "all": [
                    {"prop": "outcome", "op": "eq", "value": "replied"},
                    {"prop": "choice", "op": "eq", "value": "2"},
                    {"prop": "campaign_id", "op": "eq", "value": f"ask-{u}"},
                ]
            },
        },
    )
    yes, no = f"yes-{u}", f"no-{u}"
    for c in (yes, no):
        await _customer(gw, c, consents={"sms": True}, msisdn=_num())
    bus = Bus(stack.env["KAIROS_NATS_URL"], prefix=stack.env["KAIROS_BUS_PREFIX"])
    await bus.connect(ensure_streams=False)
    try:
        for c, choice in ((yes, "2"), (no, "1")):
            reply = ResponseRecorded(
                tracking_id=f"t-{c}",
                customer_id=c,
                campaign_id=f"ask-{u}",
                outcome="replied",
                choice=choice,
                channel="sms",
                time=datetime.now(UTC).isoformat(),
            )
            await bus.publish(*reply.to_event(source="test"))
    finally:
        await bus.close()
    sent = await listen.wait(cmp, 1)
    await asyncio.sleep(1.0)
    assert [d["customer_id"] for d in listen.sent(cmp)] == [yes], sent


async def test_a_poison_event_does_not_stop_triggers(
    gw: httpx.AsyncClient, app: httpx.AsyncClient, listen: Listener, stack: Stack
) -> None:
    u = _u()
    await _offer(gw, f"off-{u}")
    cmp = f"poison-{u}"
    await _campaign(gw, cmp, f"off-{u}", channels=["sms"], trigger={"event": f"ping.{u}"})
    c = f"c-{u}"
    await _customer(gw, c, consents={"sms": True}, msisdn=_num())
    nc = await nats.connect(stack.env["KAIROS_NATS_URL"])
    try:
        await nc.jetstream().publish(
            f"{stack.env['KAIROS_BUS_PREFIX']}.events.ping.{u}", b"{not json"
        )
    finally:
        await nc.close()
    await _event(app, c, f"ping.{u}")
    assert len(await listen.wait(cmp, 1)) == 1


async def test_a_template_failing_for_one_customer_skips_only_them(
    gw: httpx.AsyncClient, app: httpx.AsyncClient, listen: Listener
) -> None:
    u = _u()
    r = await gw.put(
        f"/v1/offers/off-{u}",
        json={"name": "x", "content": {"default": {"text": "{{ 100 // attributes.share }} each"}}},
    )
    assert r.status_code == 200, r.text
    cmp = f"tpl-{u}"
    await _campaign(gw, cmp, f"off-{u}", channels=["sms"], trigger={"event": f"split.{u}"})
    ok, bad = f"ok-{u}", f"bad-{u}"
    for c, share in ((ok, 4), (bad, 0)):
        await _customer(gw, c, consents={"sms": True}, msisdn=_num())
        r = await gw.patch(f"/v1/customers/{c}", json={"attributes": {"share": share}})
        assert r.status_code == 200, r.text
    await _event(app, bad, f"split.{u}")
    await _event(app, ok, f"split.{u}")
    (sent,) = await listen.wait(cmp, 1)
    await asyncio.sleep(1.0)
    assert [d["customer_id"] for d in listen.sent(cmp)] == [ok]
    assert sent["content"] == {"text": "25 each"}


async def test_a_poisoned_timer_is_dead_lettered_and_its_neighbours_still_fire(
    gw: httpx.AsyncClient, listen: Listener, stack: Stack
) -> None:
    u = _u()
    await _offer(gw, f"off-{u}")
    cmp = f"timers-{u}"
    await _campaign(gw, cmp, f"off-{u}", channels=["sms"], trigger={"event": f"never.{u}"})
    request = DispatchRequested(
        tracking_id=f"t-{u}",
        idempotency_key=f"t-{u}",
        customer_id=f"c-{u}",
        campaign_id=cmp,
        channel="sms",
    )
    subject, good = request.to_event(source="test", id_=request.event_id_())
    prefix = stack.env["KAIROS_BUS_PREFIX"]
    nc = await nats.connect(stack.env["KAIROS_NATS_URL"])
    dead = await nc.jetstream().subscribe(f"{prefix}.{TimerFailed.TYPE}", ordered_consumer=True)
    engine = create_async_engine(stack.env["KAIROS_DATABASE_URL"])
    try:
        async with engine.begin() as conn:
            for tid, payload, attempts in (
                (f"bad-{u}", '{"records": [["dispatch.requested.sms", 42]]}', 5),
                (
                    f"good-{u}",
                    orjson.dumps({"records": [[subject, good.model_dump()]]}).decode(),
                    0,
                ),
            ):
                await conn.execute(
                    sa.text(
                        "INSERT INTO decision.timer (timer_id, kind, due, customer_id, "
                        "campaign_id, payload, created_at, attempts) VALUES (:t, 'send', now(), "
                        ":c, :k, CAST(:p AS jsonb), now(), :a)"
                    ),
                    {"t": tid, "c": f"c-{u}", "k": cmp, "p": payload, "a": attempts},
                )
        (sent,) = await listen.wait(cmp, 1)
        assert sent["tracking_id"] == f"t-{u}"
        msg = await dead.next_msg(timeout=10)
        assert CloudEvent.from_bytes(msg.data).data["timer_id"] == f"bad-{u}"
        for _ in range(100):
            async with engine.begin() as conn:
                left = (
                    await conn.execute(
                        sa.text("SELECT count(*) FROM decision.timer WHERE customer_id = :c"),
                        {"c": f"c-{u}"},
                    )
                ).scalar()
            if left == 0:
                break
            await asyncio.sleep(0.05)
        assert left == 0
    finally:
        await engine.dispose()
        await nc.close()
