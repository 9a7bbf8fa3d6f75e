"""Selection tables (schema ``selection``). API schemas live in shared.contracts.segments."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlmodel import Field, SQLModel

SCHEMA = "selection"


class Segment(SQLModel, table=True):
    """A named audience rule; ``refs`` are the segments its rule refers to (cycle checks)."""

    __tablename__ = "segment"
    __table_args__ = {"schema": SCHEMA}
    segment_id: str = Field(primary_key=True, max_length=128)
    name: str
    description: str | None = None
    rule: dict[str, Any] = Field(sa_column=sa.Column(JSONB, nullable=False))
    refs: list[str] = Field(
        default_factory=list, sa_column=sa.Column(ARRAY(sa.Text), nullable=False)
    )
    version: int = 1
    created_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    updated_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    updated_by: str | None = None


class Snapshot(SQLModel, table=True):
    """Frozen membership of a segment; members are stored in chunks (snapshot_chunk)."""

    __tablename__ = "snapshot"
    __table_args__ = {"schema": SCHEMA}
    snapshot_id: str = Field(primary_key=True)
    segment_id: str = Field(index=True)
    segment_version: int
    rule: dict[str, Any] = Field(sa_column=sa.Column(JSONB, nullable=False))
    count: int
    chunk_size: int
    created_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    created_by: str | None = None
