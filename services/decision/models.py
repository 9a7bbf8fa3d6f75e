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


class Timer(SQLModel, table=True):
    """A pending firing: a delayed or ``unless`` trigger, or a deferred send. Claimed by
    one replica at a time (``claimed_until``) and deleted once done."""

    __tablename__ = "timer"
    __table_args__ = {"schema": SCHEMA}
    timer_id: str = Field(primary_key=True)
    kind: str  # fire | send | retry
    due: datetime = Field(sa_column=_ts())
    customer_id: str
    campaign_id: str
    unless_event: str | None = None
    payload: dict[str, Any] = Field(sa_column=sa.Column(JSONB, nullable=False))
    created_at: datetime = Field(sa_column=_ts())
    claimed_until: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True))
    )
    attempts: int = 0


class Run(SQLModel, table=True):
    """A batch run over a frozen audience; ``position`` is how far it has walked."""

    __tablename__ = "run"
    __table_args__ = {"schema": SCHEMA}
    run_id: str = Field(primary_key=True)
    campaign_id: str = Field(index=True)
    status: str = "running"
    dry_run: bool = False
    tick: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime(timezone=True)))
    snapshot_id: str | None = None
    selected: int = 0
    position: int = 0
    counts: dict[str, Any] = Field(sa_column=sa.Column(JSONB, nullable=False))
    error: str | None = None
    owner: str | None = None
    lease_until: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True))
    )
    started_at: datetime = Field(sa_column=_ts())
    finished_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True))
    )
    created_by: str | None = None
