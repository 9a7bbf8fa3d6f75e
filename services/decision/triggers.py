"""Triggered campaigns: events in, dispatch requests out, and the durable timers between.

The consumer ``decision-triggers`` (durable, shared by replicas) reads ``events.>``; the
catalog indexes active triggered campaigns by event type, so an event nobody listens to
costs one dictionary lookup. For an event somebody listens to, the handler waits until the
profile service has applied it (its ``applied:{event id}`` marker, which also names the
customer the event landed on after identity resolution), reads the projection, and:

- cancels the pending ``unless`` timers the event answers (abandoned cart → order placed);
- evaluates each listening campaign's ``where`` (event properties and profile) and audience;
- campaigns without delay or ``unless`` are planned at once: control groups, treatments,
  ranking when several fire on one event (one message per event and customer; a campaign
  with ``trigger.exclusive: false`` is sent on its own), channel choice and the ledger;
- campaigns with a ``delay`` or an ``unless`` window become a timer row in Postgres.

Timers are rows in ``decision.timer`` with their due time; every replica claims due rows
(``FOR UPDATE SKIP LOCKED``, a lease) and sleeps until the next one is due — no cron job
and no table scan. A timer is deleted in the same transaction that stores its follow-ups,
and what it publishes has stable ids (ledger member, ``Nats-Msg-Id``, idempotency key), so
a crash between the two sends nothing twice. When an ``unless`` timer fires, it also checks
that no follow-up event was applied since the trigger (the counter's total), so a follow-up
handled by another replica at the same moment still cancels it.

``response.recorded`` feeds the same path as an event of type ``response.recorded``
(properties: the response: outcome, choice, campaign …): a survey reply fires the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from prometheus_client import Counter, Histogram
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.decision.engine import Engine
from services.decision.messages import parse
from services.decision.outbound import Item, Outcome, Planner, tracking_id
from shared import rules
from shared.bus import Bus, TransientError
from shared.contracts.bus import ResponseRecorded
from shared.db import Database, is_transient
from shared.events import CloudEvent, iso
from shared.privacy import with_token
from shared.redis import APPLIED_TTL_S, Keys, read_projections

log = logging.getLogger("kairos.decision.triggers")
FIRED = Counter("kairos_trigger_outcomes_total", "Trigger outcomes", ["status", "reason"])
LATENESS = Histogram(
    "kairos_timer_lateness_seconds",
    "How late a timer fired after it was due",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
CLAIM = 500
LEASE_S = 60
MAX_ATTEMPTS = 5
PATIENCE_S = 30.0  # an event the profile never marked (rejected there) is handled anyway


@dataclass
class Fired:
    """One event about one customer, resolved."""

    customer_id: str
    event: dict[str, Any]  # id, type, time, properties


def _event_of(ev: CloudEvent) -> dict[str, Any]:
    d = ev.data if isinstance(ev.data, dict) else {}
    return {
        "id": ev.id,
        "type": str(d.get("type") or ev.type),
        "time": d.get("time") or ev.time,
        "properties": d.get("properties") or {},
    }


def _fallback_customer(ev: CloudEvent) -> str | None:
    d = ev.data if isinstance(ev.data, dict) else {}
    if d.get("customer_id"):
        return str(d["customer_id"])
    if d.get("anonymous_id"):
        return "anon:" + str(d["anonymous_id"])
    return None


def _age_s(msg: Msg) -> float:
    md = msg.metadata
    if md is None or md.timestamp is None:
        return 0.0
    return max(0.0, time.time() - md.timestamp.timestamp())


class Triggers:
    def __init__(
        self,
        engine: Engine,
        db: Database,
        redis: Any,
        keys: Keys,
        bus: Bus,
        *,
        marker_wait_s: float = 1.0,
    ) -> None:
        self.engine = engine
        self.planner = Planner(engine)
        self.db = db
        self.redis = redis
        self.keys = keys
        self.bus = bus
        self.marker_wait_s = marker_wait_s
        self.wake = asyncio.Event()

    # -- consumers ----------------------------------------------------------------------
    async def handle_events(self, batch: Sequence[tuple[Msg, CloudEvent]]) -> list[Msg]:
        """``events.>``: returns the messages whose profile update has not landed yet."""
        if not self.engine.loaded.is_set():
            raise TransientError("the catalog is not loaded yet")
        cat = self.engine.catalog
        wanted = []
        for msg, ev in batch:
            etype = _event_of(ev)["type"]
            if etype in cat.by_event or etype in cat.by_unless:
                wanted.append((msg, ev))
        if not wanted:
            return []
        owners = await self._owners(wanted)
        later, fired = [], []
        for msg, ev in wanted:
            cid = owners.get(ev.id)
            if cid is None:
                if _age_s(msg) < min(PATIENCE_S, APPLIED_TTL_S / 2):
                    later.append(msg)
                    continue
                cid = _fallback_customer(ev)  # the profile rejected it or forgot: go on
                if cid is None:
                    continue
            fired.append(Fired(cid, _event_of(ev)))
        await self.process(fired)
        return later

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
            )
            for ev, r in responses
        ]
        await self.process(fired)

    async def _owners(self, items: Sequence[tuple[Msg, CloudEvent]]) -> dict[str, str]:
        """The customer each event landed on, waiting up to ``marker_wait_s`` for profile."""
        found: dict[str, str] = {}
        todo = [ev.id for _, ev in items]
        deadline = time.monotonic() + self.marker_wait_s
        while todo:
            vals = await self.redis.mget([self.keys.applied(i) for i in todo])
            rest = []
            for eid, v in zip(todo, vals, strict=True):
                if v is None:
                    rest.append(eid)
                else:
                    found[eid] = v.decode() if isinstance(v, bytes) else str(v)
            todo = rest
            if not todo or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.004)  # the profile applies a batch in ~10–30 ms
        return found

    # -- the work -----------------------------------------------------------------------
    async def process(self, fired: Sequence[Fired]) -> None:
        if not fired:
            return
        cat = self.engine.catalog
        now = datetime.now(UTC)
        ids = sorted({f.customer_id for f in fired})
        docs = dict(zip(ids, await read_projections(self.redis, self.keys, ids), strict=True))
        cancels: list[tuple[str, str, str]] = []
        timers: list[dict[str, Any]] = []
        rounds: list[list[Item]] = []  # per event: its exclusive candidates, best first
        solo: list[Item] = []
        held: list[tuple[Item, Outcome]] = []  # control customers, recorded as contacts
        for f in fired:
            doc = docs.get(f.customer_id)
            etype = f.event["type"]
            if etype in cat.by_unless:
                cancels.append((f.customer_id, etype, str(f.event["time"])))
            exclusive: list[Item] = []
            for live in cat.by_event.get(etype, ()):
                subject = rules.Subject(doc or {}, event=f.event, now=now)
                if live.where is not None and not live.where(subject):
                    continue
                it = Item(
                    f.customer_id,
                    doc,
                    live,
                    tracking_id(f.event["id"], live.campaign_id),
                    event=f.event,
                    origin={"event_id": f.event["id"], "event_type": etype},
                    subject=subject,
                )
                if live.timed:
                    if self.planner.check(it, now) is None:  # not even eligible: no timer
                        timers.append(self._timer(it, doc, now))
                    continue
                out = self.planner.check(it, now)
                if out is not None:
                    FIRED.labels(out.status, out.reason).inc()
                    continue
                ctl = self.planner.control(it, now)
                if ctl is not None:
                    held.append((it, ctl))
                    continue
                trig = live.body.get("trigger") or {}
                (exclusive if trig.get("exclusive", True) else solo).append(it)
            if exclusive:
                await self.engine.rank(exclusive)
                rounds.append(exclusive)
        if timers or cancels:
            await self._store_timers(timers, cancels)
        if held:
            await self._finish(held)
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

    def _timer(self, it: Item, doc: dict[str, Any] | None, now: datetime) -> dict[str, Any]:
        live = it.live
        wait = live.delay_s
        unless_event, unless_total = None, 0
        if live.unless is not None:
            unless_event, within = live.unless
            wait = max(wait, within)
            c = ((doc or {}).get("counters") or {}).get(unless_event) or {}
            unless_total = int(c.get("total", 0))
        due = now + timedelta(seconds=wait)
        return {
            "timer_id": it.tracking,
            "kind": "fire",
            "due": due,
            "customer_id": it.customer_id,
            "campaign_id": live.campaign_id,
            "unless_event": unless_event,
            "payload": {
                "event": it.event,
                "unless_total": unless_total,
                "origin": {**it.origin, "timer_id": it.tracking, "due": iso(due)},
            },
            "created_at": now,
        }

    async def _store_timers(
        self, timers: Sequence[dict[str, Any]], cancels: Sequence[tuple[str, str, str]]
    ) -> None:
        """Store new timers, then cancel the ``unless`` timers that follow-up events answer
        (only those whose trigger came before the follow-up, whatever the batch order)."""
        async with self.db.transaction() as uow:
            s = uow.session
            if timers:
                await insert_timers(s, timers)
            if cancels:
                await s.execute(
                    sa.text(
                        "DELETE FROM decision.timer t USING unnest(CAST(:c AS text[]), "
                        "CAST(:e AS text[]), CAST(:at AS timestamptz[])) AS x(c, e, at) "
                        "WHERE t.customer_id = x.c AND t.unless_event = x.e AND t.kind = 'fire' "
                        "AND CAST(t.payload->'event'->>'time' AS timestamptz) <= x.at"
                    ),
                    {
                        "c": [c for c, _, _ in cancels],
                        "e": [e for _, e, _ in cancels],
                        "at": [_when(t) for _, _, t in cancels],
                    },
                )
        soon = datetime.now(UTC) + timedelta(seconds=0.3)
        if any(t["due"] <= soon for t in timers):
            self.wake.set()

    async def _finish(self, done: Sequence[tuple[Item, Outcome]]) -> None:
        """Publish what was decided and keep what must wait as timers."""
        records = []
        later = []
        for it, o in done:
            FIRED.labels(o.status, o.reason).inc()
            if o.status == "deferred" and o.due is not None:
                later.append(deferred_timer(it, o))
                if o.kind == "send":
                    # the contact counts now; control-free records wait for the send
                    continue
            records += o.records
        if later:
            await self._store_timers(later, [])
        if records:
            await self.bus.publish_many(records)

    # -- timers -------------------------------------------------------------------------
    async def timers_forever(self) -> None:
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
                wait = await self._next_due_s()
            except Exception:
                wait = 1.0
            self.wake.clear()
            timeout = 0.25 if wait is None else min(0.25, max(0.0, wait))
            if timeout <= 0:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    async def _next_due_s(self) -> float | None:
        async with self.db.sessions() as s:
            v = (
                await s.execute(
                    sa.text(
                        "SELECT extract(epoch FROM due - now()) FROM decision.timer "
                        "WHERE claimed_until IS NULL OR claimed_until < now() "
                        "ORDER BY due LIMIT 1"
                    )
                )
            ).scalar()
        return None if v is None else float(v)

    async def fire_due(self) -> int:
        """Claim due timers (this replica alone), act on them, then delete them."""
        async with self.db.transaction() as uow:
            rows = (
                (
                    await uow.session.execute(
                        sa.text(
                            "UPDATE decision.timer t SET claimed_until = now() + "
                            "make_interval(secs => :lease), attempts = t.attempts + 1 "
                            "FROM (SELECT timer_id FROM decision.timer WHERE due <= now() "
                            "AND (claimed_until IS NULL OR claimed_until < now()) ORDER BY due "
                            "LIMIT :n FOR UPDATE SKIP LOCKED) d WHERE t.timer_id = d.timer_id "
                            "RETURNING t.timer_id, t.kind, t.due, t.customer_id, t.campaign_id, "
                            "t.unless_event, t.payload, t.attempts"
                        ),
                        {"n": CLAIM, "lease": LEASE_S},
                    )
                )
                .mappings()
                .all()
            )
        if not rows:
            return 0
        now = datetime.now(UTC)
        for r in rows:
            LATENESS.observe(max(0.0, (now - r["due"]).total_seconds()))
        done = [r["timer_id"] for r in rows]
        try:
            follow = await self._act(rows, now)
        except Exception:
            follow, done = [], []
            for r in rows:  # one by one: the failing one must not hold back the others
                try:
                    follow += await self._act([r], now)
                except Exception as exc:
                    if not await self._poisoned(r, exc):
                        continue  # stays claimed; tried again when its lease runs out
                done.append(r["timer_id"])
        async with self.db.transaction() as uow:
            await uow.session.execute(
                sa.text("DELETE FROM decision.timer WHERE timer_id = ANY(:ids)"),
                {"ids": done},
            )
            if follow:
                await insert_timers(uow.session, follow)
        return len(rows)

    async def _poisoned(self, row: Any, exc: Exception) -> bool:
        """Dead-letter a timer that keeps failing (True); a dependency being down, or a
        failure with attempts left, leaves it for another try (False)."""
        if _transient(exc) or row["attempts"] < MAX_ATTEMPTS:
            log.warning("timer %s failed (attempt %d): %s", row["timer_id"], row["attempts"], exc)
            return False
        log.error("timer %s dead-lettered: %s", row["timer_id"], exc)
        ev = CloudEvent.new(
            source="kairos/decision",
            type="decision.timer.failed",
            subject=row["customer_id"],
            data={**dict(row), "due": iso(row["due"]), "error": str(exc)[:500]},
        )
        await self.bus.publish("dlq.decision-timers", ev)
        return True

    async def _act(self, rows: Sequence[Any], now: datetime) -> list[dict[str, Any]]:
        """Fire, send or retry each timer; returns follow-up timers (deferred again)."""
        cat = self.engine.catalog
        ids = sorted({r["customer_id"] for r in rows})
        docs = dict(zip(ids, await read_projections(self.redis, self.keys, ids), strict=True))
        records: list[tuple[str, CloudEvent]] = []
        items: list[Item] = []
        for r in rows:
            live = cat.by_id.get(r["campaign_id"])
            if live is None:  # paused, completed or gone: nothing more goes out for it
                FIRED.labels("ineligible", "inactive").inc()
                continue
            p = r["payload"]
            if r["kind"] == "send":
                sent = [CloudEvent.model_validate(ev) for _, ev in p["records"]]
                records += [
                    (with_token(subject, ev.subject), ev)
                    for (subject, _), ev in zip(p["records"], sent, strict=True)
                ]
                FIRED.labels("dispatched", "deferred_send").inc()
                continue
            doc = docs.get(r["customer_id"])
            if r["kind"] == "fire" and r["unless_event"] and _answered(doc, r, p):
                FIRED.labels("cancelled", "unless").inc()
                continue
            it = Item(
                r["customer_id"],
                doc,
                live,
                r["timer_id"] if r["kind"] == "fire" else p["tracking"],
                event=p.get("event"),
                origin=p.get("origin") or {},
            )
            out = self.planner.check(it, now)
            if out is not None:
                FIRED.labels(out.status, out.reason).inc()
                continue
            if r["kind"] == "fire":
                ctl = self.planner.control(it, now)
                if ctl is not None:
                    records += ctl.records
                    FIRED.labels("control", "control").inc()
                    continue
            items.append(it)
        follow = []
        if items:
            outs = await self.planner.contact(items, now)
            for it, o in zip(items, outs, strict=True):
                FIRED.labels(o.status, o.reason).inc()
                if o.status == "deferred" and o.due is not None:
                    follow.append(deferred_timer(it, o))
                    continue
                records += o.records
        if records:
            await self.bus.publish_many(records)
        return follow


def _transient(exc: Exception) -> bool:
    """Redis, Postgres or NATS unavailable: worth waiting for, never a reason to give up."""
    return is_transient(exc) or isinstance(
        exc, (RedisConnectionError, RedisTimeoutError, NatsError)
    )


def _when(v: Any) -> datetime:
    t = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _answered(doc: dict[str, Any] | None, row: Any, payload: dict[str, Any]) -> bool:
    """Did the ``unless`` follow-up arrive since the trigger? Either its counter moved after
    the trigger was handled, or its last occurrence is not older than the trigger event
    (both arrived in one batch, or were handled by two replicas at once)."""
    c = ((doc or {}).get("counters") or {}).get(row["unless_event"]) or {}
    if int(c.get("total", 0)) > int(payload.get("unless_total", 0)):
        return True
    last, trig = c.get("last"), (payload.get("event") or {}).get("time")
    return bool(last and trig and _when(last) >= _when(trig))


def deferred_timer(it: Item, o: Outcome) -> dict[str, Any]:
    """A timer for an outcome that must wait: the reserved send, or a new attempt."""
    assert o.due is not None
    assert o.kind is not None
    if o.kind == "send":
        payload: dict[str, Any] = {
            "records": [[subject, ev.model_dump()] for subject, ev in o.records]
        }
    else:
        payload = {"tracking": it.tracking, "event": it.event, "origin": it.origin}
    return {
        "timer_id": f"{it.tracking}:{o.kind}:{int(o.due.timestamp())}",
        "kind": o.kind,
        "due": o.due,
        "customer_id": it.customer_id,
        "campaign_id": it.live.campaign_id,
        "unless_event": None,
        "payload": payload,
        "created_at": datetime.now(UTC),
    }


async def insert_timers(session: Any, timers: Sequence[dict[str, Any]]) -> None:
    """Insert timers; one already there (a redelivered event) is left as it is."""
    for start in range(0, len(timers), 1000):
        part = timers[start : start + 1000]
        await session.execute(
            sa.text(
                "INSERT INTO decision.timer (timer_id, kind, due, customer_id, campaign_id, "
                "unless_event, payload, created_at) SELECT * FROM unnest(CAST(:id AS text[]), "
                "CAST(:kind AS text[]), CAST(:due AS timestamptz[]), CAST(:cid AS text[]), "
                "CAST(:camp AS text[]), CAST(:unless AS text[]), CAST(:payload AS jsonb[]), "
                "CAST(:created AS timestamptz[])) "
                "ON CONFLICT (timer_id) DO NOTHING"
            ),
            {
                "id": [t["timer_id"] for t in part],
                "kind": [t["kind"] for t in part],
                "due": [t["due"] for t in part],
                "cid": [t["customer_id"] for t in part],
                "camp": [t["campaign_id"] for t in part],
                "unless": [t["unless_event"] for t in part],
                "payload": [orjson.dumps(t["payload"]).decode() for t in part],
                "created": [t["created_at"] for t in part],
            },
        )
