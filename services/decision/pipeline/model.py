"""The catalog as the pipeline reads it: typed values, parsed and compiled once when the catalog
loads, so no step reads a stored document (``body.get``) while deciding."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, time
from typing import Any, Literal

from shared import rules
from shared.contracts import catalog as api
from shared.contracts.bus import Conversion, Reward

CampaignType = Literal["realtime", "triggered", "batch"]


@dataclass(frozen=True, slots=True)
class Offer:
    """An offer: what ranking, validity, content and the messages read of it."""

    offer_id: str
    value: float = 1.0
    link: str | None = None
    valid_from: datetime | None = None
    valid_to: datetime | None = None
    content: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    reward: Reward | None = None

    @classmethod
    def parse(cls, offer_id: str, body: Mapping[str, Any]) -> Offer:
        """From a stored ``OfferPut`` document (validated again: a row is never trusted)."""
        p = api.OfferPut.model_validate(body)
        return cls(
            offer_id=offer_id,
            value=p.value,
            link=p.link,
            valid_from=_aware(p.valid_from),
            valid_to=_aware(p.valid_to),
            content=p.content.model_dump(mode="json", exclude_none=True),
            reward=Reward(type=p.reward.type, amount=p.reward.amount) if p.reward else None,
        )

    def valid_at(self, now: datetime) -> bool:
        return not (
            (self.valid_from is not None and now < self.valid_from)
            or (self.valid_to is not None and now >= self.valid_to)
        )


@dataclass(frozen=True, slots=True)
class Treatment:
    """One arm of a campaign: its offer, its share of the split, and its tier rule."""

    id: str
    offer_id: str
    weight: float = 1.0
    tier: rules.Predicate | None = None


@dataclass(frozen=True, slots=True)
class CapRule:
    """At most ``max`` contacts per ``per_s`` on ``channel`` ('*', a channel or a
    touchpoint); ``on_cap`` says whether a blocked contact is dropped or deferred."""

    channel: str
    max: int
    per_s: int
    label: str
    on_cap: Literal["drop", "defer"] = "drop"

    def applies(self, channel: str) -> bool:
        return self.channel in ("*", channel)


@dataclass(frozen=True, slots=True)
class Policy:
    """The contact policy: caps, quiet hours (local wall-clock times) and the global hold-out."""

    caps: tuple[CapRule, ...] = ()
    quiet_hours: tuple[time, time] | None = None
    global_control: float = 0.0

    @classmethod
    def parse(cls, body: Mapping[str, Any] | None) -> Policy:
        p = api.ContactPolicy.model_validate(body or {})
        return cls(
            caps=tuple(
                CapRule(
                    r.channel,
                    r.max,
                    rules.parse_duration(r.per),
                    f"policy: {r.channel} {r.max}/{r.per} reached",
                    r.on_cap,
                )
                for r in p.rules
            ),
            quiet_hours=(
                (time.fromisoformat(p.quiet_hours.start), time.fromisoformat(p.quiet_hours.end))
                if p.quiet_hours
                else None
            ),
            global_control=p.global_control,
        )


@dataclass(frozen=True, slots=True)
class Reentry:
    max: int
    per_s: int
    label: str


@dataclass(slots=True)
class Campaign:
    """One campaign, compiled: its rules are predicates, its durations seconds."""

    campaign_id: str
    type: CampaignType = "realtime"
    priority: int = 50
    audience: rules.Predicate | None = None
    audience_node: rules.Node | None = None  # for explaining which clause failed
    tiers: tuple[Treatment, ...] = ()  # treatments with a tier rule, in order
    plain: tuple[Treatment, ...] = ()  # the others, split by weight
    start: datetime | None = None
    end: datetime | None = None
    cron: str | None = None
    timezone: str = "UTC"
    touchpoints: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    control_group: float = 0.0
    reentry: Reentry | None = None
    conversion: Conversion | None = None
    contacted: frozenset[tuple[str, str]] = frozenset()  # (campaign, within) its rules read
    # triggered campaigns
    event: str | None = None
    where: rules.Predicate | None = None  # the condition on the firing event
    delay_s: int = 0
    unless: tuple[str, int] | None = None  # (event type, window s)
    exclusive: bool = True
    since: datetime | None = None  # when it last changed (became active)

    @property
    def timed(self) -> bool:
        """Fires later (a delay or an ``unless`` window) rather than on the event itself."""
        return self.delay_s > 0 or self.unless is not None


def refs(body: Mapping[str, Any]) -> set[str]:
    """The segments a stored campaign's rules name directly."""
    p = api.CampaignPut.model_validate(body)
    out: set[str] = set()
    docs = [p.audience, *(t.tier for t in p.treatments), p.trigger.where if p.trigger else None]
    for doc in docs:
        if doc is not None:
            out |= rules.segments_of(rules.parse(doc))
    return out


def compile_campaign(
    campaign_id: str,
    body: Mapping[str, Any],
    seg_nodes: Mapping[str, rules.Node],
    resolve: Callable[[str], rules.Predicate],
    *,
    since: datetime | None = None,
) -> Campaign:
    """A stored ``CampaignPut`` document, validated and compiled once."""
    p = api.CampaignPut.model_validate(body)

    def compiled(doc: Any) -> tuple[rules.Node, rules.Predicate]:
        node = rules.parse(doc)
        return node, rules.compile_rule(node, resolve_segment=resolve)

    aud_node, aud = compiled(p.audience) if p.audience is not None else (None, None)
    tiers: list[Treatment] = []
    plain: list[Treatment] = []
    nodes: list[rules.Node] = [aud_node] if aud_node is not None else []
    for t in p.treatments:
        if t.tier is None:
            plain.append(Treatment(t.id, t.offer, t.weight))
            continue
        node, pred = compiled(t.tier)
        nodes.append(node)
        tiers.append(Treatment(t.id, t.offer, t.weight, pred))
    camp = Campaign(
        campaign_id=campaign_id,
        type=p.type,
        priority=p.priority,
        audience=aud,
        audience_node=aud_node,
        tiers=tuple(tiers),
        plain=tuple(plain),
        start=_aware(p.schedule.start),
        end=_aware(p.schedule.end),
        cron=p.schedule.cron,
        timezone=p.schedule.timezone,
        touchpoints=tuple(p.touchpoints),
        channels=tuple(p.channels),
        control_group=p.control_group,
        reentry=(
            Reentry(
                p.reentry.max,
                rules.parse_duration(p.reentry.per),
                f"reentry: {p.reentry.max} per {p.reentry.per} reached",
            )
            if p.reentry
            else None
        ),
        conversion=(
            Conversion(event=p.conversion.event, within=p.conversion.within)
            if p.conversion
            else None
        ),
        contacted=frozenset(
            (n.campaign, n.within)
            for root in [*nodes, *seg_nodes.values()]
            for n in rules.walk(root)
            if isinstance(n, rules.Contacted)
        ),
        since=since,
    )
    if p.type == "triggered" and p.trigger is not None:
        trig = p.trigger
        camp.event = trig.event
        camp.where = compiled(trig.where)[1] if trig.where is not None else None
        camp.delay_s = rules.parse_duration(trig.delay)
        camp.exclusive = trig.exclusive
        if trig.unless is not None:
            camp.unless = (trig.unless.event, rules.parse_duration(trig.unless.within))
    return camp


def _aware(t: datetime | None) -> datetime | None:
    if t is None:
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)
