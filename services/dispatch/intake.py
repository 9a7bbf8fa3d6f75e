"""Intake: ``dispatch.requested.<channel>`` into the message table, once per tracking id.

The consumer only stores: one set-based insert per batch, so it keeps up with a batch run and
a trigger's request waits behind at most one batch, never behind a run's backlog (the senders
take realtime work first). What cannot be sent is refused here with a reason — an unknown
channel, no address, already expired — and reported as ``delivery.failed`` or
``delivery.expired``; in-app messages are delivered by being stored (the inbox reads them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from nats.aio.msg import Msg
from pydantic import ValidationError

from services.dispatch import store
from services.dispatch.sender import SOURCE, Sender, final_events
from shared.bus import PoisonMessage, TransientError
from shared.contracts.bus import (
    CHANNELS,
    DeliveryReported,
    DispatchRequested,
    ProfileErased,
    ProviderReceipt,
)
from shared.db import Database, is_transient
from shared.events import CloudEvent, utcnow
from shared.privacy import pseudonym

log = logging.getLogger("kairos.dispatch.intake")
Batch = Sequence[tuple[Msg, CloudEvent]]


def _when(text: str | None) -> datetime | None:
    if not text:
        return None
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def refusal(req: DispatchRequested) -> str | None:
    """Why a request can never be sent, or None."""
    if req.channel not in CHANNELS:
        return f"unknown channel {req.channel!r}"
    a = req.address
    if req.channel == "push" and not (a and a.devices):
        return "no address: the customer has no push device"
    if req.channel == "email" and not (a and a.email):
        return "no address: the customer has no e-mail address"
    if req.channel == "sms" and not (a and a.msisdn):
        return "no address: the customer has no MSISDN"
    return None


def address_key(req: DispatchRequested) -> str | None:
    """The number or address a reply comes from (inbound SMS matching)."""
    if req.address is None:
        return None
    if req.channel == "sms":
        return req.address.msisdn
    if req.channel == "email":
        return (req.address.email or "").lower() or None
    return None


def plan(req: DispatchRequested, traceparent: str | None, now: datetime) -> store.NewMessage:
    """How a request is stored: queued for its sender, or final at once."""
    expires = _when(req.expires_at)
    reason = refusal(req)
    status = "queued"
    provider = None
    if reason is not None:
        status = "failed"
    elif expires is not None and expires <= now:
        status, reason = "expired", "expired before dispatch received it"
    elif req.channel == "inapp":
        status, provider = "delivered", "inbox"
    return store.NewMessage(
        req,
        status,
        reason,
        traceparent,
        address_key(req),
        expires,
        _when(req.requested_at),
        provider,
    )


class Intake:
    """The ``dispatch-requests`` consumer's handler."""

    def __init__(self, db: Database, sender: Sender, *, pseudonym_key: str) -> None:
        self.db = db
        self.sender = sender
        self.pseudonym_key = pseudonym_key

    async def handle(self, batch: Batch) -> None:
        """Store a batch of requests (known tracking ids are skipped) and wake the senders."""
        now = utcnow()
        rows: list[store.NewMessage] = []
        for msg, ev in batch:
            try:
                req = DispatchRequested.parse(ev)
            except ValidationError as exc:
                if len(batch) == 1:
                    raise PoisonMessage(f"not a dispatch request: {exc}") from exc
                raise  # the runner retries one by one and dead-letters this one
            tp = (msg.headers or {}).get("traceparent")
            rows.append(plan(req, tp, now))
        # One request per tracking id in a batch (a redelivery inside the same fetch).
        unique = list({r.req.tracking_id: r for r in rows}.values())
        try:
            async with self.db.transaction() as uow:
                new = await store.insert(uow.session, unique, now)
                final_events(
                    uow,
                    [
                        (r, r.status)
                        for r in unique
                        if r.req.tracking_id in new and r.status != "queued"
                    ],
                    provider="inbox",
                )
        except Exception as exc:
            if is_transient(exc):
                raise TransientError(str(exc)) from exc
            raise
        for r in unique:
            if r.req.tracking_id in new and r.status == "queued":
                self.sender.wake(r.req.channel, r.req.lane)

    async def receipts(self, batch: Batch) -> None:
        """Providers' receipts (``dispatch.receipt.<channel>``): delivered or failed after the
        send, applied in one transaction per batch with their ``delivery.<status>``."""
        got = []
        for _, ev in batch:
            try:
                got.append(ProviderReceipt.parse(ev))
            except ValidationError as exc:
                if len(batch) == 1:
                    raise PoisonMessage(f"not a receipt: {exc}") from exc
                raise
        now = utcnow()
        try:
            async with self.db.transaction() as uow:
                for r in got:
                    req = await store.mark(
                        uow.session, r.tracking_id, status=r.status, reason=r.reason, now=now
                    )
                    if req is None:  # unknown, or already in that state (a repeated receipt)
                        continue
                    subject, ev = DeliveryReported(
                        tracking_id=req.tracking_id,
                        customer_id=req.customer_id,
                        campaign_id=req.campaign_id,
                        channel=req.channel,
                        status=r.status,
                        provider=r.provider,
                        provider_id=r.provider_id,
                        reason=r.reason,
                    ).to_event(source=SOURCE, id_=f"delivery-{req.tracking_id}-{r.status}")
                    uow.emit(subject, ev)
        except Exception as exc:
            if is_transient(exc):
                raise TransientError(str(exc)) from exc
            raise

    def pseudonym(self, customer_id: str) -> str:
        """The erased customer's stand-in (shared.privacy: the same in every service)."""
        return pseudonym(self.pseudonym_key, customer_id)

    async def erase(self, batch: Batch) -> None:
        """``profile.erased``: the customer's messages lose address, content and id."""
        ids: list[str] = []
        for _, ev in batch:
            e = ProfileErased.parse(ev)
            ids += [e.customer_id, *e.ids]
        ids = sorted(set(ids))
        async with self.db.transaction() as uow:
            n = await store.erase(uow.session, ids, {i: self.pseudonym(i) for i in ids})
        if n:
            log.info("erased personal data from %d messages", n)
