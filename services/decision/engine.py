"""The next best offer: the active catalog in memory and the decision over it.

Every replica holds the active campaigns (rules compiled once) and reloads them when
``catalog.changed`` or ``segment.changed`` arrives. A decision reads the customer's
projection from Redis, checks each campaign of the touchpoint (schedule, audience,
treatment and offer validity, control groups), ranks the candidates, reserves the
contact in the ledger (atomic caps) in rank order, and records every offered and control
contact as ``contact.recorded``. No database write on the request path.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import sqlalchemy as sa

from services.decision import arbitration, messages, templating
from services.decision.messages import ControlKind
from services.decision.policy.ledger import HISTORY_S, Cap, Ledger
from shared import rules
from shared.bus import Bus
from shared.contracts import catalog as api
from shared.db import Database
from shared.events import CloudEvent, iso
from shared.redis import Keys, read_projections

log = logging.getLogger("kairos.decision.engine")


@dataclass
class Live:
    """One active campaign, compiled."""

    campaign_id: str
    body: dict[str, Any]
    audience: rules.Predicate | None
    audience_node: rules.Node | None
    tiers: list[tuple[dict[str, Any], rules.Predicate]]
    plain: list[dict[str, Any]]
    start: datetime | None
    end: datetime | None
    contacted: frozenset[tuple[str, str]] = frozenset()  # (campaign, within) its rules read
    where: rules.Predicate | None = None  # triggered: the condition on the firing event
    delay_s: int = 0
    unless: tuple[str, int] | None = None  # (event type, window s)
    since: datetime | None = None  # when it last changed (became active)

    @property
    def channels(self) -> list[str]:
        return list(self.body.get("channels") or ())

    @property
    def timed(self) -> bool:
        """Fires later (a delay or an ``unless`` window) rather than on the event itself."""
        return self.delay_s > 0 or self.unless is not None


@dataclass
class Catalog:
    by_touchpoint: dict[str, list[Live]] = field(default_factory=dict)
    by_event: dict[str, list[Live]] = field(default_factory=dict)  # triggered, by event type
    by_unless: dict[str, list[Live]] = field(default_factory=dict)  # by the unless event type
    by_id: dict[str, Live] = field(default_factory=dict)  # every active campaign
    offers: dict[str, dict[str, Any]] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    segments: dict[str, rules.Predicate] = field(default_factory=dict)
    loaded_at: float = 0.0


def _dt(v: Any) -> datetime | None:
    if not v:
        return None
    t = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


async def _segments(selection_url: str, ids: set[str]) -> dict[str, rules.Node]:
    """Segment rules referenced by audiences and tiers, transitively, from selection."""
    out: dict[str, rules.Node] = {}
    todo = set(ids)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while todo:
            sid = todo.pop()
            async with http.get(f"{selection_url}/v1/segments/{sid}") as resp:
                if resp.status == 404:
                    log.warning("segment %s does not exist; it matches nobody", sid)
                    out[sid] = rules.parse({"attr": "__no_such_segment__", "op": "exists"})
                    continue
                resp.raise_for_status()  # selection unavailable: the reload is retried
                node = rules.parse((await resp.json())["rule"])
            out[sid] = node
            todo |= rules.segments_of(node) - set(out)
    return out


def _parse(
    body: dict[str, Any],
) -> tuple[rules.Node | None, list[tuple[dict[str, Any], rules.Node]]]:
    aud = rules.parse(body["audience"]) if body.get("audience") else None
    tiers = [(t, rules.parse(t["tier"])) for t in body["treatments"] if t.get("tier") is not None]
    return aud, tiers


def _refs(body: dict[str, Any]) -> set[str]:
    aud, tiers = _parse(body)
    out: set[str] = set()
    for node in [aud, *(n for _, n in tiers)]:
        if node is not None:
            out |= rules.segments_of(node)
    trig = body.get("trigger") or {}
    if trig.get("where"):
        out |= rules.segments_of(rules.parse(trig["where"]))
    return out


def _resolver(seg_nodes: dict[str, rules.Node]) -> Callable[[str], rules.Predicate]:
    compiled: dict[str, rules.Predicate] = {}

    def resolve(sid: str) -> rules.Predicate:
        if sid not in compiled:
            compiled[sid] = rules.compile_rule(seg_nodes[sid], resolve_segment=resolve)
        return compiled[sid]

    return resolve


def compile_live(
    cid: str,
    body: dict[str, Any],
    seg_nodes: dict[str, rules.Node],
    resolve: Callable[[str], rules.Predicate],
) -> Live:
    """One campaign compiled: audience, tiers, trigger condition, timing."""
    aud, tiers = _parse(body)
    sched = body.get("schedule") or {}
    live = Live(
        campaign_id=cid,
        body=body,
        audience=rules.compile_rule(aud, resolve_segment=resolve) if aud else None,
        audience_node=aud,
        tiers=[(t, rules.compile_rule(n, resolve_segment=resolve)) for t, n in tiers],
        plain=[t for t in body["treatments"] if t.get("tier") is None],
        start=_dt(sched.get("start")),
        end=_dt(sched.get("end")),
        contacted=frozenset(
            (n.campaign, n.within)
            for root in [aud, *(n for _, n in tiers), *seg_nodes.values()]
            if root is not None
            for n in rules.walk(root)
            if isinstance(n, rules.Contacted)
        ),
    )
    trig = body.get("trigger") if body.get("type") == "triggered" else None
    if trig:
        live.where = (
            rules.compile_rule(rules.parse(trig["where"]), resolve_segment=resolve)
            if trig.get("where")
            else None
        )
        live.delay_s = rules.parse_duration(trig.get("delay") or "0s")
        un = trig.get("unless")
        if un:
            live.unless = (un["event"], rules.parse_duration(un["within"]))
    return live


async def compile_one(cid: str, body: dict[str, Any], selection_url: str) -> Live:
    """A campaign in any state compiled on its own (simulate, runs)."""
    refs = _refs(body)
    seg_nodes = await _segments(selection_url, refs) if refs else {}
    return compile_live(cid, body, seg_nodes, _resolver(seg_nodes))


async def load_catalog(db: Database, selection_url: str) -> Catalog:
    async with db.sessions() as s:
        camps = (
            await s.execute(
                sa.text(
                    "SELECT campaign_id, body, updated_at FROM decision.campaign "
                    "WHERE state = 'active'"
                )
            )
        ).all()
        offers = (await s.execute(sa.text("SELECT offer_id, body FROM decision.offer"))).all()
        pol = (await s.execute(sa.text("SELECT body FROM decision.contact_policy"))).scalar()
    refs: set[str] = set()
    for _, body, _ in camps:
        refs |= _refs(body)
    seg_nodes = await _segments(selection_url, refs) if refs else {}
    resolve = _resolver(seg_nodes)
    cat = Catalog(offers={o: b for o, b in offers}, policy=pol or {}, loaded_at=time.time())
    cat.segments = {sid: resolve(sid) for sid in seg_nodes}
    for cid, body, updated_at in camps:
        live = compile_live(cid, body, seg_nodes, resolve)
        live.since = updated_at
        if body.get("type") == "triggered" and body.get("trigger"):
            cat.by_event.setdefault(body["trigger"]["event"], []).append(live)
            if live.unless is not None:
                cat.by_unless.setdefault(live.unless[0], []).append(live)
        cat.by_id[cid] = live
        for tp in body.get("touchpoints") or ():
            cat.by_touchpoint.setdefault(tp, []).append(live)
    return cat


def why_not(node: rules.Node, subject: rules.Subject, segments: dict[str, rules.Predicate]) -> str:
    """A person's reason for the first clause that failed."""

    def resolve(sid: str) -> rules.Predicate:
        return segments.get(sid) or (lambda _s: False)

    if isinstance(node, rules.All):
        for c in node.children:
            if not rules.compile_rule(c, resolve_segment=resolve)(subject):
                return why_not(c, subject, segments)
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


@dataclass
class Candidate:
    live: Live
    treatment: dict[str, Any]
    offer_id: str
    offer: dict[str, Any]
    tier_fit: bool
    score: float = 0.0


class Engine:
    def __init__(
        self, redis: Any, keys: Keys, bus: Bus, ledger: Ledger, *, explore: float = 0.05
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.bus = bus
        self.ledger = ledger
        self.catalog = Catalog()
        self.explore = explore
        self.rng = random.Random()
        # Set once a catalog has been loaded: until then triggers, timers and runs wait
        # (an empty catalog would drop what they hold).
        self.loaded = asyncio.Event()

    def caps(self, customer_id: str, live: Live, channel: str) -> list[Cap]:
        """Every cap one contact over ``channel`` (or at a touchpoint) must respect. The first
        is the channel's own log (never full): what makes a reservation idempotent."""
        caps = [Cap(self.ledger.channel_key(customer_id, channel), 10**9, HISTORY_S, "", "log")]
        for r in self.catalog.policy.get("rules") or ():
            if r["channel"] in ("*", channel):
                caps.append(
                    Cap(
                        self.ledger.channel_key(customer_id, r["channel"]),
                        int(r["max"]),
                        rules.parse_duration(r["per"]),
                        f"policy: {r['channel']} {r['max']}/{r['per']} reached",
                        "policy",
                        r.get("on_cap") or "drop",
                    )
                )
        # Every contact also goes into the campaign's 90-day history, which ``contacted``
        # clauses read (a cap that never binds).
        caps.append(
            Cap(self.ledger.history_key(customer_id, live.campaign_id), 10**9, HISTORY_S, "", "log")
        )
        re = live.body.get("reentry")
        if re:
            caps.append(
                Cap(
                    self.ledger.campaign_key(customer_id, live.campaign_id),
                    int(re["max"]),
                    rules.parse_duration(re["per"]),
                    f"reentry: {re['max']} per {re['per']} reached",
                    "reentry",
                )
            )
        return caps

    async def decide(
        self, req: api.DecisionRequest, *, explain: bool, dry_run: bool
    ) -> api.DecisionResponse:
        now = datetime.now(UTC)
        (doc,) = await read_projections(self.redis, self.keys, [req.customer_id])
        lives = self.catalog.by_touchpoint.get(req.touchpoint, ())
        seen = await self._contacted(req.customer_id, lives, now)
        subject = rules.Subject(doc or {}, now=now, contacted=lambda c, w: seen.get((c, w), False))
        considered: list[api.Considered] = []
        candidates: list[Candidate] = []
        controls: list[tuple[Candidate, ControlKind]] = []
        policy = self.catalog.policy
        global_ctl = doc is not None and arbitration.in_global_control(
            req.customer_id, float(policy.get("global_control") or 0)
        )
        for live in lives:
            cid = live.campaign_id

            def out(outcome: str, reason: str, cid: str = cid) -> None:
                considered.append(api.Considered(campaign_id=cid, outcome=outcome, reason=reason))  # type: ignore[arg-type]

            if live.start and now < live.start:
                out("ineligible", f"schedule: starts {iso(live.start)}")
                continue
            if live.end and now >= live.end:
                out("ineligible", f"schedule: ended {iso(live.end)}")
                continue
            if live.audience is not None:
                if doc is None:
                    out("ineligible", "audience: unknown customer")
                    continue
                if not live.audience(subject):
                    assert live.audience_node is not None
                    out(
                        "ineligible",
                        "audience: " + why_not(live.audience_node, subject, self.catalog.segments),
                    )
                    continue
            treatment, fit = None, False
            for t, pred in live.tiers:
                if doc is not None and pred(subject):
                    treatment, fit = t, True
                    break
            if treatment is None:
                if not live.plain:
                    out("ineligible", "treatments: no tier matches")
                    continue
                treatment = arbitration.by_weight(req.customer_id, cid, live.plain)
            offer = self.catalog.offers.get(treatment["offer"])
            if offer is None:
                out("ineligible", f"offer: {treatment['offer']} missing")
                continue
            vf, vt = _dt(offer.get("valid_from")), _dt(offer.get("valid_to"))
            if (vf and now < vf) or (vt and now >= vt):
                out("ineligible", f"offer: {treatment['offer']} not valid now")
                continue
            cand = Candidate(live, treatment, treatment["offer"], offer, fit)
            if global_ctl:
                controls.append((cand, "global"))
                out("control", "control: global control group")
                continue
            if arbitration.in_control(
                req.customer_id, cid, float(live.body.get("control_group") or 0)
            ):
                controls.append((cand, "campaign"))
                out(
                    "control", f"control: campaign control group ({live.body['control_group']:.0%})"
                )
                continue
            candidates.append(cand)
        await self.rank(candidates)
        offers: list[api.DecidedOffer] = []
        records: list[tuple[str, CloudEvent]] = []
        decision_id = str(uuid.uuid4())
        now_ms = int(now.timestamp() * 1000)
        for cand in candidates:
            cid = cand.live.campaign_id
            if len(offers) >= req.limit:
                considered.append(
                    api.Considered(
                        campaign_id=cid,
                        outcome="outranked",
                        reason="outranked: limit reached",
                        score=round(cand.score, 4),
                    )
                )
                continue
            tracking = secrets.token_urlsafe(16)
            caps = self.caps(req.customer_id, cand.live, req.touchpoint)
            full = (
                await self.ledger.room(caps, now_ms)
                if dry_run
                else await self.ledger.reserve(caps, tracking, now_ms)
            )
            if full is not None:
                considered.append(
                    api.Considered(
                        campaign_id=cid,
                        outcome="suppressed",
                        reason=full.label,
                        score=round(cand.score, 4),
                    )
                )
                continue
            try:
                content = templating.render(cand.offer["content"], req.touchpoint, doc or {}, None)
            except Exception as exc:  # a template that fails for this customer: skip it
                considered.append(
                    api.Considered(campaign_id=cid, outcome="ineligible", reason=f"content: {exc}")
                )
                continue
            offers.append(
                api.DecidedOffer(
                    tracking_id=tracking,
                    offer_id=cand.offer_id,
                    campaign_id=cid,
                    treatment=cand.treatment["id"],
                    score=round(cand.score, 4),
                    content=content,
                    link=cand.offer.get("link"),
                )
            )
            considered.append(
                api.Considered(
                    campaign_id=cid, outcome="offered", reason="offered", score=round(cand.score, 4)
                )
            )
            records.append(self._record(req, decision_id, cand, tracking, now))
        for cand, kind in controls:
            records.append(
                self._record(req, decision_id, cand, secrets.token_urlsafe(16), now, control=kind)
            )
        if records and not dry_run:
            await self.bus.publish_many(records)
        return api.DecisionResponse(
            decision_id=decision_id,
            customer_id=req.customer_id,
            touchpoint=req.touchpoint,
            offers=offers,
            explain=considered if explain else None,
        )

    async def _contacted(
        self, customer_id: str, lives: Sequence[Live], now: datetime
    ) -> dict[tuple[str, str], bool]:
        """Answers for every ``contacted`` clause of these campaigns, in one round trip."""
        wanted = sorted({ref for live in lives for ref in live.contacted})
        if not wanted:
            return {}
        now_ms = int(now.timestamp() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for camp, within in wanted:
                since = now_ms - rules.parse_duration(within) * 1000
                pipe.zcount(self.ledger.history_key(customer_id, camp), since, "+inf")
            counts = await pipe.execute()
        return {ref: int(n) > 0 for ref, n in zip(wanted, counts, strict=True)}

    async def rank(self, cands: list[Any]) -> None:
        """Score candidates (anything with live, treatment, offer, tier_fit, score) and sort
        them best first (or at random, ``explore`` of the time)."""
        if not cands:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for c in cands:
                pipe.hmget(
                    self.keys("propensity", c.treatment["offer"], c.treatment["id"]), ["s", "f"]
                )
            stats: Sequence[Any] = await pipe.execute()
        for c, (s, f) in zip(cands, stats, strict=True):
            p = arbitration.propensity(float(s or 0), float(f or 0), self.rng)
            c.score = arbitration.score(
                int(c.live.body.get("priority", 50)),
                p,
                float(c.offer.get("value", 1.0)),
                c.tier_fit,
            )
        if self.rng.random() < self.explore:
            self.rng.shuffle(cands)
        else:
            cands.sort(key=lambda c: -c.score)

    def _record(
        self,
        req: api.DecisionRequest,
        decision_id: str,
        cand: Candidate,
        tracking: str,
        now: datetime,
        *,
        control: ControlKind | None = None,
    ) -> tuple[str, CloudEvent]:
        return messages.contact_recorded(
            tracking_id=tracking,
            customer_id=req.customer_id,
            campaign=cand.live.body,
            campaign_id=cand.live.campaign_id,
            treatment=cand.treatment,
            offer=cand.offer,
            channel=req.touchpoint,
            at=now,
            control_kind=control,
            decision_id=decision_id,
            touchpoint=req.touchpoint,
            placement=req.placement,
        )


async def refresh_forever(
    engine: Engine, db: Database, selection_url: str, wake: asyncio.Event
) -> None:
    """Reload the catalog whenever woken (a catalog or segment change), at most ~20×/s."""
    while True:
        await wake.wait()
        wake.clear()
        try:
            engine.catalog = await load_catalog(db, selection_url)
            engine.loaded.set()
        except Exception as exc:  # keep serving the catalog in hand; retry shortly
            log.warning("catalog reload failed: %s", exc)
            await asyncio.sleep(1.0)
            wake.set()
        await asyncio.sleep(0.05)
