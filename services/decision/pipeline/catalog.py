"""The active catalog every replica holds in memory: loaded, typed and compiled once, and
reloaded when ``catalog.changed`` or ``segment.changed`` arrives."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from pydantic import ValidationError

from services.decision.catalog.repository import CatalogRows
from services.decision.pipeline.model import Campaign, Offer, Policy, compile_campaign, refs
from shared import rules
from shared.db import Database

log = logging.getLogger("kairos.decision.catalog")


@dataclass
class Catalog:
    by_touchpoint: dict[str, list[Campaign]] = field(default_factory=dict)
    by_event: dict[str, list[Campaign]] = field(default_factory=dict)  # triggered, by event type
    by_unless: dict[str, list[Campaign]] = field(default_factory=dict)  # by the unless event
    by_id: dict[str, Campaign] = field(default_factory=dict)  # every active campaign
    offers: dict[str, Offer] = field(default_factory=dict)
    policy: Policy = field(default_factory=Policy)
    segments: dict[str, rules.Predicate] = field(default_factory=dict)
    loaded_at: float = 0.0
    read_at: float = 0.0  # ``time.monotonic()`` before its rows were read

    def acts_on(self, event_type: str) -> bool:
        """Whether an event of this type fires a trigger or cancels one."""
        return event_type in self.by_event or event_type in self.by_unless

    def event_types(self) -> set[str]:
        """Every event type the triggers act on (the trigger consumer's filter)."""
        return {*self.by_event, *self.by_unless}


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


def _resolver(seg_nodes: Mapping[str, rules.Node]) -> Callable[[str], rules.Predicate]:
    compiled: dict[str, rules.Predicate] = {}

    def resolve(sid: str) -> rules.Predicate:
        if sid not in compiled:
            compiled[sid] = rules.compile_rule(seg_nodes[sid], resolve_segment=resolve)
        return compiled[sid]

    return resolve


async def compile_one(campaign_id: str, body: dict[str, Any], selection_url: str) -> Campaign:
    """A campaign in any state compiled on its own (simulate, runs)."""
    names = refs(body)
    seg_nodes = await _segments(selection_url, names) if names else {}
    return compile_campaign(campaign_id, body, seg_nodes, _resolver(seg_nodes))


async def load_catalog(db: Database, selection_url: str) -> Catalog:
    """Every active campaign, every offer and the policy, typed and compiled."""
    read_at = time.monotonic()
    async with db.sessions() as s:
        rows = CatalogRows(s)
        camps = await rows.active_campaigns()
        offer_rows = await rows.offers()
        policy = await rows.policy()
    names: set[str] = set()
    for cid, body, _ in camps:
        try:
            names |= refs(body)
        except (ValidationError, rules.RuleError, ValueError) as exc:
            log.error("campaign %s is not a valid campaign document, left out: %s", cid, exc)
    seg_nodes = await _segments(selection_url, names) if names else {}
    resolve = _resolver(seg_nodes)
    cat = Catalog(policy=Policy.parse(policy), loaded_at=time.time(), read_at=read_at)
    for oid, body in offer_rows:
        try:
            cat.offers[oid] = Offer.parse(oid, body)
        except ValidationError as exc:
            log.error("offer %s is not a valid offer document, left out: %s", oid, exc)
    cat.segments = {sid: resolve(sid) for sid in seg_nodes}
    for cid, body, updated_at in camps:
        try:
            camp = compile_campaign(cid, body, seg_nodes, resolve, since=updated_at)
        except (ValidationError, rules.RuleError, ValueError):
            continue  # logged above
        if camp.event is not None:
            cat.by_event.setdefault(camp.event, []).append(camp)
            if camp.unless is not None:
                cat.by_unless.setdefault(camp.unless[0], []).append(camp)
        cat.by_id[cid] = camp
        for tp in camp.touchpoints:
            cat.by_touchpoint.setdefault(tp, []).append(camp)
    return cat


async def refresh_forever(
    set_catalog: Callable[[Catalog], Awaitable[None]],
    db: Database,
    selection_url: str,
    wake: asyncio.Event,
) -> None:
    """Reload the catalog whenever woken (a catalog or segment change), at most ~20×/s."""
    while True:
        await wake.wait()
        wake.clear()
        try:
            await set_catalog(await load_catalog(db, selection_url))
        except Exception as exc:  # keep serving the catalog in hand; retry shortly
            log.warning("catalog reload failed: %s", exc)
            await asyncio.sleep(1.0)
            wake.set()
        await asyncio.sleep(0.05)
