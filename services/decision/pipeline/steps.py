"""The steps of every decision, as plain functions over typed values, in the one order every
flow (touchpoint decisions, triggers, timers, batch runs and simulate) follows:

schedule, audience, ``where``, treatment and tier, offer validity, consent and reachability
(outbound only), global and campaign control, then ranking, the ledger and content.

A step that turns a customer away returns an :class:`Outcome` whose ``reason`` is the code
that run counts and metrics use and whose ``label`` is what ``explain`` shows; the same step
gives the same reason whichever flow called it.

Consent and reachability come before control for outbound contacts: the control group is
drawn among the customers the campaign could reach, or the uplift would compare a group that
includes people nobody could contact with one that does not (the contact-recorded contract:
a control contact is "would have been sent"). A touchpoint decision reaches a customer who
is present, so it has no such step.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.decision import arbitration, templating
from services.decision.pipeline.model import Campaign, Offer, Policy, Treatment
from services.decision.policy.ledger import HISTORY_S, Cap, Ledger, Reserved
from shared import rules
from shared.contracts.bus import Platform
from shared.events import CloudEvent, iso

Status = Literal[
    "offered", "dispatched", "control", "suppressed", "deferred", "ineligible", "outranked"
]
ControlKind = Literal["global", "campaign"]
PLATFORMS = frozenset(Platform.__args__)  # type: ignore[attr-defined]
NEVER = 10**9  # the max of a cap that only records


@dataclass(slots=True)
class Outcome:
    """What became of one (customer, campaign): a status, the reason code counts and metrics
    use, and the label ``explain`` shows; a sent or deferred one carries its messages."""

    status: Status
    reason: str
    label: str = ""
    channel: str | None = None
    treatment: str | None = None
    records: list[tuple[str, CloudEvent]] = field(default_factory=list)
    due: datetime | None = None  # deferred: when to try again / send
    kind: Literal["send", "retry"] | None = None  # deferred: reserved (publish then) or retry


@dataclass(slots=True)
class Customer:
    """One customer as the steps see them: the projection (None: unknown) and the firing
    event, with the rule subject over both."""

    customer_id: str
    doc: Mapping[str, Any] | None
    subject: rules.Subject
    event: Mapping[str, Any] | None = None

    @classmethod
    def of(
        cls,
        customer_id: str,
        doc: Mapping[str, Any] | None,
        now: datetime,
        *,
        event: Mapping[str, Any] | None = None,
        contacted: Mapping[tuple[str, str], bool] | None = None,
    ) -> Customer:
        seen = contacted or {}
        subject = rules.Subject(
            doc or {}, event=event, now=now, contacted=lambda c, w: seen.get((c, w), False)
        )
        return cls(customer_id, doc, subject, event)


@dataclass(slots=True)
class Candidate:
    """A campaign that passed the eligibility steps for one customer."""

    campaign: Campaign
    treatment: Treatment
    offer: Offer
    tier_fit: bool
    channels: tuple[str, ...] = ()  # outbound: consented channels with an address, in order
    control: ControlKind | None = None
    control_label: str = ""
    score: float = 0.0


def _no(status: Status, reason: str, label: str) -> Outcome:
    return Outcome(status, reason, label)


# -- eligibility ---------------------------------------------------------------------------
def schedule(c: Campaign, now: datetime) -> Outcome | None:
    """Outside the campaign's start and end: ineligible."""
    if c.start is not None and now < c.start:
        return _no("ineligible", "schedule", f"schedule: starts {iso(c.start)}")
    if c.end is not None and now >= c.end:
        return _no("ineligible", "schedule", f"schedule: ended {iso(c.end)}")
    return None


def audience(
    c: Campaign,
    who: Customer,
    *,
    checked: bool = False,
    segments: Mapping[str, rules.Predicate] | None = None,
) -> Outcome | None:
    """Not in the audience (``checked``: a run's snapshot already applied it). With
    ``segments`` the label names the first clause that failed (``explain``)."""
    if c.audience is None or checked:
        return None
    if who.doc is None:
        return _no("ineligible", "audience", "audience: unknown customer")
    if c.audience(who.subject):
        return None
    if segments is not None and c.audience_node is not None:
        return _no("ineligible", "audience", "audience: " + why_not(c.audience_node, who, segments))
    return _no("ineligible", "audience", "audience: rule not met")


def where(c: Campaign, who: Customer) -> Outcome | None:
    """A triggered campaign's condition on the firing event (and profile) not met."""
    if c.where is None or who.event is None or c.where(who.subject):
        return None
    return _no("ineligible", "where", "where: trigger condition not met")


def treatment(c: Campaign, who: Customer) -> tuple[Treatment, bool] | Outcome:
    """The first treatment whose tier matches (a tier fit), else the stable weighted split of
    the untiered ones."""
    if who.doc is not None:
        for t in c.tiers:
            assert t.tier is not None
            if t.tier(who.subject):
                return t, True
    if not c.plain:
        return _no("ineligible", "treatment", "treatments: no tier matches")
    return arbitration.by_weight(who.customer_id, c.campaign_id, c.plain), False


def offer(t: Treatment, offers: Mapping[str, Offer], now: datetime) -> Offer | Outcome:
    """The treatment's offer, if it exists and is valid now."""
    o = offers.get(t.offer_id)
    if o is None:
        return _no("ineligible", "offer", f"offer: {t.offer_id} missing")
    if not o.valid_at(now):
        return _no("ineligible", "offer", f"offer: {t.offer_id} not valid now")
    return o


def reach(c: Campaign, who: Customer) -> tuple[str, ...] | Outcome:
    """The campaign's channels, in its order, with the customer's consent and an address."""
    if who.doc is None:
        return _no("suppressed", "unknown", "no profile (erased?)")
    consents = who.doc.get("consents") or {}
    allowed = [ch for ch in c.channels if consents.get(ch) is True]
    if not allowed:
        return _no("suppressed", "consent", "consent: no consent for any channel")
    reachable = tuple(ch for ch in allowed if address(who.doc, ch) is not None)
    if not reachable:
        return _no("suppressed", "unreachable", f"unreachable: no address for {allowed}")
    return reachable


def control(c: Campaign, who: Customer, policy: Policy) -> tuple[ControlKind, str] | None:
    """In the global hold-out (known customers only) or the campaign's control group."""
    if who.doc is not None and arbitration.in_global_control(
        who.customer_id, policy.global_control
    ):
        return "global", "control: global control group"
    if arbitration.in_control(who.customer_id, c.campaign_id, c.control_group):
        return "campaign", f"control: campaign control group ({c.control_group:.0%})"
    return None


def eligible(
    c: Campaign,
    who: Customer,
    *,
    offers: Mapping[str, Offer],
    policy: Policy,
    now: datetime,
    outbound: bool,
    audience_checked: bool = False,
    segments: Mapping[str, rules.Predicate] | None = None,
) -> Candidate | Outcome:
    """Every eligibility step in order: a candidate (marked when held out as control), or
    the outcome of the first step that turned the customer away."""
    out = schedule(c, now) or audience(c, who, checked=audience_checked, segments=segments)
    out = out or where(c, who)
    if out is not None:
        return out
    picked = treatment(c, who)
    if isinstance(picked, Outcome):
        return picked
    t, fit = picked
    o = offer(t, offers, now)
    if isinstance(o, Outcome):
        o.treatment = t.id
        return o
    cand = Candidate(c, t, o, fit)
    if outbound:
        channels = reach(c, who)
        if isinstance(channels, Outcome):
            channels.treatment = t.id
            return channels
        cand.channels = channels
    held = control(c, who, policy)
    if held is not None:
        cand.control, cand.control_label = held
    return cand


def redo(
    c: Campaign,
    who: Customer,
    channel: str,
    *,
    offers: Mapping[str, Offer],
    now: datetime,
) -> Candidate | Outcome:
    """A contact the ledger already holds on ``channel`` (a redelivered event, a resumed run's
    page, a timer tried again) was decided the first time: eligibility is not asked again
    (the profile may have changed since, but the contact went out), only the treatment and
    offer are read again to rebuild its messages, with the same ids."""
    picked = treatment(c, who)
    if isinstance(picked, Outcome):
        return picked
    t, fit = picked
    o = offer(t, offers, now)
    if isinstance(o, Outcome):
        o.treatment = t.id
        return o
    return Candidate(c, t, o, fit, channels=(channel,))


def held_out(cand: Candidate) -> Outcome:
    """The outcome of a candidate held out as control."""
    return Outcome("control", "control", cand.control_label, treatment=cand.treatment.id)


# -- ranking -------------------------------------------------------------------------------
def rank(
    cands: list[Candidate],
    stats: Sequence[tuple[float, float]],
    rng: random.Random,
    explore: float,
) -> None:
    """Score candidates from their (offer, treatment) (successes, failures) and sort them
    best first, or at random ``explore`` of the time."""
    for cand, (s, f) in zip(cands, stats, strict=True):
        cand.score = arbitration.score(
            cand.campaign.priority,
            arbitration.propensity(s, f, rng),
            cand.offer.value,
            cand.tier_fit,
        )
    if rng.random() < explore:
        rng.shuffle(cands)
    else:
        cands.sort(key=lambda c: -c.score)


def outranked(cand: Candidate) -> Outcome:
    return Outcome(
        "outranked", "outranked", "outranked: limit reached", treatment=cand.treatment.id
    )


# -- the ledger ----------------------------------------------------------------------------
def caps(ledger: Ledger, customer_id: str, c: Campaign, channel: str, policy: Policy) -> list[Cap]:
    """Every cap one contact over ``channel`` (or at a touchpoint) must respect. The first is
    the channel's own log (never full): what makes a reservation idempotent."""
    out = [Cap(ledger.channel_key(customer_id, channel), NEVER, HISTORY_S, "", "log")]
    for r in policy.caps:
        if r.applies(channel):
            out.append(
                Cap(
                    ledger.channel_key(customer_id, r.channel),
                    r.max,
                    r.per_s,
                    r.label,
                    "policy",
                    r.on_cap,
                )
            )
    # Every contact also goes into the campaign's 90-day history, which ``contacted`` clauses
    # read (a cap that never binds).
    out.append(Cap(ledger.history_key(customer_id, c.campaign_id), NEVER, HISTORY_S, "", "log"))
    if c.reentry is not None:
        out.append(
            Cap(
                ledger.campaign_key(customer_id, c.campaign_id),
                c.reentry.max,
                c.reentry.per_s,
                c.reentry.label,
                "reentry",
            )
        )
    return out


def blocked(res: Reserved, cand: Candidate) -> Outcome:
    """The outcome of a reservation every option of which was full: the first option's cap."""
    first = res.blocked[0] if res.blocked else None
    out = _no("suppressed", first.kind if first else "policy", first.label if first else "policy")
    out.treatment = cand.treatment.id
    return out


def deferrable(res: Reserved) -> Cap | None:
    """The first full cap whose policy says to wait rather than drop."""
    return next((c for c in res.blocked if c is not None and c.on_cap == "defer"), None)


def quiet_until(policy: Policy, tz: str | None, now: datetime) -> datetime | None:
    """The end of the quiet hours the customer is in now (their time zone), else None."""
    if policy.quiet_hours is None:
        return None
    start, end = policy.quiet_hours
    local = now.astimezone(_zone(tz))
    t = local.time()
    inside = (start <= t < end) if start <= end else (t >= start or t < end)
    if not inside:
        return None
    day = local.date() if t < end else local.date() + timedelta(days=1)
    wall = datetime.combine(day, end)
    return wall.replace(tzinfo=local.tzinfo).astimezone(UTC)


def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


# -- content -------------------------------------------------------------------------------
def content(o: Offer, channel: str, who: Customer) -> dict[str, str] | Outcome:
    """The offer's content for the channel rendered for this customer; a template that fails
    for them skips the contact."""
    try:
        return templating.render(o.content, channel, dict(who.doc or {}), who.event)
    except Exception as exc:  # the sandbox refused, or a filter failed on their data
        return _no("suppressed", "content", f"content: {exc}")


# -- reading a profile ---------------------------------------------------------------------
def address(doc: Mapping[str, Any], channel: str) -> dict[str, Any] | None:
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


def why_not(node: rules.Node, who: Customer, segments: Mapping[str, rules.Predicate]) -> str:
    """A person's reason for the first clause that failed."""

    def resolve(sid: str) -> rules.Predicate:
        return segments.get(sid) or (lambda _s: False)

    subject = who.subject
    if isinstance(node, rules.All):
        for child in node.children:
            if not rules.compile_rule(child, resolve_segment=resolve)(subject):
                return why_not(child, who, segments)
    if isinstance(node, rules.Tag):
        return f"tag {node.name} missing"
    if isinstance(node, rules.Consent):
        return f"no {node.channel} consent"
    if isinstance(node, rules.Attr):
        have = (subject.profile.get("attributes") or {}).get(node.name)
        return f"attribute {node.name} is {have!r}, needs {node.op} {node.value!r}"
    if isinstance(node, rules.EventCount):
        n = subject.count(node.event, node.within)
        return f"{node.event} {n}× in {node.within}, needs {node.op} {node.count}"
    if isinstance(node, rules.Not):
        return "excluded by a 'not' clause"
    if isinstance(node, rules.SegmentRef):
        return f"not in segment {node.segment_id}"
    return "rule not met"
