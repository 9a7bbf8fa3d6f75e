"""The dispatch service on real servers: intake once per tracking id, the state machine,
refusals with reasons, poison requests, expiry, the in-app inbox, inbound SMS, the local
outbox, erasure. Requests are published on the bus exactly as decision publishes them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import nats
import pytest

from shared.bus import Bus
from shared.contracts.bus import Address, Device, DispatchRequested
from shared.events import CloudEvent, iso, utcnow
from shared.privacy import customer_subject, customer_token
from shared.stack import Stack
from tests.conftest import auth
from tests.helpers import eventually


def _t() -> str:
    return "trk-" + uuid.uuid4().hex[:16]


def _num() -> str:
    return "+49" + str(uuid.uuid4().int % 10**11).zfill(11)


class Wire:
    """Publishes requests like decision does and records what dispatch publishes."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.bus = Bus(stack.env["KAIROS_NATS_URL"], prefix=stack.env["KAIROS_BUS_PREFIX"])
        self.seen: list[CloudEvent] = []

    async def __aenter__(self) -> Wire:
        await self.bus.connect(ensure_streams=False)
        self.nc = await nats.connect(self.stack.env["KAIROS_NATS_URL"])
        js = self.nc.jetstream()
        prefix = self.stack.env["KAIROS_BUS_PREFIX"]

        async def on(msg: Any) -> None:
            ev = CloudEvent.from_bytes(msg.data)
            # the subject without the customer token, for dead letters too
            ev.type = self.bus.logical(msg.subject).removesuffix("." + customer_token(ev.subject))
            self.seen.append(ev)

        for subject in ("delivery.>", "response.received.*", "dlq.dispatch-requests"):
            await js.subscribe(f"{prefix}.{subject}", cb=on, ordered_consumer=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()
        await self.bus.close()

    async def request(self, req: DispatchRequested, *, msg_id: str | None = None) -> None:
        subject, ev = req.to_event(source="kairos/decision", id_=msg_id or req.event_id_())
        await self.bus.publish(subject, ev)

    def of(self, tracking: str, type_prefix: str) -> list[dict[str, Any]]:
        return [
            e.data
            for e in self.seen
            if e.type.startswith(type_prefix) and e.data.get("tracking_id") == tracking
        ]


@pytest.fixture
async def wire(stack: Stack) -> AsyncIterator[Wire]:
    async with Wire(stack) as w:
        yield w


def _req(channel: str, *, tracking: str | None = None, **kw: Any) -> DispatchRequested:
    t = tracking or _t()
    base: dict[str, Any] = {
        "tracking_id": t,
        "idempotency_key": t,
        "customer_id": kw.pop("customer_id", "c-" + uuid.uuid4().hex[:10]),
        "campaign_id": kw.pop("campaign_id", "cmp-dispatch"),
        "treatment": "A",
        "offer_id": "off-1",
        "channel": channel,
        "content": {"title": "Hello", "body": "A pack for you", "text": "Hi from Kairos"},
        "link": "https://example.com/offer",
        "expires_at": iso(utcnow() + timedelta(hours=1)),
    }
    base.update(kw)
    return DispatchRequested.model_validate(base)


async def _message(gw: httpx.AsyncClient, tracking: str, status: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | int:
        r = await gw.get(f"/v1/messages/{tracking}")
        # The body, not the response: a failure then shows the status and every attempt.
        return r.json() if r.status_code == 200 else r.status_code

    # A liveness bound, not a speed check: the first receipt after the decision suite can wait
    # behind that suite's backlog of deliveries (once over 15 s in CI).
    body = await eventually(
        probe, lambda b: isinstance(b, dict) and b["status"] == status, timeout=45
    )
    assert isinstance(body, dict)
    return body


async def test_sms_goes_out_once_and_reports(gw: httpx.AsyncClient, wire: Wire) -> None:
    """The SMS peer gets it and reports delivery; the same tracking id again — a redelivery
    long after the bus's duplicate window — sends nothing twice."""
    req = _req("sms", address=Address(msisdn=_num()), lane="realtime")
    await wire.request(req)
    first = await _message(gw, req.tracking_id, "delivered")  # the peer's status callback
    await wire.request(req, msg_id=f"again-{uuid.uuid4().hex}")  # not de-duplicated by NATS
    assert first["channel"] == "sms" and first["content"]["text"] == "Hi from Kairos"
    assert [a["provider"] for a in first["attempts"] if a["result"] == "sent"] == ["sms"], first
    assert [a["status"] for a in first["attempts"] if a["result"] == "receipt"] == ["delivered"]
    # a later request on the same channel shows the first was not queued again
    probe = _req("sms", address=Address(msisdn=_num()))
    await wire.request(probe)
    await _message(gw, probe.tracking_id, "delivered")
    again = (await gw.get(f"/v1/messages/{req.tracking_id}")).json()
    assert len(again["attempts"]) == len(first["attempts"])
    await eventually(_noop, lambda _: len(wire.of(req.tracking_id, "delivery.")) >= 2)
    reports = wire.of(req.tracking_id, "delivery.")
    assert sorted(d["status"] for d in reports) == ["delivered", "sent"]
    assert {d["customer_id"] for d in reports} == {req.customer_id}
    assert first["provider"] == "sms" and first["provider_id"].startswith("SM")


async def _noop() -> None:
    return None


async def test_refused_and_expired_requests_never_stop_the_consumer(
    gw: httpx.AsyncClient, wire: Wire
) -> None:
    no_address = _req("email", address=None)
    unknown = _req("fax", address=Address(msisdn=_num()))
    expired = _req(
        "sms", address=Address(msisdn=_num()), expires_at=iso(utcnow() - timedelta(minutes=1))
    )
    good = _req("sms", address=Address(msisdn=_num()))
    for r in (no_address, unknown, expired, good):
        await wire.request(r)
    await wire.bus.publish(
        customer_subject("dispatch.requested.sms", None),
        CloudEvent(source="test", type="dispatch.requested.sms", data={"tracking_id": 42}),
    )
    m = await _message(gw, no_address.tracking_id, "failed")
    assert "no address" in m["reason"]
    m = await _message(gw, unknown.tracking_id, "failed")
    assert "unknown channel" in m["reason"]
    m = await _message(gw, expired.tracking_id, "expired")
    assert m["attempts"] == [] and m["sent_at"] is None
    await eventually(
        lambda: gw.get(f"/v1/messages/{good.tracking_id}"),
        lambda r: r.status_code == 200 and r.json()["status"] in ("sent", "delivered"),
    )
    await eventually(
        lambda: _noop(), lambda _: any(e.type == "dlq.dispatch-requests" for e in wire.seen)
    )
    await eventually(
        _noop,
        lambda _: (
            bool(wire.of(expired.tracking_id, "delivery."))
            and bool(wire.of(unknown.tracking_id, "delivery."))
        ),
    )
    assert [d["status"] for d in wire.of(expired.tracking_id, "delivery.")] == ["expired"]
    assert [d["status"] for d in wire.of(unknown.tracking_id, "delivery.")] == ["failed"]


async def test_inbox_lists_unexpired_and_read_records_opened(
    stack: Stack, gw: httpx.AsyncClient, wire: Wire
) -> None:
    cust = "c-" + uuid.uuid4().hex[:10]
    old = _req("inapp", customer_id=cust, address=Address(customer_id=cust))
    new = _req(
        "inapp",
        customer_id=cust,
        address=Address(customer_id=cust),
        content={"title": "New", "body": "Newest", "deeplink": "app://offer/1"},
    )
    gone = _req(
        "inapp",
        customer_id=cust,
        address=Address(customer_id=cust),
        expires_at=iso(utcnow() + timedelta(seconds=2)),
    )
    for r in (old, gone, new):
        await wire.request(r)
    async with httpx.AsyncClient(base_url=stack.url("gateway"), headers=auth()) as app:
        box = await eventually(
            lambda: app.get(f"/v1/customers/{cust}/inbox"),
            lambda r: r.status_code == 200 and len(r.json()["messages"]) == 3,
        )
        first = box.json()["messages"][0]
        assert first["tracking_id"] == new.tracking_id and first["title"] == "New"
        assert first["deeplink"] == "app://offer/1" and first["read"] is False
        await eventually(
            lambda: app.get(f"/v1/customers/{cust}/inbox"),
            lambda r: len(r.json()["messages"]) == 2,
            timeout=10,
        )
        r = await app.post(f"/v1/customers/{cust}/inbox/{new.tracking_id}/read")
        assert r.status_code == 200 and r.json()["first_read"] is True, r.text
        r = await app.post(f"/v1/customers/{cust}/inbox/{new.tracking_id}/read")
        assert r.json()["first_read"] is False
        assert (
            await app.post(f"/v1/customers/other/inbox/{new.tracking_id}/read")
        ).status_code == 404
        box = await app.get(f"/v1/customers/{cust}/inbox")
        assert box.json()["messages"][0]["read"] is True
    await eventually(lambda: _noop(), lambda _: bool(wire.of(new.tracking_id, "response.")))
    opened = wire.of(new.tracking_id, "response.")
    assert [(o["outcome"], o["channel"]) for o in opened] == [("opened", "inapp")]
    m = (await gw.get(f"/v1/messages/{new.tracking_id}")).json()
    assert m["status"] == "delivered" and m["provider"] == "inbox"


async def test_inbound_sms_reply_matches_the_latest_message(
    gw: httpx.AsyncClient, wire: Wire
) -> None:
    number = _num()
    older = _req("sms", address=Address(msisdn=number))
    await wire.request(older)
    await _message(gw, older.tracking_id, "delivered")
    newer = _req("sms", address=Address(msisdn=number), campaign_id="cmp-survey")
    await wire.request(newer)
    await _message(gw, newer.tracking_id, "delivered")
    r = await gw.post(
        "/v1/channels/sms/inbound", json={"from": number, "to": "77000", "text": " 2 please"}
    )
    assert r.status_code == 202, r.text
    assert r.json() == {
        "matched": True,
        "tracking_id": newer.tracking_id,
        "outcome": "replied",
        "choice": "2",
    }
    r = await gw.post(
        "/v1/channels/sms/inbound", json={"from": number, "to": "77000", "text": "STOP"}
    )
    assert r.json()["outcome"] == "unsubscribed"
    r = await gw.post(
        "/v1/channels/sms/inbound", json={"from": _num(), "to": "77000", "text": "hello"}
    )
    assert r.status_code == 202 and r.json()["matched"] is False
    await eventually(lambda: _noop(), lambda _: len(wire.of(newer.tracking_id, "response.")) == 2)
    got = wire.of(newer.tracking_id, "response.")
    assert {(g["outcome"], g.get("choice")) for g in got} == {
        ("replied", "2"),
        ("unsubscribed", None),
    }
    assert all(g["customer_id"] == newer.customer_id and g["channel"] == "sms" for g in got)
    bad = await gw.post("/v1/channels/sms/inbound", json={"from": "not a number", "text": "x"})
    assert bad.status_code == 422
    assert bad.headers["content-type"].startswith("application/problem+json")


async def test_local_outbox_lists_what_would_have_been_sent(
    gw: httpx.AsyncClient, wire: Wire
) -> None:
    """The suite configures no FCM: Android pushes go to the local outbox, in order."""
    start = 0
    while True:
        page = (await gw.get("/v1/outbox", params={"after": start, "limit": 1000})).json()
        if page["next_after"] == start:
            break
        start = page["next_after"]
    android = [Device(platform="android", token=f"fcm-{uuid.uuid4().hex}")]
    reqs = [_req("push", address=Address(devices=android)) for _ in range(3)]
    for r in reqs:
        await wire.request(r)
    wanted = {q.tracking_id for q in reqs}
    page = await eventually(
        lambda: gw.get("/v1/outbox", params={"after": start, "channel": "push"}),
        lambda r: {i["tracking_id"] for i in r.json()["items"]} >= wanted,
    )
    items = [i for i in page.json()["items"] if i["tracking_id"] in wanted]
    assert [i["to"] for i in items] == ["1 device(s)"] * 3
    assert all(i["content"]["title"] == "Hello" for i in items)
    assert all(i["channel"] == "push" for i in page.json()["items"])
    m = await _message(gw, reqs[0].tracking_id, "delivered")
    assert m["provider"] == "local"
    after = page.json()["next_after"]
    again = (await gw.get("/v1/outbox", params={"after": after, "channel": "push"})).json()
    assert not wanted & {i["tracking_id"] for i in again["items"]}


async def test_message_routes_need_their_scopes(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url("gateway")) as c:
        assert (await c.get("/v1/messages/abc")).status_code == 401
        r = await c.get("/v1/messages/abc", headers=auth("pos"))
        assert r.status_code == 403
        r = await c.get("/v1/customers/c-1/inbox", headers=auth("nothing"))
        assert r.status_code == 403
        r = await c.post(
            "/v1/channels/sms/inbound",
            headers=auth("events"),
            json={"from": "+4917", "to": "1", "text": "x"},
        )
        assert r.status_code == 403
        r = await c.get("/v1/messages/no-such-message", headers=auth())
        assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem")
        r = await c.post("/callbacks/sms/forged.token", data={"MessageStatus": "delivered"})
        assert r.status_code == 404


async def test_erasure_removes_address_and_content(
    stack: Stack, gw: httpx.AsyncClient, wire: Wire
) -> None:
    cust = "c-" + uuid.uuid4().hex[:10]
    number = _num()
    r = await gw.put(
        f"/v1/customers/{cust}",
        json={"identities": {"msisdn": number}, "consents": {"sms": True}},
    )
    assert r.status_code in (200, 201, 202), r.text
    req = _req("sms", customer_id=cust, address=Address(msisdn=number))
    await wire.request(req)
    await _message(gw, req.tracking_id, "delivered")
    assert (await gw.delete(f"/v1/customers/{cust}")).status_code == 202
    m = await eventually(
        lambda: gw.get(f"/v1/messages/{req.tracking_id}"),
        lambda r: r.json()["customer_id"] != cust,
        timeout=10,
    )
    body = m.json()
    assert body["customer_id"].startswith("erased:") and body["content"] == {}
    assert number not in m.text and cust not in m.text
    assert body["status"] == "delivered"  # counts stay


def test_push_devices_need_tokens() -> None:
    """The contract: a web device's token is its subscription; platforms are closed."""
    d = Device(platform="web", token='{"endpoint": "https://push.example/x"}')
    assert d.platform == "web"
    with pytest.raises(ValueError, match="platform"):
        Device.model_validate({"platform": "blackberry", "token": "x"})
