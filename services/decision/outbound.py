"""Outbound contacts (triggers, timers, batch runs, simulate): the pipeline's steps for many
(customer, campaign) items at once.

``eligible`` runs the eligibility steps (control customers come out recorded as contacts
with ``control: true``); ``contact`` then picks the channel: the campaign's ``channels`` in
order of preference that have consent and an address, the first with room in the contact
ledger (every item of a batch in one Redis call), renders its content and builds the
``dispatch.requested.<channel>`` and ``contact.recorded`` events. Quiet hours in the
customer's time zone, or a cap whose policy says ``on_cap: defer``, defer the contact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from services.decision import messages
from services.decision.pipeline import steps
from services.decision.pipeline.model import Campaign
from services.decision.pipeline.steps import (
    Candidate,
    ControlKind,
    Customer,
    Outcome,
    address,
    quiet_until,
)
from services.decision.policy.ledger import Reservation
from shared.events import CloudEvent, iso
from shared.redis import read_projections

if TYPE_CHECKING:
    from services.decision.engine import Engine

__all__ = ["Item", "Outcome", "Planner", "address", "quiet_until", "tracking_id"]
OUTBOUND = frozenset({"push", "email", "sms"})  # held by quiet hours; in-app never is
LEDGER_CHUNK = 500
READ_CHUNK = 1000


def tracking_id(*parts: str) -> str:
    """A stable tracking id for one contact: the same event or run gives the same id, so a
    redelivery reserves, records and requests nothing twice."""
    return hashlib.blake2b(":".join(parts).encode(), digest_size=12).hexdigest()


@dataclass(slots=True)
class Item:
    """One customer and one campaign to plan a contact for."""

    who: Customer
    campaign: Campaign
    tracking: str
    origin: Mapping[str, Any] = field(default_factory=dict)  # event_id / run_id / timer_id
    cand: Candidate | None = None  # set by ``eligible``
    reserved: str | None = None  # the channel the ledger already holds this contact on

    @property
    def customer_id(self) -> str:
        return self.who.customer_id

    @property
    def event(self) -> Mapping[str, Any] | None:
        return self.who.event


class Planner:
    """Plans outbound contacts against the engine's catalog, ledger and policy."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def customers(
        self,
        ids: Sequence[str],
        campaigns: Sequence[Campaign],
        now: datetime,
        *,
        events: Sequence[Mapping[str, Any] | None] | None = None,
        docs: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[Customer]:
        """The customers as the steps see them: projections (read here unless given) and the
        ``contacted`` answers their campaigns' rules need, in a few round trips."""
        eng = self.engine
        if docs is None:
            got: list[Any] = []
            for start in range(0, len(ids), READ_CHUNK):
                part = list(ids[start : start + READ_CHUNK])
                got += await read_projections(eng.redis, eng.keys, part)
            docs = got
        seen = await eng.contacted(ids, campaigns, now)
        evs = events if events is not None else [None] * len(ids)
        return [
            Customer.of(cid, doc, now, event=ev, contacted=s)
            for cid, doc, ev, s in zip(ids, docs, evs, seen, strict=True)
        ]

    async def recall(self, items: Sequence[Item]) -> None:
        """For items that may have been planned before (a redelivery, a resumed page), the
        channel the ledger already holds their contact on: one round trip."""
        ledger = self.engine.ledger
        asks = [
            (it, ch, ledger.channel_key(it.customer_id, ch))
            for it in items
            for ch in it.campaign.channels
        ]
        held = await ledger.holding([(key, it.tracking) for it, _, key in asks])
        for (it, ch, _), yes in zip(asks, held, strict=True):
            if yes and it.reserved is None:
                it.reserved = ch

    def eligible(
        self, it: Item, now: datetime, *, audience_checked: bool = False
    ) -> Outcome | None:
        """Every eligibility step: None when the item may be contacted (its candidate is kept),
        else its outcome; a control customer's carries its ``contact.recorded``. A contact the
        ledger already holds (``recall``) is not asked again."""
        cat = self.engine.catalog
        if it.reserved is not None:
            again = steps.redo(it.campaign, it.who, it.reserved, offers=cat.offers, now=now)
            if isinstance(again, Outcome):
                return again
            it.cand = again
            return None
        got = steps.eligible(
            it.campaign,
            it.who,
            offers=cat.offers,
            policy=cat.policy,
            now=now,
            outbound=True,
            audience_checked=audience_checked,
        )
        if isinstance(got, Outcome):
            return got
        it.cand = got
        if got.control is None:
            return None
        out = steps.held_out(got)
        out.records = [self._contact(it, None, now, control=got.control)]
        return out

    async def contact(
        self, items: Sequence[Item], now: datetime, *, dry: bool = False
    ) -> list[Outcome]:
        """Ledger, content and messages for eligible, non-control items (``dry``: the ledger
        is only read, and nothing is built to send)."""
        eng = self.engine
        policy = eng.catalog.policy
        asks = []
        for it in items:
            assert it.cand is not None
            caps = [
                steps.caps(eng.ledger, it.customer_id, it.campaign, ch, policy)
                for ch in it.cand.channels
            ]
            asks.append(Reservation(it.tracking, caps))
        now_ms = int(now.timestamp() * 1000)
        out: list[Outcome] = []
        for start in range(0, len(asks), LEDGER_CHUNK):
            part = asks[start : start + LEDGER_CHUNK]
            results = await eng.ledger.reserve_many(part, now_ms, dry=dry)
            for it, res in zip(items[start : start + len(part)], results, strict=True):
                cand = it.cand
                assert cand is not None
                if res.option is None:
                    wait = steps.deferrable(res)
                    if wait is None:
                        out.append(steps.blocked(res, cand))
                        continue
                    due = await eng.ledger.frees_at(wait, now_ms)
                    out.append(
                        Outcome(
                            "deferred",
                            "policy",
                            wait.label + " (deferred)",
                            treatment=cand.treatment.id,
                            due=datetime.fromtimestamp(due / 1000, UTC),
                            kind="retry",
                        )
                    )
                    continue
                ch = cand.channels[res.option]
                content = steps.content(cand.offer, ch, it.who)
                if isinstance(content, Outcome):  # counted in the ledger, but not sent
                    content.treatment = cand.treatment.id
                    out.append(content)
                    continue
                records = (
                    []
                    if dry
                    else [self._dispatch(it, ch, content, now), self._contact(it, ch, now)]
                )
                doc = it.who.doc or {}
                until = quiet_until(policy, doc.get("timezone"), now) if ch in OUTBOUND else None
                if until is not None:
                    out.append(
                        Outcome(
                            "deferred",
                            "quiet_hours",
                            f"quiet hours until {iso(until)}",
                            ch,
                            cand.treatment.id,
                            records,
                            until,
                            "send",
                        )
                    )
                else:
                    out.append(
                        Outcome(
                            "dispatched",
                            "dispatched",
                            f"dispatched over {ch}",
                            ch,
                            cand.treatment.id,
                            records,
                        )
                    )
        return out

    # -- the events ----------------------------------------------------------------------
    def _contact(
        self, it: Item, channel: str | None, now: datetime, *, control: ControlKind | None = None
    ) -> tuple[str, CloudEvent]:
        """The item's ``contact.recorded``: offered, or held out when ``control`` is set (its
        own tracking id then, so the ledger never sees it)."""
        assert it.cand is not None
        tracking = it.tracking if control is None else tracking_id(it.tracking, "control")
        return messages.contact_recorded(
            tracking_id=tracking,
            customer_id=it.customer_id,
            campaign=it.campaign,
            treatment=it.cand.treatment,
            offer=it.cand.offer,
            channel=channel,
            at=now,
            control_kind=control,
            origin=it.origin,
            envelope_id="contact-" + tracking,
        )

    def _dispatch(
        self, it: Item, channel: str, content: dict[str, str], now: datetime
    ) -> tuple[str, CloudEvent]:
        assert it.cand is not None
        return messages.dispatch_requested(
            tracking_id=it.tracking,
            customer_id=it.customer_id,
            doc=it.who.doc or {},
            campaign=it.campaign,
            treatment=it.cand.treatment,
            offer=it.cand.offer,
            channel=channel,
            content=content,
            at=now,
            origin=it.origin,
        )
