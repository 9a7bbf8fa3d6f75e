"""The feedback service's durable consumers: contacts, delivery reports, responses as
received, conversion events and erasure. Each batch is one transaction."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

from services.feedback.history import service
from shared.bus import Consumer, PoisonMessage, TransientError, bulk_gather_s
from shared.contracts.bus import ContactRecorded, DeliveryReported, ProfileErased, ResponseReceived
from shared.db import Database, is_transient
from shared.event_filter import EventTypeFilter
from shared.events import CloudEvent
from shared.privacy import any_customer
from shared.service import Runtime

log = logging.getLogger("kairos.feedback.consumers")
Batch = Sequence[tuple[Msg, CloudEvent]]
M = TypeVar("M", bound=BaseModel)
# A delivery report or response whose contact is not stored yet comes back later; after
# this many deliveries (about a minute) its contact is not coming and it is dropped, logged.
MAX_WAITS = 60


def _transient(exc: Exception) -> bool:
    return is_transient(exc) or service.retryable(exc)


def _parse(cls: type[M], batch: Batch) -> list[M]:
    out = []
    for _, ev in batch:
        try:
            out.append(cls.model_validate(ev.data))
        except ValidationError as exc:
            if len(batch) == 1:
                raise PoisonMessage(f"not a {cls.__name__}: {exc}") from exc
            raise  # the runner retries one by one and dead-letters this one
    return out


def _later(batch: Batch, waiting: set[str], key: Callable[[CloudEvent], str]) -> list[Msg]:
    """The messages to hand back (their contact is not stored yet), minus those that waited
    long enough."""
    out = []
    for msg, ev in batch:
        if key(ev) not in waiting:
            continue
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        if delivered >= MAX_WAITS:
            log.error("dropping %s for unknown tracking id %s", ev.type, key(ev))
            continue
        out.append(msg)
    return out


class Handlers:
    """The batch handlers over one process's database and caches."""

    def __init__(self, rt: Runtime) -> None:
        assert rt.db is not None
        self.db: Database = rt.db
        self.state: service.State = rt.extras["feedback"]
        # The events consumer's filter: the conversion types (``shared.event_filter``).
        self.event_filter: EventTypeFilter | None = None

    async def _tx(self, work: Callable[[], Awaitable[list[Msg] | None]]) -> list[Msg] | None:
        try:
            return await work()
        except Exception as exc:
            if _transient(exc):
                raise TransientError(str(exc)) from exc
            raise

    async def contacts(self, batch: Batch) -> list[Msg] | None:
        """Store contacts (target and control) once per tracking id."""
        rows = [service.contact_row(m) for m in _parse(ContactRecorded, batch)]

        async def work() -> None:
            self.state.pending.clear()
            async with self.db.transaction() as uow:
                await service.record_contacts(self.db, uow, self.state, rows)
            if self.state.learn() and self.event_filter is not None:
                # Before these contacts are acked: their conversion events come through.
                try:
                    await self.event_filter.want(self.state.types)
                except Exception as exc:  # the bus away: the filter's loop widens it
                    log.warning("conversion event filter not widened: %r", exc)

        return await self._tx(work)

    async def delivery(self, batch: Batch) -> list[Msg] | None:
        """Delivery statuses; reports that overtook their contact come back later."""
        reports = _parse(DeliveryReported, batch)

        async def work() -> list[Msg]:
            async with self.db.transaction() as uow:
                matched = await service.apply_deliveries(uow, reports)
            waiting = {r.tracking_id for r in reports} - matched
            return _later(batch, waiting, lambda ev: str(ev.data.get("tracking_id")))

        return await self._tx(work)

    async def responses(self, batch: Batch) -> list[Msg] | None:
        """Responses from links, SMS replies, inbox reads and provider receipts."""
        items = _parse(ResponseReceived, batch)

        async def work() -> list[Msg]:
            async with self.db.transaction() as uow:
                done = await service.record_responses(self.db, uow, self.state, items)
            waiting = {i.tracking_id for i in done.unknown}
            return _later(batch, waiting, lambda ev: str(ev.data.get("tracking_id")))

        return await self._tx(work)

    async def events(self, batch: Batch) -> list[Msg] | None:
        """Conversion attribution from behavioural events."""
        found = [service.Conversion.from_cloudevent(ev) for _, ev in batch]
        events = [e for e in found if e is not None]
        if not events:
            return None

        async def work() -> None:
            async with self.db.transaction() as uow:
                await service.attribute_events(self.db, uow, self.state, events)

        return await self._tx(work)

    async def erasure(self, batch: Batch) -> list[Msg] | None:
        """Pseudonymise every row of an erased customer."""
        erased = _parse(ProfileErased, batch)

        async def work() -> None:
            async with self.db.transaction() as uow:
                for e in erased:
                    await service.erase(uow, self.state, ids=[e.customer_id, *e.ids])

        return await self._tx(work)


def consumers(rt: Runtime) -> list[Consumer]:
    """The durable consumers this process runs."""
    h = Handlers(rt)
    s = rt.settings
    # History is written set-based: under a backlog, bigger batches mean fewer statements.
    big = max(s.consumer_batch, 2000)
    spec: list[tuple[str, list[str], str, Callable[[Batch], Awaitable[list[Msg] | None]], int]] = [
        ("feedback-contacts", [any_customer("contact.recorded")], "CONTACT", h.contacts, big),
        ("feedback-delivery", ["delivery.>"], "DELIVERY", h.delivery, big),
        ("feedback-responses", [any_customer("response.received")], "RESPONSE", h.responses, big),
        ("feedback-events", ["events.>"], "EVENTS", h.events, s.consumer_batch),
        ("feedback-erasure", [any_customer("profile.erased")], "PROFILE", h.erasure, 50),
    ]
    out = [
        Consumer(
            rt.bus,
            name,
            subjects,
            stream,
            handler,
            batch=batch,
            max_deliver=s.consumer_max_deliver,
            gather_s=bulk_gather_s(),
        )
        for name, subjects, stream, handler, batch in spec
    ]
    h.event_filter = EventTypeFilter(next(c for c in out if c.name == "feedback-events"))
    rt.extras["event_filter"] = h.event_filter
    return out


async def keep_event_filter(db: Database, state: service.State, f: EventTypeFilter) -> None:
    """The events consumer takes the conversion types: read again from the database every
    couple of seconds (another replica may have learnt one), narrowed after the grace."""
    while True:
        try:
            async with db.transaction() as uow:
                types = await state.conversion_types(uow)
            await f.want(types)
            await f.check()
        except Exception as exc:  # the database or the bus away: next time
            log.warning("conversion event filter not checked: %r", exc)
        await asyncio.sleep(f.check_s)
