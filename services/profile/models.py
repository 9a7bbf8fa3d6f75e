"""Profile tables (schema ``profile``). API schemas live in shared.contracts.customers."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlmodel import Field, SQLModel

SCHEMA = "profile"


class Customer(SQLModel, table=True):
    """One unified profile; ``merged_into`` marks an id folded into another profile."""

    __tablename__ = "customer"
    __table_args__ = {"schema": SCHEMA}
    customer_id: str = Field(primary_key=True, max_length=128)
    attributes: dict[str, Any] = Field(
        default_factory=dict, sa_column=sa.Column(JSONB, nullable=False)
    )
    tags: list[str] = Field(
        default_factory=list, sa_column=sa.Column(ARRAY(sa.Text), nullable=False)
    )
    consents: dict[str, bool] = Field(
        default_factory=dict, sa_column=sa.Column(JSONB, nullable=False)
    )
    timezone: str | None = None
    locale: str | None = None
    created_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    updated_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    version: int = Field(default=1, sa_column=sa.Column(sa.BigInteger, nullable=False))
    merged_into: str | None = Field(default=None, index=True)


class Identity(SQLModel, table=True):
    """An identity (email, msisdn, device_id, anonymous_id, external id) owned by one profile."""

    __tablename__ = "identity"
    __table_args__ = {"schema": SCHEMA}
    kind: str = Field(primary_key=True)
    value: str = Field(primary_key=True)
    customer_id: str = Field(index=True)


class Device(SQLModel, table=True):
    """A push token; dropped when a provider reports it invalid."""

    __tablename__ = "device"
    __table_args__ = {"schema": SCHEMA}
    token: str = Field(primary_key=True)
    customer_id: str = Field(index=True)
    platform: str
    app_id: str
    registered_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))


class Counter(SQLModel, table=True):
    """Behaviour of one customer for one event type: totals and time buckets, not rows per event."""

    __tablename__ = "counter"
    __table_args__ = {"schema": SCHEMA}
    customer_id: str = Field(primary_key=True)
    event_type: str = Field(primary_key=True)
    total: int = Field(default=0, sa_column=sa.Column(sa.BigInteger, nullable=False))
    first_seen: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    last_seen: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    buckets: dict[str, Any] = Field(
        default_factory=dict, sa_column=sa.Column(JSONB, nullable=False)
    )
    last: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONB, nullable=False))


class ProcessedEvent(SQLModel, table=True):
    """Event ids already applied, so a redelivered or re-posted event counts once."""

    __tablename__ = "processed_event"
    __table_args__ = {"schema": SCHEMA}
    event_id: str = Field(primary_key=True)
    at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))


class Merge(SQLModel, table=True):
    """A recorded merge: who folded which profile into which, and what moved."""

    __tablename__ = "merge"
    __table_args__ = {"schema": SCHEMA}
    merge_id: int | None = Field(default=None, primary_key=True)
    target: str = Field(index=True)
    source: str
    principal: str | None = None
    at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    moved: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(JSONB, nullable=False))
