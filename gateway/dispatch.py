"""Outbound messages in the public API (forwarded to dispatch): support's message view, the
in-app inbox, the SMS gateway's webhooks, the local outbox."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.responses import Response

from gateway.upstream import Upstreams, forward, relay
from shared.auth import Principal, require
from shared.contracts import dispatch as api
from shared.contracts import params
from shared.contracts.customers import CUSTOMER_ID_PATTERN
from shared.errors import NotFound
from shared.links import MAX_TOKEN, InvalidLink, signer_from
from shared.service import Runtime, runtime

router = APIRouter(tags=["messages"])
RuntimeDep = Annotated[Runtime, Depends(runtime)]
Tracking = Annotated[str, Path(pattern=api.TRACKING_PATTERN)]
CustomerId = Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN)]
Reporter = Annotated[Principal, Depends(require("reports:read"))]
InboxReader = Annotated[Principal, Depends(require("inbox:read"))]
Inbound = Annotated[Principal, Depends(require("channels:inbound"))]


@router.get("/v1/messages/{tracking_id}", response_model=api.Message)
async def get_message(
    request: Request, tracking_id: Tracking, principal: Reporter, rt: RuntimeDep
) -> Response:
    """One outbound message: channel, status and every attempt with the provider's answer."""
    return await forward(request, rt, principal, "dispatch", "GET", f"/v1/messages/{tracking_id}")


@router.get("/v1/customers/{customer_id}/inbox", response_model=api.Inbox)
async def get_inbox(
    request: Request, customer_id: CustomerId, principal: InboxReader, rt: RuntimeDep
) -> Response:
    """In-app messages not yet expired, newest first."""
    return await forward(
        request, rt, principal, "dispatch", "GET", f"/v1/customers/{customer_id}/inbox"
    )


@router.post("/v1/customers/{customer_id}/inbox/{message_id}/read", response_model=api.InboxRead)
async def read_message(
    request: Request,
    customer_id: CustomerId,
    message_id: Tracking,
    principal: InboxReader,
    rt: RuntimeDep,
) -> Response:
    """Mark an in-app message read (recorded as ``opened``)."""
    path = f"/v1/customers/{customer_id}/inbox/{message_id}/read"
    return await forward(request, rt, principal, "dispatch", "POST", path)


@router.post("/v1/channels/sms/inbound", status_code=202, response_model=api.InboundMatch)
async def inbound_sms(
    request: Request, body: api.InboundSms, principal: Inbound, rt: RuntimeDep
) -> Response:
    """The SMS gateway's webhook: a reply, matched to the number's newest message."""
    return await forward(request, rt, principal, "dispatch", "POST", "/v1/channels/sms/inbound")


@router.get("/v1/outbox", response_model=api.OutboxPage)
async def outbox(
    request: Request,
    principal: Reporter,
    rt: RuntimeDep,
    channel: Annotated[str | None, Query(pattern=params.OUTBOX_CHANNEL_PATTERN)] = None,
    after: Annotated[int, Query(ge=0, le=params.SEQUENCE_MAX)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """What the local outbox received (channels without a configured provider)."""
    params = {"after": str(after), "limit": str(limit), **({"channel": channel} if channel else {})}
    return await forward(request, rt, principal, "dispatch", "GET", "/v1/outbox", params=params)


@router.post("/callbacks/sms/{token}", status_code=204, responses={404: {"description": "Forged"}})
async def sms_status_callback(
    token: Annotated[str, Path(max_length=MAX_TOKEN, description="A signed callback token")],
    request: Request,
    rt: RuntimeDep,
) -> Response:
    """The SMS provider's delivery receipt (Twilio StatusCallback, form-encoded): open, but
    only a URL dispatch signed for that message is accepted."""
    try:
        signer_from(rt.settings).verify("c", token)
    except InvalidLink as exc:
        raise NotFound("Unknown callback.") from exc
    up: Upstreams = rt.extras["upstreams"]
    reply = await up.request(
        "dispatch",
        "POST",
        f"/callbacks/sms/{token}",
        content=await request.body(),
        headers={"content-type": request.headers.get("content-type", "")},
    )
    return relay(reply)
