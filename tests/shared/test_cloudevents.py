"""Every bus message is a CloudEvents 1.0 structured-mode event the ``cloudevents`` SDK reads,
built and parsed through the typed contracts; a payload that does not parse is dead-lettered
by each of its consumers, which go on with the next."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import nats
import orjson
import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as SdkEvent
from cloudevents.v1.http import from_http as legacy_from_http
from nats.js.api import DeliverPolicy
from pydantic import ValidationError

from services.decision import arbitration, messages
from services.decision.outbound import tracking_id
from services.decision.pipeline.model import Campaign, Offer, Treatment
from shared.contracts.bus import (
    Address,
    BusMessage,
    ContactRecorded,
    Conversion,
    DeliveryReported,
    Device,
    DispatchRequested,
    ProfileErased,
    ResponseReceived,
    ResponseRecorded,
    Reward,
)
from shared.events import CloudEvent
from shared.privacy import customer_subject
from shared.stack import Stack
from tests.conftest import auth
from tests.helpers import eventually

STRUCTURED = {"Content-Type": "application/cloudevents+json"}
NOW = "2026-11-25T10:00:00Z"

MESSAGES: list[BusMessage] = [
    ContactRecorded(
        tracking_id="t-1",
        customer_id="c-1",
        campaign_id="k-1",
        treatment="A",
        offer_id="o-1",
        channel="sms",
        control=True,
        control_kind="global",
        status="control",
        conversion=Conversion(event="pack.bought", within="3d"),
        reward=Reward(type="points", amount=100),
        value=2.5,
        run_id="r-1",
    ),
    ContactRecorded(tracking_id="t-2", customer_id="c-2", campaign_id="k-1"),
    DispatchRequested(
        tracking_id="t-1",
        idempotency_key="t-1",
        customer_id="c-1",
        campaign_id="k-1",
        channel="push",
        address=Address(devices=[Device(platform="ios", token="ab" * 32, app_id="app")]),
        content={"title": "Hi", "body": "there"},
        reward=Reward(type="points", amount=100),
        lane="batch",
        expires_at=NOW,
        run_id="r-1",
    ),
    DeliveryReported(
        tracking_id="t-1",
        customer_id="c-1",
        channel="push",
        status="token_invalid",
        token_invalid=True,
        platform="ios",
        token="ab" * 32,
        token_invalid_since=NOW,
    ),
    ResponseReceived(tracking_id="t-1", outcome="clicked", link="https://x.io", source="link"),
    ResponseRecorded(
        tracking_id="t-1",
        customer_id="c-1",
        campaign_id="k-1",
        outcome="replied",
        time=NOW,
        text="2 please",
        choice="2",
    ),
    ProfileErased(customer_id="c-1", ids=["c-1", "anon:1"]),
]


def _sdk(raw: bytes, headers: dict[str, str] | None = None) -> Any:
    """The SDK's reading of a structured-mode message (NATS headers act as HTTP's)."""
    return from_http(HTTPMessage(headers=headers or STRUCTURED, body=raw), JSONFormat(), SdkEvent)


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: f"{type(m).__name__}")
def test_every_bus_message_is_a_structured_cloudevent(msg: BusMessage) -> None:
    subject, ev = msg.to_event(source="kairos/test", id_="ev-1")
    raw = ev.to_bytes()
    sdk = _sdk(raw)
    assert sdk.get_specversion() == "1.0"
    assert sdk.get_id() == "ev-1"
    assert sdk.get_source() == "kairos/test"
    # The type is the subject without the customer token (and a batch request's lane).
    kind = msg.subject_name()
    assert subject == (customer_subject(kind, msg.customer()) if msg.PERSONAL else kind)
    assert sdk.get_type() == kind.removesuffix(".batch")
    assert sdk.get_time() == datetime.fromisoformat(ev.time.replace("Z", "+00:00"))
    assert sdk.get_subject() == msg.customer()  # the customer, or no attribute at all
    assert sdk.get_datacontenttype() == "application/json"
    assert sdk.get_data() == msg.model_dump(mode="json", exclude_none=True)
    # The 1.x API (cloudevents.v1) reads the same bytes, and the class reads the SDK's data.
    legacy = legacy_from_http(STRUCTURED, raw)
    assert legacy["id"] == "ev-1" and legacy.data == sdk.get_data()
    assert type(msg).model_validate(sdk.get_data()) == msg
    assert type(msg).parse(CloudEvent.from_bytes(raw)) == msg


def test_null_attributes_are_omitted() -> None:
    msg = ResponseReceived(tracking_id="t-1", outcome="opened")
    _, ev = msg.to_event(source="kairos/test")
    raw = ev.to_bytes()
    assert b'"subject"' not in raw and b"null" not in raw
    assert _sdk(raw).get_subject() is None
    assert CloudEvent.from_bytes(raw).subject is None
    env = CloudEvent.envelope(source="kairos/test", type="x", subject=None, data={})
    assert "subject" not in env
    # With a null subject the SDK refuses the envelope: what omitting it is for.
    with pytest.raises(Exception, match="subject"):
        _sdk(orjson.dumps({**ev.model_dump(), "subject": None}))


def test_provider_timestamps_are_kept_as_rfc3339() -> None:
    base = {"tracking_id": "t", "customer_id": "c", "channel": "push", "status": "token_invalid"}
    ms = DeliveryReported.model_validate({**base, "token_invalid_since": 1_700_000_000_000})
    s = DeliveryReported.model_validate({**base, "token_invalid_since": 1_700_000_000})
    assert ms.token_invalid_since == s.token_invalid_since == "2023-11-14T22:13:20Z"
    for bad in ("yesterday", True, 10**30):
        with pytest.raises(ValidationError):
            DeliveryReported.model_validate({**base, "token_invalid_since": bad})


def test_outbound_and_touchpoint_contacts_carry_the_same_fields() -> None:
    """One builder: lane from the origin, control kind, the offer's reward and value, the
    campaign's conversion rule typed, ids stable per tracking id."""
    camp = Campaign("k-1", priority=70, conversion=Conversion(event="pack.bought", within="3d"))
    treatment = Treatment("A", "o-1")
    offer = Offer("o-1", value=2.5, reward=Reward(type="points", amount=100), link="https://x")
    doc = {"customer_id": "c-1", "identities": {"msisdn": "+4915"}, "locale": "de"}
    now = datetime.now(UTC)
    common: dict[str, Any] = {"customer_id": "c-1", "campaign": camp, "treatment": treatment}
    for origin, lane in (({"run_id": "r-1"}, "batch"), ({"event_id": "e-1"}, "realtime")):
        tracking = tracking_id("x", str(origin))
        subject, ev = messages.dispatch_requested(
            tracking_id=tracking,
            doc=doc,
            offer=offer,
            channel="sms",
            content={"text": "hi"},
            at=now,
            origin=origin,
            **common,
        )
        req = DispatchRequested.parse(ev)
        wire = customer_subject(
            "dispatch.requested.sms" + (".batch" if lane == "batch" else ""), "c-1"
        )
        assert subject == wire and ev.type == "dispatch.requested.sms"
        assert ev.id == "dispatch-" + tracking
        assert req.lane == lane and req.address == Address(msisdn="+4915")
        assert req.reward == Reward(type="points", amount=100) and req.priority == 70
        _, ev = messages.contact_recorded(
            tracking_id=tracking,
            offer=offer,
            channel="sms",
            at=now,
            origin=origin,
            envelope_id="contact-" + tracking,
            **common,
        )
        c = ContactRecorded.parse(ev)
        assert ev.id == "contact-" + tracking and c.tracking_id == tracking
        assert c.control is False and c.control_kind is None and c.status == "offered"
        assert c.value == 2.5 and c.reward == req.reward
        assert c.conversion == Conversion(event="pack.bought", within="3d")
        _, ev = messages.contact_recorded(
            tracking_id=tracking,
            offer=offer,
            channel=None,
            at=now,
            control_kind="campaign",
            **common,
        )
        held = ContactRecorded.parse(ev)
        assert held.control and held.control_kind == "campaign" and held.status == "control"
        assert held.channel is None and held.run_id is None


# -- from a running stack ---------------------------------------------------------------------
class Capture:
    """Every ``dispatch.requested.*`` and ``contact.recorded`` published from now on, raw."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.msgs: list[Any] = []

    async def __aenter__(self) -> Capture:
        prefix = self.stack.env["KAIROS_BUS_PREFIX"]
        self.nc = await nats.connect(self.stack.env["KAIROS_NATS_URL"])
        js = self.nc.jetstream()

        async def keep(msg: Any) -> None:
            self.msgs.append(msg)

        for subject in ("dispatch.requested.>", "contact.recorded.*", "dlq.>"):
            await js.subscribe(
                f"{prefix}.{subject}",
                cb=keep,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW,
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    def of(self, campaign: str) -> list[Any]:
        return [
            m
            for m in self.msgs
            if ".dlq." not in m.subject
            and orjson.loads(m.data).get("data", {}).get("campaign_id") == campaign
        ]

    def dead(self, marker: str) -> set[str]:
        """The consumers that dead-lettered a message containing ``marker``."""
        return {
            (m.headers or {}).get("Kairos-Consumer", "")
            for m in self.msgs
            if ".dlq." in m.subject and marker.encode() in m.data
        }


@pytest.fixture
async def capture(stack: Stack) -> AsyncIterator[Capture]:
    async with Capture(stack) as c:
        yield c


async def _setup(gw: httpx.AsyncClient, u: str, *, control: float) -> tuple[str, str]:
    offer, cmp = f"off-{u}", f"ce-{u}"
    r = await gw.put(
        f"/v1/offers/{offer}",
        json={
            "name": "Roaming",
            "value": 2.5,
            "link": "https://example.com/roam",
            "reward": {"type": "bonus_points", "amount": 100},
            "content": {"default": {"title": "Hi"}, "sms": {"text": "Welcome, {{ event.type }}"}},
        },
    )
    assert r.status_code == 200, r.text
    r = await gw.put(
        f"/v1/campaigns/{cmp}",
        json={
            "name": cmp,
            "type": "triggered",
            "trigger": {"event": f"roamed.{u}"},
            "channels": ["sms"],
            "treatments": [{"id": "A", "offer": offer, "weight": 1}],
            "control_group": control,
            "conversion": {"event": "pack.bought", "within": "3d"},
            "approval_required": False,
        },
    )
    assert r.status_code == 200, r.text
    assert (await gw.post(f"/v1/campaigns/{cmp}/activate")).status_code == 200
    await asyncio.sleep(0.6)  # the catalog reloads on every replica
    return offer, cmp


async def _customer(gw: httpx.AsyncClient, cid: str) -> None:
    number = "+49" + str(uuid.uuid4().int % 10**11).zfill(11)
    body = {"consents": {"sms": True}, "identities": {"msisdn": number}}
    r = await gw.put(f"/v1/customers/{cid}", json=body)
    assert r.status_code == 200, r.text


async def test_a_triggered_campaign_publishes_conformant_envelopes(
    gw: httpx.AsyncClient, stack: Stack, capture: Capture
) -> None:
    u = uuid.uuid4().hex[:8]
    offer, cmp = await _setup(gw, u, control=0.5)
    # One customer the campaign's control group holds out, one it reaches.
    ids = [f"ce-{u}-{i}" for i in range(64)]
    held = next(c for c in ids if arbitration.in_control(c, cmp, 0.5))
    sent = next(c for c in ids if not arbitration.in_control(c, cmp, 0.5))
    async with httpx.AsyncClient(base_url=stack.url("gateway"), headers=auth("events")) as app:
        for cid in (held, sent):
            await _customer(gw, cid)
            r = await app.post("/v1/events", json={"type": f"roamed.{u}", "customer_id": cid})
            assert r.status_code == 202, r.text
    await eventually(lambda: _count(capture, cmp), lambda n: n >= 3, timeout=20)
    by_type: dict[str, list[tuple[Any, Any]]] = {}
    for m in capture.of(cmp):
        headers = dict(m.headers or {})
        sdk = _sdk(m.data, headers)  # the message's own headers: structured mode
        assert headers["Content-Type"] == "application/cloudevents+json"
        assert headers["Nats-Msg-Id"] == sdk.get_id()
        assert sdk.get_specversion() == "1.0" and sdk.get_source() == "kairos/decision"
        assert sdk.get_datacontenttype() == "application/json" and sdk.get_time() is not None
        by_type.setdefault(sdk.get_type(), []).append((sdk, m))
    assert sorted(by_type) == ["contact.recorded", "dispatch.requested.sms"]
    ((sdk, m),) = by_type["dispatch.requested.sms"]
    req = DispatchRequested.parse(CloudEvent.from_bytes(m.data))
    assert req == DispatchRequested.model_validate(sdk.get_data())
    assert sdk.get_subject() == req.customer_id == sent and sdk.get_id() == req.event_id_()
    assert req.lane == "realtime" and req.channel == "sms" and req.address is not None
    assert req.content == {"text": f"Welcome, roamed.{u}"} and req.offer_id == offer
    assert req.reward == Reward(type="bonus_points", amount=100) and req.event_type
    contacts = {}
    for sdk, m in by_type["contact.recorded"]:
        c = ContactRecorded.parse(CloudEvent.from_bytes(m.data))
        assert c == ContactRecorded.model_validate(sdk.get_data())
        assert sdk.get_subject() == c.customer_id and sdk.get_id() == "contact-" + c.tracking_id
        assert c.value == 2.5 and c.reward == req.reward
        assert c.conversion == Conversion(event="pack.bought", within="3d")
        contacts[c.customer_id] = c
    assert contacts[sent].tracking_id == req.tracking_id and contacts[sent].status == "offered"
    assert contacts[sent].control_kind is None and contacts[sent].channel == "sms"
    assert contacts[held].control and contacts[held].control_kind == "campaign"
    assert contacts[held].status == "control" and contacts[held].channel is None


async def _count(capture: Capture, campaign: str) -> int:
    return len(capture.of(campaign))


async def test_a_payload_that_does_not_parse_is_dead_lettered_by_each_consumer(
    gw: httpx.AsyncClient, stack: Stack, capture: Capture
) -> None:
    """Malformed contacts, responses and delivery reports go to each consumer's dead letter;
    the consumers go on (a triggered campaign still sends)."""
    u = uuid.uuid4().hex[:8]
    marker = f"poison-{u}"
    prefix = stack.env["KAIROS_BUS_PREFIX"]
    bad = {  # customer and tracking ids missing, an outcome nobody knows
        "contact.recorded": {"campaign_id": marker, "offer_id": "o", "treatment": "A"},
        "response.recorded": {"campaign_id": marker, "outcome": "teleported"},
        "delivery.failed": {"campaign_id": marker, "token_invalid": True, "token": "x"},
    }
    nc = await nats.connect(stack.env["KAIROS_NATS_URL"])
    try:
        js = nc.jetstream()
        for subject, data in bad.items():
            ev = CloudEvent.new(source="test", type=subject, subject=marker, data=data)
            await js.publish(f"{prefix}.{customer_subject(subject, marker)}", ev.to_bytes())
    finally:
        await nc.close()
    want = {
        "decision-offered",  # contact.recorded
        "decision-propensity",  # response.recorded
        "decision-trigger-responses",
        "profile-responses",
        "profile-delivery",  # delivery.failed
    }
    await eventually(
        lambda: _dead(capture, marker), lambda d: want <= d and any("selection" in c for c in d)
    )
    _, cmp = await _setup(gw, u, control=0.0)
    cid = f"ce-{u}-after"
    await _customer(gw, cid)
    async with httpx.AsyncClient(base_url=stack.url("gateway"), headers=auth("events")) as app:
        r = await app.post("/v1/events", json={"type": f"roamed.{u}", "customer_id": cid})
        assert r.status_code == 202, r.text
    await eventually(lambda: _count(capture, cmp), lambda n: n >= 2)


async def _dead(capture: Capture, marker: str) -> set[str]:
    return capture.dead(marker)
