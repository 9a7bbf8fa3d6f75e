"""The feedback contracts: ``POST /v1/responses``, the 360° history, campaign and programme
reports, and the internal contact export for selection."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from shared.contracts.bus import Outcome
from shared.events import utcnow

TRACKING_ID_PATTERN = r"^[A-Za-z0-9_.:@-]{1,128}$"
# A response may be stamped by a client whose clock runs a little ahead; not further.
MAX_FUTURE_SKEW = timedelta(minutes=5)
# Nor long before any contact still worth reporting (each month of history is a partition).
MAX_AGE = timedelta(days=400)
COUNTS = (
    "targeted",
    "control",
    "offered",
    "sent",
    "delivered",
    "failed",
    "bounced",
    "opened",
    "clicked",
    "accepted",
    "declined",
    "converted",
    "unsubscribed",
)

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class ResponseIn(BaseModel):
    """One response to a contact (``POST /v1/responses``)."""

    model_config = ConfigDict(extra="forbid")
    tracking_id: str = Field(pattern=TRACKING_ID_PATTERN)
    outcome: Outcome
    value: Number | None = None
    time: AwareDatetime | None = None

    @field_validator("time")
    @classmethod
    def _not_in_future(cls, v: datetime | None) -> datetime | None:
        if v is not None and v > utcnow() + MAX_FUTURE_SKEW:
            raise ValueError("time lies in the future (more than 5 minutes ahead of the server)")
        if v is not None and v < utcnow() - MAX_AGE:
            raise ValueError("time lies more than 400 days in the past")
        return v


class ResponseAccepted(BaseModel):
    tracking_id: str
    outcome: str
    recorded: bool = Field(description="false when this (tracking_id, outcome) was seen before")


class HistoryContact(BaseModel):
    tracking_id: str
    campaign_id: str
    offer_id: str | None = None
    treatment: str | None = None
    channel: str | None = None
    touchpoint: str | None = None
    status: str
    control: bool
    at: str


class HistoryResponse(BaseModel):
    tracking_id: str
    campaign_id: str
    outcome: str
    value: float | None = None
    channel: str | None = None
    at: str


class CustomerHistory(BaseModel):
    """A customer's newest contacts and responses (at most 50 each), for the 360° view."""

    contacts: list[HistoryContact]
    responses: list[HistoryResponse]


class Counts(BaseModel):
    """The counts of one slice of a campaign."""

    targeted: int = 0
    control: int = 0
    offered: int = 0
    sent: int = 0
    delivered: int = 0
    failed: int = 0
    bounced: int = 0
    opened: int = 0
    clicked: int = 0
    accepted: int = 0
    declined: int = 0
    converted: int = 0
    unsubscribed: int = 0
    revenue: float = 0.0


class Side(BaseModel):
    """One side of the comparison: contacts, converted, revenue."""

    contacts: int
    converted: int
    revenue: float


class Uplift(BaseModel):
    """Target against control: rates, uplift, Newcombe's 95 % interval, two-sided p-value."""

    target_rate: float
    control_rate: float
    absolute: float
    relative: float
    ci95: tuple[float, float]
    p_value: float
    incremental_revenue: float = 0.0
    revenue_per_contact_target: float = 0.0
    revenue_per_contact_control: float = 0.0
    target: Side
    control: Side


class CampaignReport(BaseModel):
    campaign_id: str
    totals: Counts
    by_treatment: dict[str, Counts]
    by_channel: dict[str, Counts]
    by_day: dict[str, Counts]
    clicks_by_link: dict[str, int]
    uplift: Uplift


class Pressure(BaseModel):
    """Contacts per contacted customer in one month."""

    month: str
    customers: int
    median: float
    p90: float
    max: int


class ProgrammeReport(BaseModel):
    """The global control group against everyone treated, across every campaign."""

    treated: Counts
    global_control: Counts
    uplift: Uplift
    contacts_per_customer: Pressure


class InternalContact(BaseModel):
    customer_id: str
    campaign_id: str
    at: str


class InternalContactPage(BaseModel):
    contacts: list[InternalContact]
    next_cursor: str | None
