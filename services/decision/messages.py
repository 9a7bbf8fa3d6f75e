"""The one place decision builds ``contact.recorded``, through :class:`ContactRecorded`.

Touchpoint decisions (the engine) and outbound plans (triggers, timers, batch runs) record
their offered and control contacts with the same function, so every consumer (feedback,
selection's ``contacted`` history, propensity learning) reads the same fields whichever path
made the contact. Outbound messages themselves (``dispatch.requested.<channel>``) are built
by the outbound planner (``Planner._dispatch``) through :class:`DispatchRequested`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from shared.bus import PoisonMessage
from shared.contracts.bus import BusMessage, ContactRecorded, Conversion, Lane, Reward
from shared.events import CloudEvent, iso

SOURCE = "kairos/decision"
ControlKind = Literal["global", "campaign"]
NO_ORIGIN: Mapping[str, Any] = {}
M = TypeVar("M", bound=BusMessage)


def lane(origin: Mapping[str, Any]) -> Lane:
    """Traffic of a batch run (its origin names the run) waits behind realtime traffic."""
    return "batch" if origin.get("run_id") else "realtime"


# A batch run records hundreds of thousands of contacts of a few offers and campaigns: their
# reward and conversion rule are typed once per catalog object (kept alongside it, so an id
# reused after a reload never answers for another object), not once per message.
_TYPED: dict[tuple[str, int], tuple[object, Any]] = {}
_LAST_STAMP: list[Any] = [None, ""]


def _typed(kind: str, owner: Mapping[str, Any], make: Any) -> Any:
    hit = _TYPED.get((kind, id(owner)))
    if hit is not None and hit[0] is owner:
        return hit[1]
    if len(_TYPED) > 10_000:  # catalogs reloaded many times over: start afresh
        _TYPED.clear()
    value = make(owner)
    _TYPED[(kind, id(owner))] = (owner, value)
    return value


def reward(offer: Mapping[str, Any] | None) -> Reward | None:
    """The offer's reward, typed (None when the offer grants nothing)."""
    if not offer:
        return None
    r: Reward | None = _typed("reward", offer, _make_reward)
    return r


def _make_reward(offer: Mapping[str, Any]) -> Reward | None:
    r = offer.get("reward")
    return Reward.model_validate(r) if r else None


def _make_conversion(campaign: Mapping[str, Any]) -> Conversion | None:
    c = campaign.get("conversion")
    return Conversion.model_validate(c) if c else None


def stamp(at: datetime) -> str:
    """``iso(at)``, remembered for the last time given: a plan stamps a whole page with one."""
    if _LAST_STAMP[0] is not at:
        _LAST_STAMP[0], _LAST_STAMP[1] = at, iso(at)
    text: str = _LAST_STAMP[1]
    return text


def _value(offer: Mapping[str, Any] | None) -> float | None:
    v = offer.get("value") if offer else None
    return float(v) if v is not None else None


def contact_recorded(
    *,
    tracking_id: str,
    customer_id: str,
    campaign: Mapping[str, Any],
    campaign_id: str,
    treatment: Mapping[str, Any] | None,
    offer: Mapping[str, Any] | None,
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
    set; ``campaign`` is the campaign's body (its conversion rule), ``offer`` the offer's
    (its reward and value). Without ``envelope_id`` the envelope gets a fresh id."""
    t = treatment or {}
    conversion: Conversion | None = _typed("conversion", campaign, _make_conversion)
    msg = ContactRecorded(
        tracking_id=tracking_id,
        customer_id=customer_id,
        campaign_id=campaign_id,
        decision_id=decision_id,
        treatment=t.get("id"),
        offer_id=t.get("offer"),
        touchpoint=touchpoint,
        channel=channel,
        placement=placement,
        control=control_kind is not None,
        control_kind=control_kind,
        status="offered" if control_kind is None else "control",
        conversion=conversion,
        reward=reward(offer),
        value=_value(offer),
        time=stamp(at),
        event_id=origin.get("event_id"),
        event_type=origin.get("event_type"),
        timer_id=origin.get("timer_id"),
        due=origin.get("due"),
        run_id=origin.get("run_id"),
    )
    return msg.to_event(source=SOURCE, id_=envelope_id)


def parse(ev: CloudEvent, cls: type[M]) -> M:
    """The envelope's payload as ``cls``; one that does not parse is a poison message:
    dead-lettered at once when alone, and in a batch the runner retries one by one so that
    only it is."""
    try:
        return cls.parse(ev)
    except ValidationError as exc:
        raise PoisonMessage(f"not a {cls.TYPE} payload: {exc}") from exc
