"""The next best offer at a touchpoint: the pipeline's steps over the active catalog.

A decision reads the customer's projection from Redis, runs every campaign of the touchpoint
through the eligibility steps, ranks the candidates, reserves the contact in the ledger
(atomic caps) in rank order, renders the content, and records every offered and control
contact as ``contact.recorded``. No database write on the request path.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from services.decision import messages
from services.decision.pipeline import counts, steps
from services.decision.pipeline.catalog import Catalog
from services.decision.pipeline.model import Campaign
from services.decision.pipeline.steps import Candidate, Customer, Outcome
from services.decision.policy.ledger import Ledger
from shared import rules
from shared.bus import Bus
from shared.contracts import catalog as api
from shared.events import CloudEvent
from shared.redis import Keys, read_projections


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

    def set_catalog(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.loaded.set()

    # -- what the steps read from Redis -------------------------------------------------
    async def contacted(
        self, customer_ids: Sequence[str], campaigns: Iterable[Campaign], now: datetime
    ) -> list[dict[tuple[str, str], bool]]:
        """Per customer, the answer to every ``contacted`` clause these campaigns read, in one
        round trip (none when no campaign reads one)."""
        wanted = sorted({ref for c in campaigns for ref in c.contacted})
        if not wanted or not customer_ids:
            return [{} for _ in customer_ids]
        now_ms = int(now.timestamp() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for cid in customer_ids:
                for camp, within in wanted:
                    since = now_ms - rules.parse_duration(within) * 1000
                    pipe.zcount(self.ledger.history_key(cid, camp), since, "+inf")
            raw = await pipe.execute()
        n = len(wanted)
        return [
            {ref: int(x) > 0 for ref, x in zip(wanted, raw[i * n : (i + 1) * n], strict=True)}
            for i in range(len(customer_ids))
        ]

    async def rank(self, cands: list[Candidate]) -> None:
        """Read each candidate's (offer, treatment) statistics, then rank them (step)."""
        if not cands:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for c in cands:
                pipe.hmget(self.keys("propensity", c.offer.offer_id, c.treatment.id), ["s", "f"])
            raw: Sequence[Any] = await pipe.execute()
        stats = [(float(s or 0), float(f or 0)) for s, f in raw]
        steps.rank(cands, stats, self.rng, self.explore)

    # -- the touchpoint decision ----------------------------------------------------------
    async def decide(
        self, req: api.DecisionRequest, *, explain: bool, dry_run: bool
    ) -> api.DecisionResponse:
        now = datetime.now(UTC)
        cat = self.catalog
        (doc,) = await read_projections(self.redis, self.keys, [req.customer_id])
        campaigns = cat.by_touchpoint.get(req.touchpoint, ())
        (seen,) = await self.contacted([req.customer_id], campaigns, now)
        who = Customer.of(req.customer_id, doc, now, contacted=seen)
        considered: list[tuple[Campaign, Outcome, float | None]] = []
        candidates: list[Candidate] = []
        controls: list[Candidate] = []
        for camp in campaigns:
            got = steps.eligible(
                camp,
                who,
                offers=cat.offers,
                policy=cat.policy,
                now=now,
                outbound=False,
                segments=cat.segments if explain else None,
            )
            if isinstance(got, Outcome):
                self._considered(considered, camp, got)
            elif got.control is not None:
                controls.append(got)
                self._considered(considered, camp, steps.held_out(got))
            else:
                candidates.append(got)
        await self.rank(candidates)
        offers: list[api.DecidedOffer] = []
        records: list[tuple[str, CloudEvent]] = []
        decision_id = str(uuid.uuid4())
        now_ms = int(now.timestamp() * 1000)
        for cand in candidates:
            camp = cand.campaign
            if len(offers) >= req.limit:
                self._considered(considered, camp, steps.outranked(cand), cand.score)
                continue
            tracking = secrets.token_urlsafe(16)
            caps = steps.caps(self.ledger, req.customer_id, camp, req.touchpoint, cat.policy)
            full = (
                await self.ledger.room(caps, now_ms)
                if dry_run
                else await self.ledger.reserve(caps, tracking, now_ms)
            )
            if full is not None:
                out = Outcome("suppressed", full.kind, full.label, treatment=cand.treatment.id)
                self._considered(considered, camp, out, cand.score)
                continue
            content = steps.content(cand.offer, req.touchpoint, who)
            if isinstance(content, Outcome):
                self._considered(considered, camp, content)
                continue
            offers.append(
                api.DecidedOffer(
                    tracking_id=tracking,
                    offer_id=cand.offer.offer_id,
                    campaign_id=camp.campaign_id,
                    treatment=cand.treatment.id,
                    score=round(cand.score, 4),
                    content=content,
                    link=cand.offer.link,
                )
            )
            out = Outcome("offered", "offered", "offered", treatment=cand.treatment.id)
            self._considered(considered, camp, out, cand.score)
            records.append(self._record(req, decision_id, cand, tracking, now))
        for cand in controls:
            records.append(self._record(req, decision_id, cand, secrets.token_urlsafe(16), now))
        if records and not dry_run:
            await self.bus.publish_many(records)
        counts.observe_many("decision", (out for _, out, _ in considered))
        return api.DecisionResponse(
            decision_id=decision_id,
            customer_id=req.customer_id,
            touchpoint=req.touchpoint,
            offers=offers,
            explain=(
                [counts.considered(c.campaign_id, o, score) for c, o, score in considered]
                if explain
                else None
            ),
        )

    @staticmethod
    def _considered(
        into: list[tuple[Campaign, Outcome, float | None]],
        camp: Campaign,
        out: Outcome,
        score: float | None = None,
    ) -> None:
        into.append((camp, out, score))

    @staticmethod
    def _record(
        req: api.DecisionRequest,
        decision_id: str,
        cand: Candidate,
        tracking: str,
        now: datetime,
    ) -> tuple[str, CloudEvent]:
        return messages.contact_recorded(
            tracking_id=tracking,
            customer_id=req.customer_id,
            campaign=cand.campaign,
            treatment=cand.treatment,
            offer=cand.offer,
            channel=req.touchpoint,
            at=now,
            control_kind=cand.control,
            decision_id=decision_id,
            touchpoint=req.touchpoint,
            placement=req.placement,
        )
