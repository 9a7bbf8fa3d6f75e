"""All SQL of the decision catalog."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlmodel import col

from services.decision.models import Campaign, CampaignTransition, Offer
from shared.db import Repository


class OfferRepository(Repository[Offer]):
    model = Offer

    async def existing(self, ids: Sequence[str]) -> set[str]:
        rows = await self.session.execute(
            sa.select(col(Offer.offer_id)).where(col(Offer.offer_id).in_(list(ids)))
        )
        return set(rows.scalars().all())

    async def page(self, after: str, limit: int) -> Sequence[Offer]:
        rows = await self.session.execute(
            sa.select(Offer)
            .where(col(Offer.offer_id) > after)
            .order_by(col(Offer.offer_id))
            .limit(limit)
        )
        return rows.scalars().all()


class CampaignRepository(Repository[Campaign]):
    model = Campaign

    async def page(self, after: str, limit: int) -> Sequence[Campaign]:
        rows = await self.session.execute(
            sa.select(Campaign)
            .where(col(Campaign.campaign_id) > after)
            .order_by(col(Campaign.campaign_id))
            .limit(limit)
        )
        return rows.scalars().all()

    async def transitions(self, campaign_id: str) -> Sequence[CampaignTransition]:
        rows = await self.session.execute(
            sa.select(CampaignTransition)
            .where(col(CampaignTransition.campaign_id) == campaign_id)
            .order_by(col(CampaignTransition.id))
        )
        return rows.scalars().all()

    def record(self, t: CampaignTransition) -> None:
        self.session.add(t)
