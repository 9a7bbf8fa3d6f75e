"""Triggered campaigns: events in, dispatch requests (or timers) out.

The consumer ``decision-triggers`` (durable, shared by replicas) reads ``events.>``; the
catalog indexes active triggered campaigns by event type, so an event nobody listens to
costs one dictionary lookup. For an event somebody listens to, the handler waits until the
profile service has applied it (its ``applied:{event id}`` marker, which also names the
customer the event landed on after identity resolution), reads the projection, and:

- cancels the pending ``unless`` timers the event answers (abandoned cart → order placed);
- runs each listening campaign through the pipeline's eligibility steps (schedule, audience,
  ``where``, treatment, offer, consent and reachability, control);
- campaigns without delay or ``unless`` are contacted at once: ranking when several fire on
  one event (one message per event and customer; a campaign with ``trigger.exclusive:
  false`` is sent on its own), channel choice and the ledger;
- campaigns with a ``delay`` or an ``unless`` window become a timer (``timers/``), which
  goes through the same steps when it fires.

``response.recorded`` feeds the same path as an event of type ``response.recorded``
(properties: the response: outcome, choice, campaign …): a survey reply fires the next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.aio.msg import Msg

from services.decision.engine import Engine
from services.decision.messages import parse
from services.decision.outbound import Item, Planner, tracking_id
from services.decision.pipeline import counts
from services.decision.pipeline.steps import Outcome
from services.decision.timers.repository import NewTimer
from services.decision.timers.service import Timers, deferred, fire_timer, when
from shared import counters
from shared.bus import Bus, TransientError
from shared.contracts.bus import EventOccurred, ResponseRecorded
from shared.events import CloudEvent
from shared.redis import APPLIED_TTL_S, PROJECTION_FIELDS, Keys, merge_parts, read_projections

PATIENCE_S = 30.0  # an event the profile never marked (rejected there) is handled anyway
UNAPPLIED_MAX = 100_000  # customers with events fired ahead of the profile, remembered


@dataclass
class Fired:
    """One event about one customer, resolved."""

    customer_id: str
    event: Mapping[str, Any]  # id, type, time, properties
    again: bool = False  # delivered before: its contacts may be in the ledger already
    doc: Mapping[str, Any] | None = None  # the projection with the event in it, if read
    projected: bool = False  # ``doc`` was read (None then means: no such customer)


@dataclass(frozen=True, slots=True)
class _Unapplied:
    """An event fired on "projection + this event", whose marker was not seen yet: the
    customer's next events add it too until the projection has it."""

    event_id: str
    type: str
    at: datetime
    properties: Mapping[str, Any]
    until: float  # monotonic: forgotten after PATIENCE_S


def _again(msg: Msg) -> bool:
    md = msg.metadata
    return md is not None and (md.num_delivered or 1) > 1


def _age_s(msg: Msg) -> float:
    md = msg.metadata
    if md is None or md.timestamp is None:
        return 0.0
    return max(0.0, time.time() - md.timestamp.timestamp())


class Triggers:
    def __init__(
        self,
        engine: Engine,
        timers: Timers,
        redis: Any,
        keys: Keys,
        bus: Bus,
        *,
        marker_wait_s: float = 1.0,
    ) -> None:
        self.engine = engine
        self.timers = timers
        self.planner = Planner(engine)
        self.redis = redis
        self.keys = keys
        self.bus = bus
        self.marker_wait_s = marker_wait_s
        self._unapplied: dict[str, list[_Unapplied]] = {}

    # -- consumers ----------------------------------------------------------------------
    async def handle_events(self, batch: Sequence[tuple[Msg, CloudEvent]]) -> list[Msg]:
        """``events.>``: returns the messages whose profile update has not landed yet."""
        if not self.engine.loaded.is_set():
            raise TransientError("the catalog is not loaded yet")
        cat = self.engine.catalog
        wanted: list[tuple[Msg, CloudEvent, EventOccurred]] = []
        for msg, ev in batch:
            occurred = parse(ev, EventOccurred)
            if cat.acts_on(occurred.type):
                wanted.append((msg, ev, occurred))
        if not wanted:
            return []
        ready, todo = await self._ahead(wanted)
        await self.process(ready)
        if not todo:
            return []
        # The rest (anonymous events, identifying events, new customers, redeliveries) is
        # handled as soon as the profile has applied it, not when the whole batch has: one
        # slow marker does not hold back the events around it. A customer's events still go
        # in the batch's order (an order cancels the cart's timer only if the cart came
        # first), so one waits for that customer's earlier ones.
        later: list[Msg] = []
        known: dict[str, str] = {}
        async for found, missing in self._owners([ev.id for _, ev, _ in todo]):
            known.update(found)
            fired, waiting, held = [], [], set()
            for msg, ev, occurred in todo:
                who = occurred.who()
                if ev.id in missing:
                    if _age_s(msg) < min(PATIENCE_S, APPLIED_TTL_S / 2):
                        later.append(msg)
                    elif who is not None:  # the profile rejected it or forgot: go on
                        fired.append(Fired(who, occurred.as_fired(ev), _again(msg)))
                elif ev.id in known and who not in held:
                    fired.append(Fired(known[ev.id], occurred.as_fired(ev), _again(msg)))
                else:
                    waiting.append((msg, ev, occurred))
                    held.add(who)
            todo = waiting
            await self.process(fired)
        return later

    async def _ahead(
        self, wanted: Sequence[tuple[Msg, CloudEvent, EventOccurred]]
    ) -> tuple[list[Fired], list[tuple[Msg, CloudEvent, EventOccurred]]]:
        """Fire what needs no wait for the profile: events naming a known customer (and no
        anonymous id to fold) are evaluated on "projection + this event".

        The profile sets an event's ``applied`` marker in the same script that writes the
        projection with the event in it, and both are read here in one transaction: with the
        marker, the projection has the event; without it, the event (and the customer's
        earlier ones that were fired the same way and are not applied yet) is added here
        with ``counters.fold_event``, the profile's own rule. Returns the fired events and
        the rest, in order, for the marker wait (``_owners``)."""

        def alone(msg: Msg, occ: EventOccurred) -> bool:
            """Lands on the customer it names: no anonymous history to fold, not redelivered
            (a redelivery's contacts are recalled from the ledger after the marker)."""
            return bool(occ.customer_id) and not occ.anonymous_id and not _again(msg)

        direct = {str(occ.customer_id) for msg, _, occ in wanted if alone(msg, occ)}
        if not direct:
            return [], list(wanted)
        now = datetime.now(UTC)
        mono = time.monotonic()
        customers = sorted(direct)
        in_batch = {ev.id for _, ev, _ in wanted}
        prior = {
            cid: [
                u
                for u in self._unapplied.get(cid, ())
                if u.until > mono and u.event_id not in in_batch
            ]
            for cid in customers
        }
        ids = [*in_batch, *(u.event_id for us in prior.values() for u in us)]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.mget([self.keys.applied(i) for i in ids])
            for cid in customers:
                pipe.hmget(self.keys.profile(cid), list(PROJECTION_FIELDS))
            res = await pipe.execute()
        marks = {
            i: (v.decode() if isinstance(v, bytes) else str(v))
            for i, v in zip(ids, res[0], strict=True)
            if v is not None
        }
        view: dict[str, dict[str, Any] | None] = {}
        for cid, raw in zip(customers, res[1:], strict=True):
            doc = merge_parts(raw)
            left = [u for u in prior[cid] if u.event_id not in marks]
            if doc is not None:
                for u in left:
                    doc = counters.fold_event(doc, u.type, u.at, u.properties, now)
            view[cid] = doc
            if left:
                self._unapplied[cid] = left
            else:
                self._unapplied.pop(cid, None)
        ready: list[Fired] = []
        rest: list[tuple[Msg, CloudEvent, EventOccurred]] = []
        held: set[str | None] = set()
        for msg, ev, occ in wanted:
            who = occ.who()
            owner = marks.get(ev.id)
            doc = view.get(who) if who in direct else None
            fast = alone(msg, occ) and who not in held and (owner is None or owner == who)
            if not fast or who is None or doc is None:
                rest.append((msg, ev, occ))
                held.add(who)
                continue
            if owner is None:
                at = when(occ.time)
                doc = counters.fold_event(doc, occ.type, at, occ.properties, now)
                view[who] = doc
                self._remember(
                    who, _Unapplied(ev.id, occ.type, at, occ.properties, mono + PATIENCE_S)
                )
            ready.append(Fired(who, occ.as_fired(ev), False, doc=doc, projected=True))
        return ready, rest

    def _remember(self, customer_id: str, u: _Unapplied) -> None:
        if len(self._unapplied) >= UNAPPLIED_MAX:  # bounded: drop the expired, else the oldest
            mono = time.monotonic()
            for cid in [c for c, us in self._unapplied.items() if us[-1].until <= mono]:
                del self._unapplied[cid]
            while len(self._unapplied) >= UNAPPLIED_MAX:
                del self._unapplied[next(iter(self._unapplied))]
        self._unapplied.setdefault(customer_id, []).append(u)

    async def handle_responses(self, batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
        """``response.recorded``: a reply (an SMS survey answer) can fire the next step."""
        if not self.engine.loaded.is_set():
            raise TransientError("the catalog is not loaded yet")
        # Parsed whether or not a campaign listens: a malformed response is dead-lettered.
        responses = [(ev, parse(ev, ResponseRecorded)) for _, ev in batch]
        if ResponseRecorded.TYPE not in self.engine.catalog.by_event:
            return
        fired = [
            Fired(
                r.customer_id,
                {
                    "id": ev.id,
                    "type": ResponseRecorded.TYPE,
                    "time": r.time,
                    "properties": r.model_dump(mode="json", exclude_none=True),
                },
                _again(msg),
            )
            for (msg, _), (ev, r) in zip(batch, responses, strict=True)
        ]
        await self.process(fired)

    async def _owners(
        self, event_ids: Sequence[str]
    ) -> AsyncIterator[tuple[dict[str, str], frozenset[str]]]:
        """The customer each event landed on, as the profile marks them: every round yields
        the events found since the last (event id → customer); after ``marker_wait_s`` the
        last round also yields the ids still unmarked."""
        todo = list(event_ids)
        deadline = time.monotonic() + self.marker_wait_s
        while todo:
            vals = await self.redis.mget([self.keys.applied(i) for i in todo])
            found: dict[str, str] = {}
            rest = []
            for eid, v in zip(todo, vals, strict=True):
                if v is None:
                    rest.append(eid)
                else:
                    found[eid] = v.decode() if isinstance(v, bytes) else str(v)
            todo = rest
            give_up = bool(todo) and time.monotonic() >= deadline
            if found or give_up:
                yield found, frozenset(todo if give_up else ())
            if not todo or give_up:
                return
            await asyncio.sleep(0.004)  # the profile applies a batch in ~10–30 ms

    # -- the work -----------------------------------------------------------------------
    async def process(self, fired: Sequence[Fired]) -> None:
        if not fired:
            return
        cat = self.engine.catalog
        now = datetime.now(UTC)
        pairs = [(f, c) for f in fired for c in cat.by_event.get(str(f.event["type"]), ())]
        unread = sorted({f.customer_id for f, _ in pairs if not f.projected})
        read = dict(zip(unread, await read_projections(self.redis, self.keys, unread), strict=True))
        whos = await self.planner.customers(
            [f.customer_id for f, _ in pairs],
            [c for _, c in pairs],
            now,
            events=[f.event for f, _ in pairs],
            docs=[f.doc if f.projected else read[f.customer_id] for f, _ in pairs],
        )
        answers = [
            (f.customer_id, str(f.event["type"]), when(f.event["time"]))
            for f in fired
            if f.event["type"] in cat.by_unless
        ]
        items = [
            Item(
                who,
                camp,
                tracking_id(str(f.event["id"]), camp.campaign_id),
                origin={"event_id": f.event["id"], "event_type": f.event["type"]},
            )
            for (f, camp), who in zip(pairs, whos, strict=True)
        ]
        await self.planner.recall([it for it, (f, _) in zip(items, pairs, strict=True) if f.again])
        timers: list[NewTimer] = []
        exclusive: dict[int, list[Item]] = {}  # per event: its exclusive candidates
        solo: list[Item] = []
        held: list[tuple[Item, Outcome]] = []  # control customers, recorded as contacts
        for (f, camp), it in zip(pairs, items, strict=True):
            out = self.planner.eligible(it, now)
            if camp.timed:
                # eligible now (control included): it fires later, through the same steps
                if out is None or out.status == "control":
                    timers.append(fire_timer(it, now))
                else:
                    counts.observe("trigger", out)
                continue
            if out is None:
                (exclusive.setdefault(id(f), []) if camp.exclusive else solo).append(it)
            elif out.status == "control":
                held.append((it, out))
            else:
                counts.observe("trigger", out)
        await self.timers.store(timers, answers)
        if held:
            await self._finish(held)
        rounds = list(exclusive.values())
        for q in rounds:
            self._rank(q)
        # Exclusive candidates go in rounds: the best of every event first; where it was
        # suppressed (capped, no consent …) the next one gets its turn.
        heads = [(q, q.pop(0)) for q in rounds]
        pending = solo + [h for _, h in heads]
        while pending:
            outs = await self.planner.contact(pending, now)
            await self._finish(list(zip(pending, outs, strict=True)))
            lost = {id(it) for it, o in zip(pending, outs, strict=True) if o.status == "suppressed"}
            heads = [(q, q.pop(0)) for q, h in heads if id(h) in lost and q]
            pending = [h for _, h in heads]

    def _rank(self, items: list[Item]) -> None:
        """Rank one event's exclusive candidates (the pipeline's ranking step)."""
        cands = [it.cand for it in items if it.cand is not None]
        by_cand = {id(it.cand): it for it in items}
        self.engine.rank(cands)
        items[:] = [by_cand[id(c)] for c in cands]

    async def _finish(self, done: Sequence[tuple[Item, Outcome]]) -> None:
        """Publish what was decided and keep what must wait as timers."""
        records = []
        later = []
        for it, o in done:
            counts.observe("trigger", o)
            if o.status == "deferred" and o.due is not None:
                later.append(deferred(it, o))
                if o.kind == "send":
                    continue  # the contact counts now; its records wait for the send
            records += o.records
        await self.timers.store(later)
        if records:
            await self.bus.publish_many(records)
