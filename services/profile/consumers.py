"""The profile service's NATS consumers: events, delivery reports, responses."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import TypeVar

from nats.aio.msg import Msg
from pydantic import ValidationError

from services.profile.customers import service
from services.profile.customers.endpoints import projection, reproject
from services.profile.customers.repository import CustomerRepository
from shared.bus import STREAM_MAX_AGE_S, Consumer, PoisonMessage, TransientError, bulk_gather_s
from shared.contracts.bus import (
    CHANNELS,
    BusMessage,
    DeliveryReported,
    ResponseRecorded,
)
from shared.db import is_conflict, is_transient
from shared.events import CloudEvent, utcnow
from shared.privacy import any_customer
from shared.service import Runtime

log = logging.getLogger("kairos.profile.consumers")
Batch = Sequence[tuple[Msg, CloudEvent]]

_transient = is_transient
APPLY_ATTEMPTS = 5


async def handle_events(rt: Runtime, batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
    """Apply a batch of behavioural events in one transaction, then re-project."""
    assert rt.db is not None
    items = []
    for _, ev in batch:
        try:
            items.append(service.EventData.from_cloudevent(ev))
        except (KeyError, ValueError, TypeError) as exc:
            if len(batch) == 1:
                raise PoisonMessage(f"not an event: {exc}") from exc
            raise  # the runner retries one by one and dead-letters this one
    for attempt in range(1, APPLY_ATTEMPTS + 1):
        try:
            async with rt.db.transaction() as uow:
                applied = await service.apply_events(uow, items, utcnow())
            break
        except Exception as exc:
            if not _transient(exc):
                raise
            if attempt == APPLY_ATTEMPTS or not is_conflict(exc):
                raise TransientError(str(exc)) from exc
            # Lost a deadlock to another batch: it was rolled back whole; run it again now
            # rather than after the nak delay (which would reorder it behind later events).
            log.info("events batch conflicted with another (%s); retrying", exc)
    _prune_soon(rt)
    proj = projection(rt)
    # Each projection and the markers of the events in it go in one script (triggers read
    # both at once: a marker means "the projection has this event").
    stale, unmarked = await proj.write_applied(applied.docs, applied.owners)
    if stale:  # Redis missed an earlier version (a restart, a flush): write them whole
        await reproject(rt, stale)
    for source in applied.folded:
        await proj.erase(source)
    await proj.mark_applied(unmarked)


_next_prune = 0.0
PRUNE_EVERY_S = 60.0
PRUNE_CHUNK = 20_000
# Event ids are remembered (a redelivered or re-posted event counts once) for as long as a
# stream can hand an event back, and a day more.
DEDUP_S = STREAM_MAX_AGE_S + 24 * 3600


_pruning: set[asyncio.Task[None]] = set()


def _prune_soon(rt: Runtime) -> None:
    """Once a minute, prune in the background (never holding up the batch that asked)."""
    global _next_prune
    if time.monotonic() < _next_prune or _pruning:
        return
    _next_prune = time.monotonic() + PRUNE_EVERY_S
    task = asyncio.create_task(_prune(rt), name="profile-prune")
    _pruning.add(task)
    task.add_done_callback(_pruning.discard)


async def _prune(rt: Runtime) -> None:
    """Forget what is past its time: event batches' announcement rows
    (``KAIROS_EVENT_BATCH_RETENTION_S``) and processed event ids (``DEDUP_S``); each chunk in a
    transaction of its own, never inside a batch's, where two replicas would queue."""
    assert rt.db is not None
    now = utcnow()
    try:
        async with rt.db.transaction() as uow:
            await CustomerRepository(uow.session).prune_event_batches(
                now - timedelta(seconds=rt.settings.event_batch_retention_s)
            )
        while True:
            async with rt.db.transaction() as uow:
                gone = await CustomerRepository(uow.session).prune_processed(
                    now - timedelta(seconds=DEDUP_S), PRUNE_CHUNK
                )
            if gone < PRUNE_CHUNK:
                break
    except Exception as exc:  # the next round tries again; the batch itself is done
        log.warning("pruning event batches or processed event ids failed: %r", exc)


M = TypeVar("M", bound=BusMessage)


def _parse(cls: type[M], batch: Batch) -> list[tuple[CloudEvent, M]]:
    """Every payload of the batch, typed; one that does not parse is a poison message (alone
    it is dead-lettered at once; in a batch the runner retries one by one, so only it is)."""
    out = []
    for _, ev in batch:
        try:
            out.append((ev, cls.parse(ev)))
        except ValidationError as exc:
            raise PoisonMessage(f"not a {cls.TYPE} payload: {exc}") from exc
    return out


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def handle_delivery(rt: Runtime, batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
    """Drop push tokens that a provider reported as no longer valid."""
    assert rt.db is not None
    reports = _parse(DeliveryReported, batch)
    touched = []
    async with rt.db.transaction() as uow:
        for ev, d in reports:
            if not d.token_invalid or not d.token:
                continue
            # The provider's own timestamp (the contract keeps it RFC 3339), else the report's.
            reported = _when(d.token_invalid_since or ev.time)
            cid = await service.drop_invalid_token(
                uow, token=d.token, reported_at=reported, now=utcnow()
            )
            if cid:
                touched.append(cid)
    await reproject(rt, touched)


async def handle_responses(rt: Runtime, batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
    """An ``unsubscribed`` response withdraws that channel's consent."""
    assert rt.db is not None
    responses = _parse(ResponseRecorded, batch)
    touched = []
    async with rt.db.transaction() as uow:
        for _, r in responses:
            if r.outcome != "unsubscribed" or r.channel not in CHANNELS:
                continue
            cid = await service.withdraw_consent(
                uow, customer_id=r.customer_id, channel=r.channel, now=utcnow()
            )
            if cid:
                touched.append(cid)
    await reproject(rt, touched)


def consumers(rt: Runtime) -> list[Consumer]:
    """The durable consumers this process runs."""
    s = rt.settings

    def bind(fn: Callable[[Runtime, Batch], Awaitable[None]]) -> Callable[[Batch], Awaitable[None]]:
        async def handler(batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
            await fn(rt, batch)

        return handler

    return [
        Consumer(
            rt.bus,
            "profile-events",
            ["events.>"],
            "EVENTS",
            bind(handle_events),
            batch=s.profile_events_batch,
            in_flight=s.profile_events_in_flight,
            max_deliver=s.consumer_max_deliver,
            gather_s=bulk_gather_s(),
        ),
        Consumer(
            rt.bus,
            "profile-delivery",
            ["delivery.>"],
            "DELIVERY",
            bind(handle_delivery),
            batch=100,
            max_deliver=s.consumer_max_deliver,
            gather_s=bulk_gather_s(),
        ),
        Consumer(
            rt.bus,
            "profile-responses",
            [any_customer("response.recorded")],
            "RESPONSE",
            bind(handle_responses),
            batch=100,
            max_deliver=s.consumer_max_deliver,
            gather_s=bulk_gather_s(),
        ),
    ]
