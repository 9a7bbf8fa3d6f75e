"""Catalog HTTP endpoints (internal; the gateway forwards the public API here)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Header, Path, Query

from services.decision.catalog import service
from services.decision.catalog.repository import CampaignRepository, OfferRepository
from shared.contracts import catalog as api
from shared.events import utcnow
from shared.paging import decode_cursor, encode_cursor
from shared.service import Runtime, runtime

router = APIRouter(tags=["catalog"])

IdPath = Annotated[str, Path(pattern=api.ID_PATTERN)]
RuntimeDep = Annotated[Runtime, Depends(runtime)]
PrincipalHeader = Annotated[str | None, Header(alias="x-kairos-principal")]
Cursor = Annotated[str | None, Query(max_length=400)]
Limit = Annotated[int, Query(ge=1, le=500)]


@router.put("/v1/offers/{offer_id}", response_model=api.Offer)
async def put_offer(offer_id: IdPath, body: api.OfferPut, rt: RuntimeDep) -> api.Offer:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        offer = await service.put_offer(uow, offer_id=offer_id, body=body, now=utcnow())
        return service.offer_view(offer)


@router.get("/v1/offers/{offer_id}", response_model=api.Offer)
async def get_offer(offer_id: IdPath, rt: RuntimeDep) -> api.Offer:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        return service.offer_view(await service.get_offer(uow, offer_id))


@router.get("/v1/offers", response_model=api.OfferList)
async def list_offers(rt: RuntimeDep, cursor: Cursor = None, limit: Limit = 100) -> api.OfferList:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        rows = await OfferRepository(uow.session).page(decode_cursor(cursor), limit)
        nxt = encode_cursor(rows[-1].offer_id) if len(rows) == limit else None
        return api.OfferList(offers=[service.offer_view(o) for o in rows], next_cursor=nxt)


@router.put("/v1/campaigns/{campaign_id}", response_model=api.Campaign)
async def put_campaign(
    campaign_id: IdPath,
    body: api.CampaignPut,
    rt: RuntimeDep,
    principal: PrincipalHeader = None,
) -> api.Campaign:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        camp = await service.put_campaign(
            uow, campaign_id=campaign_id, body=body, principal=principal, now=utcnow()
        )
        return service.campaign_view(camp)


@router.get("/v1/campaigns/{campaign_id}", response_model=api.Campaign)
async def get_campaign(campaign_id: IdPath, rt: RuntimeDep) -> api.Campaign:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        return service.campaign_view(await service.get_campaign(uow, campaign_id))


@router.get("/v1/campaigns", response_model=api.CampaignList)
async def list_campaigns(
    rt: RuntimeDep, cursor: Cursor = None, limit: Limit = 100
) -> api.CampaignList:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        rows = await CampaignRepository(uow.session).page(decode_cursor(cursor), limit)
        nxt = encode_cursor(rows[-1].campaign_id) if len(rows) == limit else None
        return api.CampaignList(campaigns=[service.campaign_view(c) for c in rows], next_cursor=nxt)


@router.post("/v1/campaigns/{campaign_id}/{action}", response_model=api.Campaign)
async def transition(
    campaign_id: IdPath,
    action: Literal["submit", "approve", "activate", "pause", "complete"],
    rt: RuntimeDep,
    principal: PrincipalHeader = None,
) -> api.Campaign:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        camp = await service.transition(
            uow, campaign_id=campaign_id, action=action, principal=principal, now=utcnow()
        )
        return service.campaign_view(camp)


@router.get("/v1/campaigns/{campaign_id}/transitions", response_model=api.TransitionList)
async def transitions(campaign_id: IdPath, rt: RuntimeDep) -> api.TransitionList:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        return await service.transitions(uow, campaign_id)
