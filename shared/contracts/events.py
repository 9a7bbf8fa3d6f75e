"""The ``POST /v1/events`` contract."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from shared.contracts.customers import CustomerId

EVENT_TYPE_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$"
MAX_BATCH = 1000


class EventIn(BaseModel):
    """One behavioural event from an app or another system."""

    model_config = ConfigDict(extra="forbid")
    id: uuid.UUID | None = None
    type: str = Field(pattern=EVENT_TYPE_PATTERN, max_length=64)
    customer_id: CustomerId | None = None
    anonymous_id: CustomerId | None = None
    time: AwareDatetime | None = None
    properties: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _who(self) -> EventIn:
        if self.customer_id is None and self.anonymous_id is None:
            raise ValueError("customer_id or anonymous_id is required")
        return self


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_BATCH)


class EventsAccepted(BaseModel):
    accepted: int
    ids: list[str]


def event_time(ev: EventIn, now: datetime) -> datetime:
    """The event's own time, or when it arrived."""
    return ev.time or now
