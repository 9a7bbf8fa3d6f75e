"""The next best offer at a touchpoint: the pipeline's steps over the active catalog.

A decision reads the customer's projection from Redis, runs every campaign of the touchpoint
through the eligibility steps, ranks the candidates and renders the best ones' content; one
Lua step then reserves their caps in rank order (atomic) and writes the ``contact.recorded``
of every offered and control contact to a Redis stream in the same step, which a relay
takes to JetStream (``shared.stream_outbox``). No database write and no JetStream ack on
the request path, and no contact counted without its record or recorded without its count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from opentelemetry import propagate

from services.decision import messages
from services.decision.pipeline import counts, steps
from services.decision.pipeline.catalog import Catalog
from services.decision.pipeline.model import Campaign
from services.decision.pipeline.propensities import Pair, Propensities
from services.decision.pipeline.steps import Candidate, Customer, Outcome
from services.decision.policy.ledger import Cap, Ledger, Ranked, Record
from shared import rules
from shared.bus import Bus
from shared.contracts import catalog as api
from shared.events import CloudEvent
from shared.redis import Keys, read_projections

log = logging.getLogger("kairos.decision.engine")


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
        self.propensities = Propensities(redis, keys)
        # Set once a catalog has been loaded: until then triggers, timers and runs wait
        # (an empty catalog would drop what they hold).
        self.loaded = asyncio.Event()
        # Set to have the catalog read again (``refresh_forever`` waits on it).
        self.wake = asyncio.Event()
        self._swapped = asyncio.Event()  # set (and replaced) by every new catalog

    def set_catalog(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.loaded.set()
        self._swapped.set()
        self._swapped = asyncio.Event()
        self.propensities.wake.set()  # read the statistics of its new pairs at once

    async def catalog_since_now(self, timeout: float = 10.0) -> Catalog:
        """A catalog read from the database after this call. The catalog follows
        ``catalog.changed`` a moment after each change; a run or a simulation started right
        after its offers were written must not find them missing (its customers would be
        turned away as ``ineligible: offer``). After ``timeout`` (the database or selection
        away), the catalog in hand."""
        asked = time.monotonic()
        self.wake.set()
        deadline = asked + timeout
        while self.catalog.read_at < asked:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("no catalog read within %.0f s; going on with the one in hand", timeout)
                break
            swapped = self._swapped
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(swapped.wait(), left)
        return self.catalog

    def pairs(self) -> list[Pair]:
        """Every (offer, treatment) of the active catalog, whose statistics ranking reads."""
        return [
            (t.offer_id, t.id) for c in self.catalog.by_id.values() for t in (*c.tiers, *c.plain)
        ]

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

    def rank(self, cands: list[Candidate]) -> None:
        """Rank candidates on their (offer, treatment) statistics, held in memory (step)."""
        if not cands:
            return
        of = self.propensities.of
        steps.rank(
            cands, [of(c.offer.offer_id, c.treatment.id) for c in cands], self.rng, self.explore
        )

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
        self.rank(candidates)
        decision_id = str(uuid.uuid4())
        now_ms = int(now.timestamp() * 1000)
        if dry_run:
            offers = await self._look(req, who, candidates, considered, now_ms)
        else:
            offers = await self._offer(
                req, who, candidates, controls, considered, decision_id, now, now_ms
            )
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

    async def _offer(
        self,
        req: api.DecisionRequest,
        who: Customer,
        candidates: list[Candidate],
        controls: list[Candidate],
        considered: list[tuple[Campaign, Outcome, float | None]],
        decision_id: str,
        now: datetime,
        now_ms: int,
    ) -> list[api.DecidedOffer]:
        """Offer the best candidates whose caps have room: content first, then one atomic
        Redis step reserves their caps in rank order and writes their contact records (and
        the control group's) to the outbox stream, which a relay takes to JetStream. A
        second step runs only when a cap was full and more candidates are waiting."""
        trace = self._traceparent()
        held = [
            self._outbox(req, decision_id, cand, secrets.token_urlsafe(16), now, trace)
            for cand in controls
        ]
        offers: list[api.DecidedOffer] = []
        todo = list(candidates)
        while todo and len(offers) < req.limit:
            want = req.limit - len(offers)
            batch: list[tuple[Candidate, str, dict[str, str]]] = []
            while todo and len(batch) < want:
                cand = todo.pop(0)
                content = steps.content(cand.offer, req.touchpoint, who)
                if isinstance(content, Outcome):
                    self._considered(considered, cand.campaign, content)
                    continue
                batch.append((cand, secrets.token_urlsafe(16), content))
            ranked = [
                Ranked(
                    tracking,
                    steps.caps(
                        self.ledger,
                        req.customer_id,
                        cand.campaign,
                        req.touchpoint,
                        self.catalog.policy,
                    ),
                    self._outbox(req, decision_id, cand, tracking, now, trace),
                )
                for cand, tracking, _ in batch
            ]
            results = await self.ledger.reserve_ranked(ranked, want, now_ms, held)
            held = []
            for (cand, tracking, content), full in zip(batch, results, strict=True):
                if isinstance(full, Cap):
                    out = Outcome("suppressed", full.kind, full.label, treatment=cand.treatment.id)
                    self._considered(considered, cand.campaign, out, cand.score)
                    continue
                offers.append(self._decided(cand, tracking, content))
                out = Outcome("offered", "offered", "offered", treatment=cand.treatment.id)
                self._considered(considered, cand.campaign, out, cand.score)
        for cand in todo:
            self._considered(considered, cand.campaign, steps.outranked(cand), cand.score)
        if held:  # no candidate at all: the control group's records still go out
            await self.ledger.reserve_ranked([], 0, now_ms, held)
        return offers

    async def _look(
        self,
        req: api.DecisionRequest,
        who: Customer,
        candidates: list[Candidate],
        considered: list[tuple[Campaign, Outcome, float | None]],
        now_ms: int,
    ) -> list[api.DecidedOffer]:
        """A dry run: what would be offered, looking at the caps without reserving."""
        offers: list[api.DecidedOffer] = []
        for cand in candidates:
            camp = cand.campaign
            if len(offers) >= req.limit:
                self._considered(considered, camp, steps.outranked(cand), cand.score)
                continue
            caps = steps.caps(
                self.ledger, req.customer_id, camp, req.touchpoint, self.catalog.policy
            )
            full = await self.ledger.room(caps, now_ms)
            if full is not None:
                out = Outcome("suppressed", full.kind, full.label, treatment=cand.treatment.id)
                self._considered(considered, camp, out, cand.score)
                continue
            content = steps.content(cand.offer, req.touchpoint, who)
            if isinstance(content, Outcome):
                self._considered(considered, camp, content)
                continue
            offers.append(self._decided(cand, secrets.token_urlsafe(16), content))
            out = Outcome("offered", "offered", "offered", treatment=cand.treatment.id)
            self._considered(considered, camp, out, cand.score)
        return offers

    @staticmethod
    def _decided(cand: Candidate, tracking: str, content: dict[str, str]) -> api.DecidedOffer:
        return api.DecidedOffer(
            tracking_id=tracking,
            offer_id=cand.offer.offer_id,
            campaign_id=cand.campaign.campaign_id,
            treatment=cand.treatment.id,
            score=round(cand.score, 4),
            content=content,
            link=cand.offer.link,
        )

    @staticmethod
    def _traceparent() -> str:
        """The current trace context, carried by the records to the bus (empty when off)."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return carrier.get("traceparent", "")

    def _outbox(
        self,
        req: api.DecisionRequest,
        decision_id: str,
        cand: Candidate,
        tracking: str,
        now: datetime,
        trace: str,
    ) -> Record:
        subject, ev = self._record(req, decision_id, cand, tracking, now)
        return Record(subject, ev.id, ev.to_bytes(), trace)

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
