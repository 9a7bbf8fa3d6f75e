"""All SQL of the decision catalog."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from services.decision.models import Campaign, CampaignTransition, ContactPolicyRow, Offer
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


class CatalogRows:
    """What a decision replica loads: active campaigns, every offer, the contact policy."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def active_campaigns(self) -> Sequence[tuple[str, dict[str, Any], datetime]]:
        rows = await self.session.execute(
            sa.select(
                col(Campaign.campaign_id), col(Campaign.body), col(Campaign.updated_at)
            ).where(col(Campaign.state) == "active")
        )
        return [(r[0], r[1], r[2]) for r in rows.all()]

    async def offers(self) -> Sequence[tuple[str, dict[str, Any]]]:
        rows = await self.session.execute(sa.select(col(Offer.offer_id), col(Offer.body)))
        return [(r[0], r[1]) for r in rows.all()]

    async def policy(self) -> dict[str, Any] | None:
        body: dict[str, Any] | None = (
            await self.session.execute(sa.select(col(ContactPolicyRow.body)))
        ).scalar()
        return body

    async def campaign(self, campaign_id: str) -> tuple[dict[str, Any], str] | None:
        """A campaign's body and state, in any state (runs and simulate)."""
        row = (
            await self.session.execute(
                sa.select(col(Campaign.body), col(Campaign.state)).where(
                    col(Campaign.campaign_id) == campaign_id
                )
            )
        ).first()
        return None if row is None else (row[0], row[1])
