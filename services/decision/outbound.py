"""Outbound contacts (triggers, timers, batch runs): who gets what, over which channel, when.

One planning step serves every outbound path. For each (customer, campaign) item it
checks schedule, audience and treatment (tiers first, else the stable weighted split)
and the offer's validity, holds control customers out (recorded as contacts with
``control: true``), then picks the channel: the campaign's ``channels`` in order of
preference, keeping those with the customer's consent and a way to reach them (a push
token, an e-mail address, an MSISDN, an installed app for in-app), and reserves the
first with room in the contact ledger — every item of a batch in one Redis call.

What comes out is, per item, an :class:`Outcome`: dispatched (with its
``dispatch.requested.<channel>`` and ``contact.recorded`` events), control, suppressed
or ineligible with the reason, or deferred (quiet hours in the customer's time zone, or a
cap whose policy says ``on_cap: defer``) with the time it is due.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.decision import arbitration, messages, templating
from services.decision.messages import SOURCE, ControlKind
from services.decision.policy.ledger import Reservation
from shared import rules
from shared.contracts.bus import Address, DispatchRequested, Platform
from shared.events import CloudEvent, iso

if TYPE_CHECKING:
    from services.decision.engine import Engine, Live

OUTBOUND = frozenset({"push", "email", "sms"})  # held by quiet hours; in-app never is
EXPIRY = timedelta(days=1)
LEDGER_CHUNK = 500
PLATFORMS = frozenset(Platform.__args__)  # type: ignore[attr-defined]
Status = Literal["dispatched", "control", "suppressed", "deferred", "ineligible"]


def tracking_id(*parts: str) -> str:
    """A stable tracking id for one contact: the same event or run gives the same id, so a
    redelivery reserves, records and requests nothing twice."""
    return hashlib.blake2b(":".join(parts).encode(), digest_size=12).hexdigest()


def address(doc: dict[str, Any], channel: str) -> dict[str, Any] | None:
    """Where a channel reaches this customer, or None."""
    ids = doc.get("identities") or {}
    # a device the push channel cannot address (no token, an unknown platform) is left out
    devices = [
        d for d in doc.get("devices") or () if d.get("token") and d.get("platform") in PLATFORMS
    ]
    if channel == "push":
        return {"devices": devices} if devices else None
    if channel == "email":
        return {"email": ids["email"]} if ids.get("email") else None
    if channel == "sms":
        return {"msisdn": ids["msisdn"]} if ids.get("msisdn") else None
    if channel == "inapp":  # the app is installed: it has registered a device
        return {"customer_id": doc.get("customer_id")} if doc.get("devices") else None
    return None


def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def quiet_until(policy: dict[str, Any], tz: str | None, now: datetime) -> datetime | None:
    """The end of the quiet hours the customer is in now (their time zone), else None."""
    q = policy.get("quiet_hours")
    if not q:
        return None
    local = now.astimezone(_zone(tz))
    start = time.fromisoformat(q["start"])
    end = time.fromisoformat(q["end"])
    t = local.time()
    inside = (start <= t < end) if start <= end else (t >= start or t < end)
    if not inside:
        return None
    day = local.date() if t < end else local.date() + timedelta(days=1)
    wall = datetime.combine(day, end)
    return wall.replace(tzinfo=local.tzinfo).astimezone(UTC)


@dataclass
class Item:
    """One customer and one campaign to plan a contact for."""

    customer_id: str
    doc: dict[str, Any] | None
    live: Live
    tracking: str
    event: dict[str, Any] | None = None  # the firing event: id, type, time, properties
    origin: dict[str, Any] = field(default_factory=dict)  # event_id / run_id / timer_id
    audience_checked: bool = False  # a run's snapshot already applied the audience
    subject: rules.Subject | None = None
    treatment: dict[str, Any] | None = None
    offer: dict[str, Any] | None = None
    tier_fit: bool = False
    score: float = 0.0
    reachable: list[str] = field(default_factory=list)  # consented channels with an address


@dataclass
class Outcome:
    status: Status
    reason: str  # a short key: consent, policy, reentry, unreachable, content, audience …
    label: str = ""  # what a person reads
    channel: str | None = None
    treatment: str | None = None
    records: list[tuple[str, CloudEvent]] = field(default_factory=list)
    due: datetime | None = None  # deferred: when to try again / send
    kind: str | None = None  # deferred: "send" (reserved, publish then) or "retry"


def _dt(v: Any) -> datetime | None:
    if not v:
        return None
    t = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


class Planner:
    """Plans outbound contacts against the engine's catalog, ledger and policy."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- eligibility -------------------------------------------------------------------
    def check(self, it: Item, now: datetime) -> Outcome | None:
        """Schedule, audience, treatment and offer: None when eligible (fills the item)."""
        live = it.live
        if live.start and now < live.start:
            return Outcome("ineligible", "schedule", f"schedule: starts {iso(live.start)}")
        if live.end and now >= live.end:
            return Outcome("ineligible", "schedule", f"schedule: ended {iso(live.end)}")
        doc = it.doc or {}
        if it.subject is None:
            it.subject = rules.Subject(doc, event=it.event, now=now)
        if live.audience is not None and not it.audience_checked:
            if it.doc is None:
                return Outcome("ineligible", "audience", "audience: unknown customer")
            if not live.audience(it.subject):
                return Outcome("ineligible", "audience", "audience: rule not met")
        treatment, fit = None, False
        for t, pred in live.tiers:
            if it.doc is not None and pred(it.subject):
                treatment, fit = t, True
                break
        if treatment is None:
            if not live.plain:
                return Outcome("ineligible", "treatment", "treatments: no tier matches")
            treatment = arbitration.by_weight(it.customer_id, live.campaign_id, live.plain)
        offer = self.engine.catalog.offers.get(treatment["offer"])
        if offer is None:
            return Outcome("ineligible", "offer", f"offer: {treatment['offer']} missing")
        vf, vt = _dt(offer.get("valid_from")), _dt(offer.get("valid_to"))
        if (vf and now < vf) or (vt and now >= vt):
            return Outcome("ineligible", "offer", f"offer: {treatment['offer']} not valid now")
        it.treatment, it.offer, it.tier_fit = treatment, offer, fit
        # Consent and a way to reach them come before the control group: control is drawn
        # among customers the campaign could contact, or the uplift compares unlike groups.
        consents = doc.get("consents") or {}
        allowed = [c for c in live.channels if consents.get(c) is True]
        if not allowed:
            return self._skip(it, "consent", "consent: no consent for any channel")
        it.reachable = [c for c in allowed if address(doc, c) is not None]
        if not it.reachable:
            return self._skip(it, "unreachable", f"unreachable: no address for {allowed}")
        return None

    def control(self, it: Item, now: datetime) -> Outcome | None:
        """Control customers (global or the campaign's) are held out and recorded; only
        eligible, reachable ones get here (``check``)."""
        policy = self.engine.catalog.policy
        share = float(it.live.body.get("control_group") or 0)
        kind: ControlKind
        if it.doc is not None and arbitration.in_global_control(
            it.customer_id, float(policy.get("global_control") or 0)
        ):
            kind, label = "global", "control: global control group"
        elif arbitration.in_control(it.customer_id, it.live.campaign_id, share):
            kind, label = "campaign", f"control: campaign control group ({share:.0%})"
        else:
            return None
        return Outcome(
            "control",
            "control",
            label,
            treatment=it.treatment["id"] if it.treatment else None,
            records=[self._contact(it, None, now, control=kind)],
        )

    # -- channels and the ledger ---------------------------------------------------------
    async def contact(
        self, items: Sequence[Item], now: datetime, *, dry: bool = False
    ) -> list[Outcome]:
        """Choose a channel and reserve the contact for eligible, non-control items."""
        out: list[Outcome | None] = [None] * len(items)
        asks: list[tuple[int, list[str], Reservation, dict[str, dict[str, str]]]] = []
        policy = self.engine.catalog.policy
        for i, it in enumerate(items):
            assert it.treatment is not None
            assert it.offer is not None
            doc = it.doc or {}
            reachable = it.reachable  # consent and addresses were checked by ``check``
            if not reachable:
                out[i] = self._skip(it, "unreachable", "unreachable: not checked")
                continue
            # The preferred channel's content is rendered before anything is reserved (a
            # template that fails for this customer skips them); another channel's only if
            # the ledger picks it.
            rendered: dict[str, dict[str, str]] = {}
            try:
                rendered[reachable[0]] = templating.render(
                    it.offer["content"], reachable[0], doc, it.event
                )
            except Exception as exc:
                out[i] = self._skip(it, "content", f"content: {exc}")
                continue
            caps = [self.engine.caps(it.customer_id, it.live, c) for c in reachable]
            asks.append((i, reachable, Reservation(it.tracking, caps), rendered))
        now_ms = int(now.timestamp() * 1000)
        ledger = self.engine.ledger
        for start in range(0, len(asks), LEDGER_CHUNK):
            part = asks[start : start + LEDGER_CHUNK]
            results = await ledger.reserve_many([a[2] for a in part], now_ms, dry=dry)
            for (i, channels, _, rendered), res in zip(part, results, strict=True):
                it = items[i]
                if res.option is not None:
                    ch = channels[res.option]
                    if ch not in rendered:
                        assert it.offer is not None
                        try:
                            rendered[ch] = templating.render(
                                it.offer["content"], ch, it.doc or {}, it.event
                            )
                        except Exception as exc:  # counted in the ledger, but not sent
                            out[i] = self._skip(it, "content", f"content: {exc}")
                            continue
                    records = [
                        self._dispatch(it, ch, rendered[ch], now),
                        self._contact(it, ch, now),
                    ]
                    until = quiet_until(policy, (it.doc or {}).get("timezone"), now)
                    if ch in OUTBOUND and until is not None:
                        out[i] = Outcome(
                            "deferred",
                            "quiet_hours",
                            f"quiet hours until {iso(until)}",
                            ch,
                            it.treatment["id"] if it.treatment else None,
                            records,
                            until,
                            "send",
                        )
                    else:
                        out[i] = Outcome(
                            "dispatched",
                            "dispatched",
                            f"dispatched over {ch}",
                            ch,
                            it.treatment["id"] if it.treatment else None,
                            records,
                        )
                    continue
                deferrable = [c for c in res.blocked if c is not None and c.on_cap == "defer"]
                if deferrable:
                    due = await ledger.frees_at(deferrable[0], now_ms)
                    out[i] = Outcome(
                        "deferred",
                        "policy",
                        deferrable[0].label + " (deferred)",
                        treatment=it.treatment["id"] if it.treatment else None,
                        due=datetime.fromtimestamp(due / 1000, UTC),
                        kind="retry",
                    )
                    continue
                first = res.blocked[0]
                kind = first.kind if first is not None else "policy"
                out[i] = self._skip(it, kind, first.label if first else "policy")
        return [o if o is not None else Outcome("suppressed", "policy") for o in out]

    def _skip(self, it: Item, reason: str, label: str) -> Outcome:
        return Outcome(
            "suppressed", reason, label, treatment=it.treatment["id"] if it.treatment else None
        )

    # -- the events ----------------------------------------------------------------------
    def _contact(
        self,
        it: Item,
        channel: str | None,
        now: datetime,
        *,
        control: ControlKind | None = None,
    ) -> tuple[str, CloudEvent]:
        """The item's ``contact.recorded``: offered, or held out when ``control`` is set (its
        own tracking id then, so the ledger never sees it)."""
        tracking = it.tracking if control is None else tracking_id(it.tracking, "control")
        return messages.contact_recorded(
            tracking_id=tracking,
            customer_id=it.customer_id,
            campaign=it.live.body,
            campaign_id=it.live.campaign_id,
            treatment=it.treatment,
            offer=it.offer,
            channel=channel,
            at=now,
            control_kind=control,
            origin=it.origin,
            envelope_id="contact-" + tracking,
        )

    def _dispatch(
        self, it: Item, channel: str, content: dict[str, str], now: datetime
    ) -> tuple[str, CloudEvent]:
        """The item's ``dispatch.requested.<channel>``, expiring with the offer at the latest."""
        assert it.offer is not None
        assert it.treatment is not None
        offer = it.offer
        expires = now + EXPIRY
        vt = _dt(offer.get("valid_to"))
        if vt is not None and vt < expires:
            expires = vt
        where = address(it.doc or {}, channel)
        origin = it.origin
        msg = DispatchRequested(
            tracking_id=it.tracking,
            idempotency_key=it.tracking,
            customer_id=it.customer_id,
            campaign_id=it.live.campaign_id,
            treatment=it.treatment["id"],
            offer_id=it.treatment["offer"],
            channel=channel,
            address=Address.model_validate(where) if where is not None else None,
            content=content,
            link=offer.get("link"),
            reward=messages.reward(offer),
            priority=int(it.live.body.get("priority", 50)),
            lane=messages.lane(origin),
            locale=(it.doc or {}).get("locale"),
            expires_at=iso(expires),
            requested_at=messages.stamp(now),
            event_id=origin.get("event_id"),
            event_type=origin.get("event_type"),
            timer_id=origin.get("timer_id"),
            due=origin.get("due"),
            run_id=origin.get("run_id"),
        )
        return msg.to_event(source=SOURCE, id_=msg.event_id_())
