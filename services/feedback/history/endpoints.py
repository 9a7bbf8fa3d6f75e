"""Feedback HTTP endpoints of the history: responses, the 360° history, selection's export."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from services.feedback.history import service
from services.feedback.history.batcher import ResponseBatcher
from services.feedback.history.reads import HistoryReads, decode_cursor, encode_cursor
from shared.contracts.bus import ResponseReceived
from shared.contracts.customers import CUSTOMER_ID_PATTERN
from shared.contracts.reports import (
    CustomerHistory,
    InternalContact,
    InternalContactPage,
    ResponseAccepted,
    ResponseIn,
)
from shared.db import Database
from shared.errors import NotFound
from shared.events import iso, utcnow
from shared.service import Runtime, runtime

router = APIRouter(tags=["history"])
RuntimeDep = Annotated[Runtime, Depends(runtime)]
# A touchpoint's contact travels over the bus while its offer is already on screen: a
# response can arrive first. Wait this long for the contact before answering 404.
CONTACT_WAIT_S = 2.0


def state(rt: Runtime) -> service.State:
    st: service.State = rt.extras["feedback"]
    return st


def database(rt: Runtime) -> Database:
    assert rt.db is not None
    return rt.db


@router.post("/v1/responses", response_model=ResponseAccepted, status_code=202)
async def post_response(body: ResponseIn, rt: RuntimeDep) -> ResponseAccepted:
    """Record a response to a contact; the same (tracking_id, outcome) counts once."""
    item = ResponseReceived(
        tracking_id=body.tracking_id,
        outcome=body.outcome,
        time=iso(body.time or utcnow()),
        value=body.value,
        source="api",
    )
    batcher: ResponseBatcher = rt.extras["responses"]
    deadline = time.monotonic() + CONTACT_WAIT_S
    while True:
        outcome = await batcher.submit(item)
        if outcome != "unknown":
            return ResponseAccepted(
                tracking_id=body.tracking_id, outcome=body.outcome, recorded=outcome == "stored"
            )
        if time.monotonic() >= deadline:
            raise NotFound(f"No contact has the tracking id '{body.tracking_id}'.")
        await asyncio.sleep(0.1)


@router.get("/v1/customers/{customer_id}/history", response_model=CustomerHistory)
async def customer_history(
    customer_id: Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN)], rt: RuntimeDep
) -> CustomerHistory:
    """The newest 50 contacts (with their delivery status) and responses of a customer."""
    async with database(rt).sessions() as session:
        doc = await HistoryReads(session).customer(customer_id)
    return CustomerHistory.model_validate(doc)


@router.get("/internal/contacts", response_model=InternalContactPage, include_in_schema=False)
async def internal_contacts(
    rt: RuntimeDep,
    since: datetime,
    after: Annotated[str | None, Query(max_length=400)] = None,
    limit: Annotated[int, Query(ge=1, le=50_000)] = 10_000,
) -> InternalContactPage:
    """Non-control contacts since a time, by keyset: selection rebuilds its ``contacted``
    index from here beyond the stream's retention."""
    if since.tzinfo is None:
        since = since.replace(tzinfo=utcnow().tzinfo)
    cursor = decode_cursor(after, 2) if after else None
    async with database(rt).sessions() as session:
        rows = await HistoryReads(session).page(
            "contacts",
            since=since,
            until=datetime.max.replace(tzinfo=since.tzinfo),
            after=cursor,
            limit=limit,
            columns=("at", "tracking_id", "customer_id", "campaign_id"),
            targets_only=True,
        )
    return InternalContactPage(
        contacts=[
            InternalContact(customer_id=r.customer_id, campaign_id=r.campaign_id, at=iso(r.at))
            for r in rows
        ],
        next_cursor=encode_cursor((rows[-1].at, rows[-1].tracking_id))
        if len(rows) == limit
        else None,
    )
