"""Durable timers: delayed and ``unless`` triggers, sends held for quiet hours, retries of
contacts a deferring cap held back.

Timers are rows in ``decision.timer`` with their due time; every replica claims due rows
(``FOR UPDATE SKIP LOCKED``, a lease) and sleeps until the next one is due — no cron job and
no table scan. A timer is deleted in the same transaction that stores its follow-ups, and
what it publishes has stable ids (ledger member, ``Nats-Msg-Id``, idempotency key), so a
crash between the two sends nothing twice. When an ``unless`` timer fires, it also checks
that no follow-up event was applied since the trigger (the counter's total), so a follow-up
handled by another replica at the same moment still cancels it. A timer that fires goes
through the same pipeline as the event would have (``Planner``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.errors import Error as NatsError
from prometheus_client import Histogram
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.decision.engine import Engine
from services.decision.outbound import Item, Planner
from services.decision.pipeline import counts
from services.decision.pipeline.steps import Outcome
from services.decision.timers.repository import DueTimer, NewTimer, TimerRepository
from shared.bus import Bus
from shared.contracts.bus import TimerFailed
from shared.db import Database, is_transient
from shared.events import CloudEvent, iso
from shared.privacy import with_token
from shared.redis import read_projections

log = logging.getLogger("kairos.decision.timers")
LATENESS = Histogram(
    "kairos_timer_lateness_seconds",
    "How late a timer fired after it was due",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CLAIM = 500
LEASE_S = 60
MAX_ATTEMPTS = 5


def when(v: Any) -> datetime:
    t = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def fire_timer(it: Item, now: datetime) -> NewTimer:
    """The timer of a delayed or ``unless`` trigger; it remembers the ``unless`` counter's
    total now, so a follow-up applied later cancels it."""
    camp = it.campaign
    wait = camp.delay_s
    unless_event, unless_total = None, 0
    if camp.unless is not None:
        unless_event, within = camp.unless
        wait = max(wait, within)
        c = ((it.who.doc or {}).get("counters") or {}).get(unless_event) or {}
        unless_total = int(c.get("total", 0))
    due = now + timedelta(seconds=wait)
    return NewTimer(
        timer_id=it.tracking,
        kind="fire",
        due=due,
        customer_id=it.customer_id,
        campaign_id=camp.campaign_id,
        unless_event=unless_event,
        payload={
            "event": dict(it.event) if it.event is not None else None,
            "unless_total": unless_total,
            "origin": {**it.origin, "timer_id": it.tracking, "due": iso(due)},
        },
        created_at=now,
    )


def deferred(it: Item, o: Outcome) -> NewTimer:
    """A timer for an outcome that must wait: the reserved send, or a new attempt."""
    assert o.due is not None
    assert o.kind is not None
    if o.kind == "send":
        payload: dict[str, Any] = {
            "records": [[subject, ev.model_dump()] for subject, ev in o.records]
        }
    else:
        payload = {
            "tracking": it.tracking,
            "event": dict(it.event) if it.event is not None else None,
            "origin": dict(it.origin),
        }
    return NewTimer(
        timer_id=f"{it.tracking}:{o.kind}:{int(o.due.timestamp())}",
        kind=o.kind,
        due=o.due,
        customer_id=it.customer_id,
        campaign_id=it.campaign.campaign_id,
        payload=payload,
        created_at=datetime.now(UTC),
    )


def answered(doc: Mapping[str, Any] | None, t: DueTimer) -> bool:
    """Did the ``unless`` follow-up arrive since the trigger? Either its counter moved after
    the trigger was handled, or its last occurrence is not older than the trigger event
    (both arrived in one batch, or were handled by two replicas at once)."""
    c = ((doc or {}).get("counters") or {}).get(t.unless_event) or {}
    if int(c.get("total", 0)) > int(t.payload.get("unless_total", 0)):
        return True
    last, trig = c.get("last"), (t.payload.get("event") or {}).get("time")
    return bool(last and trig and when(last) >= when(trig))


def _transient(exc: Exception) -> bool:
    """Redis, Postgres or NATS unavailable: worth waiting for, never a reason to give up."""
    return is_transient(exc) or isinstance(
        exc, (RedisConnectionError, RedisTimeoutError, NatsError)
    )


class Timers:
    def __init__(self, engine: Engine, db: Database, bus: Bus) -> None:
        self.engine = engine
        self.planner = Planner(engine)
        self.db = db
        self.bus = bus
        self.wake = asyncio.Event()

    async def store(
        self, timers: Sequence[NewTimer], answers: Sequence[tuple[str, str, datetime]] = ()
    ) -> None:
        """Store new timers, then cancel the ``unless`` timers follow-up events answer."""
        if not timers and not answers:
            return
        async with self.db.transaction() as uow:
            repo = TimerRepository(uow.session)
            await repo.insert(timers)
            await repo.cancel_answered(answers)
        soon = datetime.now(UTC) + timedelta(seconds=0.3)
        if any(t.due <= soon for t in timers):
            self.wake.set()

    async def forever(self) -> None:
        await self.engine.loaded.wait()
        while True:
            try:
                n = await self.fire_due()
            except Exception as exc:  # the database or Redis blinked: try again shortly
                log.warning("timers: %s", exc)
                await asyncio.sleep(1.0)
                continue
            if n:
                continue
            try:
                async with self.db.sessions() as s:
                    wait = await TimerRepository(s).next_due_s()
            except Exception:
                wait = 1.0
            self.wake.clear()
            timeout = 0.25 if wait is None else min(0.25, max(0.0, wait))
            if timeout <= 0:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    async def fire_due(self) -> int:
        """Claim due timers (this replica alone), act on them, then delete them."""
        async with self.db.transaction() as uow:
            due = await TimerRepository(uow.session).claim_due(CLAIM, LEASE_S)
        if not due:
            return 0
        now = datetime.now(UTC)
        for t in due:
            LATENESS.observe(max(0.0, (now - t.due).total_seconds()))
        done = [t.timer_id for t in due]
        try:
            follow = await self._act(due, now)
        except Exception:
            follow, done = [], []
            for t in due:  # one by one: the failing one must not hold back the others
                try:
                    follow += await self._act([t], now)
                except Exception as exc:
                    if not await self._poisoned(t, exc):
                        continue  # stays claimed; tried again when its lease runs out
                done.append(t.timer_id)
        async with self.db.transaction() as uow:
            repo = TimerRepository(uow.session)
            await repo.delete(done)
            await repo.insert(follow)
        return len(due)

    async def _poisoned(self, t: DueTimer, exc: Exception) -> bool:
        """Dead-letter a timer that keeps failing (True); a dependency being down, or a
        failure with attempts left, leaves it for another try (False)."""
        if _transient(exc) or t.attempts < MAX_ATTEMPTS:
            log.warning("timer %s failed (attempt %d): %s", t.timer_id, t.attempts, exc)
            return False
        log.error("timer %s dead-lettered: %s", t.timer_id, exc)
        msg = TimerFailed(
            timer_id=t.timer_id,
            kind=t.kind,
            due=iso(t.due),
            customer_id=t.customer_id,
            campaign_id=t.campaign_id,
            unless_event=t.unless_event,
            payload=t.payload,
            attempts=t.attempts,
            error=str(exc)[:500],
        )
        subject, ev = msg.to_event(source="kairos/decision")
        await self.bus.publish(subject, ev)
        return True

    async def _act(self, due: Sequence[DueTimer], now: datetime) -> list[NewTimer]:
        """Fire, send or retry each timer; returns follow-up timers (deferred again)."""
        cat = self.engine.catalog
        ids = sorted({t.customer_id for t in due})
        redis, keys = self.engine.redis, self.engine.keys
        docs = dict(zip(ids, await read_projections(redis, keys, ids), strict=True))
        records: list[tuple[str, CloudEvent]] = []
        todo: list[DueTimer] = []
        for t in due:
            camp = cat.by_id.get(t.campaign_id)
            if camp is None:  # paused, completed or gone: nothing more goes out for it
                counts.observe("timer", Outcome("ineligible", "inactive"))
                continue
            if t.kind == "send":
                # records stored before subjects carried the customer token get it now
                for subject, raw in t.payload["records"]:
                    ev = CloudEvent.model_validate(raw)
                    records.append((with_token(subject, ev.subject), ev))
                counts.observe("timer", Outcome("dispatched", "deferred_send"))
                continue
            if t.kind == "fire" and t.unless_event and answered(docs.get(t.customer_id), t):
                counts.observe("timer", Outcome("ineligible", "unless"))
                continue
            todo.append(t)
        camps = [cat.by_id[t.campaign_id] for t in todo]
        whos = await self.planner.customers(
            [t.customer_id for t in todo],
            camps,
            now,
            events=[t.payload.get("event") for t in todo],
            docs=[docs.get(t.customer_id) for t in todo],
        )
        items: list[Item] = []
        for t, camp, who in zip(todo, camps, whos, strict=True):
            it = Item(
                who,
                camp,
                t.timer_id if t.kind == "fire" else t.payload["tracking"],
                origin=t.payload.get("origin") or {},
            )
            if t.attempts > 1:  # claimed before: its contact may be in the ledger already
                await self.planner.recall([it])
            out = self.planner.eligible(it, now)
            if out is not None:
                counts.observe("timer", out)
                records += out.records
                continue
            items.append(it)
        follow = []
        if items:
            for it, o in zip(items, await self.planner.contact(items, now), strict=True):
                counts.observe("timer", o)
                if o.status == "deferred" and o.due is not None:
                    follow.append(deferred(it, o))
                    continue
                records += o.records
        if records:
            await self.bus.publish_many(records)
        return follow
