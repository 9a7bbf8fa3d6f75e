"""Fixtures and helpers of the feedback tests: contacts are produced as real
``contact.recorded`` messages on the test stack's bus."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from shared.bus import Bus
from shared.contracts.bus import ContactRecorded, Conversion
from shared.events import CloudEvent, iso, utcnow
from shared.links import LinkSigner
from shared.privacy import event_subject
from shared.settings import DEFAULT_SECRET
from shared.stack import Stack
from tests.helpers import eventually


def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
async def bus(stack: Stack) -> AsyncIterator[Bus]:
    """A publisher on the test stack's bus namespace."""
    b = Bus(stack.env["KAIROS_NATS_URL"], prefix=stack.env["KAIROS_BUS_PREFIX"], source="tests")
    await b.connect(ensure_streams=False)
    yield b
    await b.close()


@pytest.fixture(scope="session")
def signer(stack: Stack) -> LinkSigner:
    """The link signer the stack's gateway verifies with."""
    env = stack.env
    secret = env.get("KAIROS_LINK_SECRET") or env.get("KAIROS_TRACKING_SECRET") or DEFAULT_SECRET
    return LinkSigner(secret, env["KAIROS_PUBLIC_URL"])


def contact(
    customer_id: str,
    campaign_id: str,
    *,
    at: datetime | None = None,
    control: bool = False,
    control_kind: str | None = None,
    conversion: tuple[str, str] | None = None,
    tracking_id: str | None = None,
    **kw: Any,
) -> ContactRecorded:
    """A contact as decision records it (target unless ``control``)."""
    return ContactRecorded(
        tracking_id=tracking_id or f"trk-{uid()}{uid()}",
        customer_id=customer_id,
        campaign_id=campaign_id,
        control=control,
        control_kind=(control_kind or "campaign") if control else None,
        status="control" if control else "offered",
        conversion=Conversion(event=conversion[0], within=conversion[1]) if conversion else None,
        time=iso(at or utcnow()),
        **kw,
    )


async def publish(bus: Bus, *contacts: ContactRecorded) -> None:
    """Publish contacts as decision does (id ``contact-<tracking id>``)."""
    await bus.publish_many(
        [c.to_event(source="kairos/decision", id_="contact-" + c.tracking_id) for c in contacts]
    )


async def publish_event(
    bus: Bus, customer_id: str, type_: str, at: datetime, **properties: Any
) -> None:
    """A behavioural event on ``events.<type>``, as the gateway publishes it."""
    ev = CloudEvent(
        source="kairos/gateway",
        type=type_,
        subject=customer_id,
        data={
            "type": type_,
            "customer_id": customer_id,
            "time": iso(at),
            "properties": properties,
        },
    )
    await bus.publish_many([(event_subject(type_, customer_id, None), ev)])


async def history(gw: httpx.AsyncClient, stack: Stack, customer_id: str) -> dict[str, Any]:
    """The customer's history straight from feedback."""
    async with httpx.AsyncClient(base_url=stack.url("feedback")) as c:
        r = await c.get(f"/v1/customers/{customer_id}/history")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


async def stored(gw: httpx.AsyncClient, stack: Stack, customer_id: str, n: int) -> dict[str, Any]:
    """Wait until feedback holds ``n`` contacts of the customer."""
    return await eventually(
        lambda: history(gw, stack, customer_id), lambda h: len(h["contacts"]) >= n
    )


async def report(gw: httpx.AsyncClient, campaign_id: str) -> dict[str, Any]:
    r = await gw.get(f"/v1/campaigns/{campaign_id}/report")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc
