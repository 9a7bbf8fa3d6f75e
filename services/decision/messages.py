"""The one place decision builds the messages it publishes: ``contact.recorded`` through
:class:`ContactRecorded` and ``dispatch.requested.<channel>`` through :class:`DispatchRequested`.

Touchpoint decisions (the engine) and outbound plans (triggers, timers, batch runs) record
their offered and control contacts with the same function, so every consumer (feedback,
selection's ``contacted`` history, propensity learning) reads the same fields whichever path
made the contact.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pydantic import ValidationError

from services.decision.pipeline import steps
from services.decision.pipeline.model import Campaign, Offer, Treatment
from services.decision.pipeline.steps import ControlKind
from shared.bus import PoisonMessage
from shared.contracts.bus import Address, BusMessage, ContactRecorded, DispatchRequested, Lane
from shared.events import CloudEvent, iso

SOURCE = "kairos/decision"
EXPIRY = timedelta(days=1)
NO_ORIGIN: Mapping[str, Any] = {}
M = TypeVar("M", bound=BusMessage)


def lane(origin: Mapping[str, Any]) -> Lane:
    """Traffic of a batch run (its origin names the run) waits behind realtime traffic."""
    return "batch" if origin.get("run_id") else "realtime"


def stamp(at: datetime) -> str:
    """``iso(at)``, remembered for the last time given: a plan stamps a whole page with one."""
    if _LAST_STAMP[0] is not at:
        _LAST_STAMP[0], _LAST_STAMP[1] = at, iso(at)
    text: str = _LAST_STAMP[1]
    return text


_LAST_STAMP: list[Any] = [None, ""]


def contact_recorded(
    *,
    tracking_id: str,
    customer_id: str,
    campaign: Campaign,
    treatment: Treatment | None,
    offer: Offer | None,
    channel: str | None,
    at: datetime,
    control_kind: ControlKind | None = None,
    decision_id: str | None = None,
    touchpoint: str | None = None,
    placement: str | None = None,
    origin: Mapping[str, Any] = NO_ORIGIN,
    envelope_id: str | None = None,
) -> tuple[str, CloudEvent]:
    """(subject, envelope) of one offered contact, or a control one when ``control_kind`` is
    set. Without ``envelope_id`` the envelope gets a fresh id."""
    msg = ContactRecorded(
        tracking_id=tracking_id,
        customer_id=customer_id,
        campaign_id=campaign.campaign_id,
        decision_id=decision_id,
        treatment=treatment.id if treatment else None,
        offer_id=treatment.offer_id if treatment else None,
        touchpoint=touchpoint,
        channel=channel,
        placement=placement,
        control=control_kind is not None,
        control_kind=control_kind,
        status="offered" if control_kind is None else "control",
        conversion=campaign.conversion,
        reward=offer.reward if offer else None,
        value=offer.value if offer else None,
        time=stamp(at),
        event_id=origin.get("event_id"),
        event_type=origin.get("event_type"),
        timer_id=origin.get("timer_id"),
        due=origin.get("due"),
        run_id=origin.get("run_id"),
    )
    return msg.to_event(source=SOURCE, id_=envelope_id)


def dispatch_requested(
    *,
    tracking_id: str,
    customer_id: str,
    doc: Mapping[str, Any],
    campaign: Campaign,
    treatment: Treatment,
    offer: Offer,
    channel: str,
    content: dict[str, str],
    at: datetime,
    origin: Mapping[str, Any] = NO_ORIGIN,
) -> tuple[str, CloudEvent]:
    """(subject, envelope) of one ``dispatch.requested.<channel>``, expiring with the offer
    at the latest; its envelope id is stable per tracking id (``Nats-Msg-Id``)."""
    expires = at + EXPIRY
    if offer.valid_to is not None and offer.valid_to < expires:
        expires = offer.valid_to
    where = steps.address(doc, channel)
    msg = DispatchRequested(
        tracking_id=tracking_id,
        idempotency_key=tracking_id,
        customer_id=customer_id,
        campaign_id=campaign.campaign_id,
        treatment=treatment.id,
        offer_id=treatment.offer_id,
        channel=channel,
        address=Address.model_validate(where) if where is not None else None,
        content=content,
        link=offer.link,
        reward=offer.reward,
        priority=campaign.priority,
        lane=lane(origin),
        locale=doc.get("locale"),
        expires_at=iso(expires),
        requested_at=stamp(at),
        event_id=origin.get("event_id"),
        event_type=origin.get("event_type"),
        timer_id=origin.get("timer_id"),
        due=origin.get("due"),
        run_id=origin.get("run_id"),
    )
    return msg.to_event(source=SOURCE, id_=msg.event_id_())


def parse(ev: CloudEvent, cls: type[M]) -> M:
    """The envelope's payload as ``cls``; one that does not parse is a poison message:
    dead-lettered at once when alone, and in a batch the runner retries one by one so that
    only it is."""
    try:
        return cls.parse(ev)
    except ValidationError as exc:
        raise PoisonMessage(f"not a {cls.TYPE} payload: {exc}") from exc
