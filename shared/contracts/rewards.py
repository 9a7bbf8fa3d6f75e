"""Reward schemas of API.md (``GET /v1/rewards/{tracking_id}``, ``POST …/revoke``)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

TRACKING_ID_PATTERN = r"^[A-Za-z0-9_.:@-]{1,200}$"
RewardState = Literal["pending", "granted", "revoked", "failed"]


class RewardAttempt(BaseModel):
    """One call of the bonus system's webhook and what it answered."""

    time: datetime
    action: Literal["grant", "revoke"]
    status: int | None = Field(description="HTTP status; null when it did not answer")
    answer: str | None = Field(default=None, description="The first 300 characters it answered")


class Reward(BaseModel):
    """The reward granted for one contact, and its state."""

    tracking_id: str
    grant_id: str = Field(description="Sent to the bonus system; its Idempotency-Key")
    customer_id: str
    campaign_id: str
    offer_id: str | None = None
    type: str
    amount: float
    state: RewardState = Field(
        description="pending (being granted or retried), granted, revoked, failed"
    )
    reason: str | None = Field(
        default=None, description="Why it failed (the bonus system's answer)"
    )
    attempts: list[RewardAttempt]
    created_at: datetime
    updated_at: datetime
    granted_at: datetime | None = None
    revoked_at: datetime | None = None
