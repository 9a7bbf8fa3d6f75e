"""Decision tables (schema ``decision``): the catalog. API schemas: shared.contracts.catalog."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

SCHEMA = "decision"


def _ts() -> Any:
    return sa.Column(sa.DateTime(timezone=True), nullable=False)


class Offer(SQLModel, table=True):
    """An offer; ``body`` holds the validated OfferPut document."""

    __tablename__ = "offer"
    __table_args__ = {"schema": SCHEMA}
    offer_id: str = Field(primary_key=True, max_length=128)
    body: dict[str, Any] = Field(sa_column=sa.Column(JSONB, nullable=False))
    version: int = 1
    created_at: datetime = Field(sa_column=_ts())
    updated_at: datetime = Field(sa_column=_ts())


class Campaign(SQLModel, table=True):
    """A campaign; ``body`` holds the validated CampaignPut document, ``state`` its lifecycle."""

    __tablename__ = "campaign"
    __table_args__ = {"schema": SCHEMA}
    campaign_id: str = Field(primary_key=True, max_length=128)
    body: dict[str, Any] = Field(sa_column=sa.Column(JSONB, nullable=False))
    state: str = "draft"
    version: int = 1
    submitted_by: str | None = None
    created_at: datetime = Field(sa_column=_ts())
    updated_at: datetime = Field(sa_column=_ts())
    updated_by: str | None = None


class CampaignTransition(SQLModel, table=True):
    """Who moved a campaign from one state to another, and when."""

    __tablename__ = "campaign_transition"
    __table_args__ = {"schema": SCHEMA}
    id: int | None = Field(default=None, primary_key=True)
    campaign_id: str = Field(index=True)
    from_state: str | None = None
    to_state: str
    principal: str | None = None
    at: datetime = Field(sa_column=_ts())


class ContactPolicyRow(SQLModel, table=True):
    """The one contact policy document (id = 1)."""

    __tablename__ = "contact_policy"
    __table_args__ = {"schema": SCHEMA}
    id: int = Field(default=1, primary_key=True)
    body: dict[str, Any] = Field(sa_column=sa.Column(JSONB, nullable=False))
    version: int = 1
    updated_at: datetime = Field(sa_column=_ts())
    updated_by: str | None = None
