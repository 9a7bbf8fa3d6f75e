"""The profile service's NATS consumers: events, delivery reports, responses."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

from nats.aio.msg import Msg
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from services.profile.customers import service
from services.profile.customers.endpoints import projection, reproject
from shared.bus import Consumer, PoisonMessage, TransientError
from shared.events import CloudEvent, utcnow
from shared.service import Runtime

log = logging.getLogger("kairos.profile.consumers")
Batch = Sequence[tuple[Msg, CloudEvent]]

_TRANSIENT = (OperationalError, InterfaceError, ConnectionError, TimeoutError, OSError)


def _transient(exc: Exception) -> bool:
    if isinstance(exc, _TRANSIENT):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


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
    try:
        async with rt.db.transaction() as uow:
            applied = await service.apply_events(uow, items, utcnow())
    except Exception as exc:
        if _transient(exc):
            raise TransientError(str(exc)) from exc
        raise
    proj = projection(rt)
    stale = await proj.write_many(applied.docs)
    if stale:  # Redis missed an earlier version (a restart, a flush): write them whole
        await reproject(rt, stale)
    for source in applied.folded:
        await proj.erase(source)
    await proj.mark_applied(applied.owners)


def _when(value: object) -> datetime:
    if isinstance(value, (int, float)):  # APNs reports milliseconds since the epoch
        from datetime import UTC

        return datetime.fromtimestamp(value / 1000, UTC)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


async def handle_delivery(rt: Runtime, batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
    """Drop push tokens that a provider reported as no longer valid."""
    assert rt.db is not None
    touched = []
    async with rt.db.transaction() as uow:
        for _, ev in batch:
            d = ev.data
            if not d.get("token_invalid") or not d.get("token"):
                continue
            reported = _when(d.get("token_invalid_since") or ev.time)
            cid = await service.drop_invalid_token(
                uow, token=str(d["token"]), reported_at=reported, now=utcnow()
            )
            if cid:
                touched.append(cid)
    await reproject(rt, touched)


async def handle_responses(rt: Runtime, batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
    """An ``unsubscribed`` response withdraws that channel's consent."""
    assert rt.db is not None
    touched = []
    async with rt.db.transaction() as uow:
        for _, ev in batch:
            d = ev.data
            if (
                d.get("outcome") != "unsubscribed"
                or not d.get("customer_id")
                or not d.get("channel")
            ):
                continue
            if d["channel"] not in ("push", "email", "sms", "inapp"):
                continue
            cid = await service.withdraw_consent(
                uow, customer_id=str(d["customer_id"]), channel=str(d["channel"]), now=utcnow()
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
            batch=s.consumer_batch,
            max_deliver=s.consumer_max_deliver,
        ),
        Consumer(
            rt.bus,
            "profile-delivery",
            ["delivery.>"],
            "DELIVERY",
            bind(handle_delivery),
            batch=100,
            max_deliver=s.consumer_max_deliver,
        ),
        Consumer(
            rt.bus,
            "profile-responses",
            ["response.recorded"],
            "RESPONSE",
            bind(handle_responses),
            batch=100,
            max_deliver=s.consumer_max_deliver,
        ),
    ]
