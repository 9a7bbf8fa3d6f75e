"""Dispatch's HTTP routes (the gateway forwards the public ones): support's message view, the
in-app inbox, inbound SMS and the local outbox."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.responses import Response

from services.dispatch import store
from services.dispatch.channels import sms
from services.dispatch.sender import SOURCE
from shared.contracts import dispatch as api
from shared.contracts import params
from shared.contracts.bus import ProviderReceipt, ResponseReceived
from shared.contracts.customers import CUSTOMER_ID_PATTERN
from shared.db import UnitOfWork, get_uow
from shared.errors import NotFound, Unavailable
from shared.events import utcnow
from shared.links import InvalidLink, signer_from
from shared.service import Runtime

router = APIRouter(tags=["messages"])
UowDep = Annotated[UnitOfWork, Depends(get_uow)]
Tracking = Annotated[str, Path(pattern=api.TRACKING_PATTERN)]
CustomerId = Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN)]

REPLY_WINDOW = timedelta(days=7)
STOP_WORDS = frozenset({"stop", "stopall", "unsubscribe", "cancel", "end", "quit", "stopp"})


def parse_reply(text: str) -> tuple[str, str | None]:
    """(outcome, choice) of an SMS reply: a STOP keyword unsubscribes; otherwise the first
    word, lower-cased without punctuation, is the choice ("2", "yes")."""
    words = re.findall(r"[\w+-]+", text.strip().lower())
    if not words:
        return "replied", None
    if words[0] in STOP_WORDS:
        return "unsubscribed", None
    return "replied", words[0]


def _message(row: dict[str, Any]) -> api.Message:
    req = row["request"]
    return api.Message(
        tracking_id=row["tracking_id"],
        customer_id=row["customer_id"],
        campaign_id=row["campaign_id"],
        treatment=req.get("treatment"),
        offer_id=req.get("offer_id"),
        channel=row["channel"],
        lane=row["lane"],
        priority=row["priority"],
        status=row["status"],
        in_doubt=row["in_doubt"],
        provider=row["provider"],
        provider_id=row["provider_id"],
        reason=row["reason"],
        content=req.get("content") or {},
        created_at=row["created_at"],
        requested_at=row["requested_at"],
        sent_at=row["sent_at"],
        delivered_at=row["delivered_at"],
        expires_at=row["expires_at"],
        read_at=row["read_at"],
        attempts=[api.Attempt.model_validate(a) for a in row["attempts"]],
    )


@router.get("/v1/messages/{tracking_id}", response_model=api.Message)
async def get_message(tracking_id: Tracking, uow: UowDep) -> api.Message:
    """One outbound message, its status and every attempt with the provider's answer."""
    row = await store.get(uow.session, tracking_id)
    if row is None:
        raise NotFound(f"No message with tracking id '{tracking_id}'.")
    return _message(row)


@router.get("/v1/customers/{customer_id}/inbox", response_model=api.Inbox)
async def get_inbox(customer_id: CustomerId, uow: UowDep) -> api.Inbox:
    """The customer's in-app messages not yet expired, newest first."""
    rows = await store.inbox(uow.session, customer_id, utcnow())
    return api.Inbox(
        messages=[
            api.InboxMessage(
                message_id=r["tracking_id"],
                tracking_id=r["tracking_id"],
                title=(r["request"].get("content") or {}).get("title"),
                body=(r["request"].get("content") or {}).get("body"),
                deeplink=(r["request"].get("content") or {}).get("deeplink")
                or r["request"].get("link"),
                created_at=r["created_at"],
                expires_at=r["expires_at"],
                read=r["read_at"] is not None,
            )
            for r in rows
        ]
    )


@router.post("/v1/customers/{customer_id}/inbox/{message_id}/read", response_model=api.InboxRead)
async def read_message(customer_id: CustomerId, message_id: Tracking, uow: UowDep) -> api.InboxRead:
    """Mark an in-app message read; the first read is recorded as ``opened``."""
    got = await store.read(uow.session, customer_id, message_id, utcnow())
    if got is None:
        raise NotFound(f"Customer '{customer_id}' has no in-app message '{message_id}'.")
    first, req = got
    if first:
        subject, ev = ResponseReceived(
            tracking_id=req.tracking_id,
            outcome="opened",
            channel="inapp",
            customer_id=req.customer_id,
            source="inbox",
        ).to_event(source=SOURCE, id_=f"inbox-read-{req.tracking_id}")
        uow.emit(subject, ev)
    return api.InboxRead(message_id=message_id, first_read=first)


@router.post("/v1/channels/sms/inbound", status_code=202, response_model=api.InboundMatch)
async def inbound_sms(body: api.InboundSms, uow: UowDep) -> api.InboundMatch:
    """A reply from the SMS gateway: matched to the newest message sent to that number in the
    last 7 days and recorded as ``replied`` (STOP and the like: ``unsubscribed``). A reply
    that matches nothing is accepted and ignored (the gateway must not retry it)."""
    req = await store.latest_to(uow.session, body.from_, since=utcnow() - REPLY_WINDOW)
    if req is None:
        return api.InboundMatch(matched=False)
    outcome, choice = parse_reply(body.text)
    subject, ev = ResponseReceived(
        tracking_id=req.tracking_id,
        outcome=outcome,  # type: ignore[arg-type]
        channel="sms",
        text=body.text,
        choice=choice,
        customer_id=req.customer_id,
        source="sms",
    ).to_event(source=SOURCE)
    uow.emit(subject, ev)
    return api.InboundMatch(
        matched=True,
        tracking_id=req.tracking_id,
        outcome=outcome,  # type: ignore[arg-type]
        choice=choice,
    )


@router.get("/v1/outbox", response_model=api.OutboxPage)
async def outbox(
    uow: UowDep,
    channel: Annotated[str | None, Query(pattern=params.OUTBOX_CHANNEL_PATTERN)] = None,
    after: Annotated[int, Query(ge=0, le=params.SEQUENCE_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> api.OutboxPage:
    """What the local outbox received, oldest first from ``after`` (``kairos outbox``)."""
    rows = await store.local_outbox(uow.session, channel=channel, after=after, limit=limit)
    items = []
    for r in rows:
        req = r["request"]
        a = req.get("address") or {}
        to = a.get("email") or a.get("msisdn")
        if to is None and a.get("devices"):
            to = f"{len(a['devices'])} device(s)"
        items.append(
            api.OutboxItem(
                seq=r["seq"],
                tracking_id=r["tracking_id"],
                customer_id=r["customer_id"],
                campaign_id=r["campaign_id"],
                channel=r["channel"],
                to=to,
                content=req.get("content") or {},
                delivered_at=r["delivered_at"],
            )
        )
    return api.OutboxPage(items=items, next_after=rows[-1]["seq"] if rows else after)


@router.post(
    "/callbacks/sms/{token}",
    status_code=204,
    responses={404: {"description": "Not signed"}, 503: {"description": "Try again"}},
)
async def sms_status_callback(token: str, request: Request) -> Response:
    """The SMS provider's delivery receipt (a Twilio StatusCallback, form-encoded): the URL was
    signed for one message at sending, so only its provider can move it to delivered or
    failed. The receipt is put on the bus (acknowledged, so never lost) and applied in
    batches: a provider posting thousands a second costs one publish each here."""
    rt: Runtime = request.app.state.rt
    try:
        link = signer_from(rt.settings).verify("c", token)
    except InvalidLink as exc:
        raise NotFound("Unknown callback.") from exc
    # Form-encoded (Twilio); parsed here rather than through python-multipart.
    form = dict(
        parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
    )
    status, reason = sms.parse_status_callback(form)
    if status in ("delivered", "failed"):
        subject, ev = ProviderReceipt(
            tracking_id=link.tracking_id,
            channel="sms",
            status=status,  # type: ignore[arg-type]
            reason=reason,
            provider="sms",
            provider_id=form.get("MessageSid") or None,
        ).to_event(source=SOURCE, id_=f"receipt-{link.tracking_id}-{status}")
        try:
            await rt.bus.publish(subject, ev)
        except Exception as exc:  # the provider retries a failed callback
            raise Unavailable("The receipt could not be stored; retry.") from exc
    return Response(status_code=204)
