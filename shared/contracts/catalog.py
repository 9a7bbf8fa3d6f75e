"""Catalog (offers, campaigns, lifecycle) request and response schemas of API.md."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from shared.contracts.params import (
    NAME_HELP,
    NAME_PATTERN,
    POLICY_SCOPE_PATTERN,
    Count,
    Number,
    Rfc3339,
    RunId,
    SnapshotId,
)
from shared.rules import DURATION_PATTERN, parse_duration

ID_PATTERN = r"^[A-Za-z0-9_.:@-]{1,128}$"
CatalogId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Channel = Literal["push", "email", "sms", "inapp"]
Touchpoint = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Rule = dict[str, Any]
CampaignType = Literal["realtime", "triggered", "batch"]
CampaignState = Literal["draft", "submitted", "approved", "active", "paused", "completed"]


def _duration(v: str) -> str:
    parse_duration(v)  # raises ValueError with a message a person can act on
    return v


Duration = Annotated[
    str,
    StringConstraints(max_length=16),
    Field(json_schema_extra={"pattern": DURATION_PATTERN}, examples=["90s", "15m", "48h", "30d"]),
]


class Content(BaseModel):
    """One channel's content; every text is a Jinja2 template over the profile (+ event)."""

    model_config = ConfigDict(extra="forbid")
    title: str | None = Field(default=None, max_length=500)
    body: str | None = Field(default=None, max_length=5000)
    subject: str | None = Field(default=None, max_length=500)
    html: str | None = Field(default=None, max_length=100_000)
    text: str | None = Field(default=None, max_length=5000)
    deeplink: str | None = Field(default=None, max_length=2000)


class OfferContent(BaseModel):
    model_config = ConfigDict(extra="forbid")
    default: Content
    push: Content | None = None
    email: Content | None = None
    sms: Content | None = None
    inapp: Content | None = None


class OfferReward(BaseModel):
    """What an offer grants when it is accepted or converts."""

    model_config = ConfigDict(extra="forbid")
    type: str = Field(min_length=1, max_length=100)
    amount: Number = Field(gt=0)


Reward = OfferReward  # the name this contract had first


class OfferPut(BaseModel):
    """``PUT /v1/offers/{offer_id}``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    value: Number = Field(default=1.0, ge=0, description="Worth of an acceptance, for ranking")
    link: str | None = Field(default=None, max_length=2000)
    valid_from: Rfc3339 | None = None
    valid_to: Rfc3339 | None = None
    content: OfferContent
    reward: OfferReward | None = None

    @field_validator("valid_to")
    @classmethod
    def _after_from(cls, v: datetime | None, info: Any) -> datetime | None:
        start = info.data.get("valid_from")
        if v is not None and start is not None and v <= start:
            raise ValueError("valid_to must be after valid_from")
        return v


class Offer(OfferPut):
    offer_id: str
    version: int
    created_at: datetime
    updated_at: datetime


class OfferList(BaseModel):
    offers: list[Offer]
    next_cursor: str | None = None


class Unless(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event: str = Field(min_length=1, max_length=200)
    within: Duration

    _check = field_validator("within")(_duration)


class Trigger(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event: str = Field(min_length=1, max_length=200)
    where: Rule | None = None
    delay: Duration = "0s"
    unless: Unless | None = None
    exclusive: bool = Field(
        default=True,
        description="One message per event and customer: exclusive campaigns firing on the "
        "same event compete and only the best is sent; false sends this one regardless",
    )

    _check = field_validator("delay")(_duration)


class Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: Rfc3339 | None = None
    end: Rfc3339 | None = None
    cron: str | None = Field(default=None, max_length=100)
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is not None and not croniter.is_valid(v):
            raise ValueError(f"not a cron expression: {v!r} (five fields, e.g. '0 9 * * MON')")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown time zone {v!r} (an IANA name such as Europe/Berlin)"
            ) from exc
        return v


class Treatment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64)
    offer: CatalogId
    weight: Number = Field(default=1.0, gt=0)
    tier: Rule | None = None


class Reentry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max: Count = Field(ge=1, le=1000)
    per: Duration

    _check = field_validator("per")(_duration)


class Conversion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event: str = Field(min_length=1, max_length=200)
    within: Duration

    _check = field_validator("within")(_duration)


class CampaignPut(BaseModel):
    """``PUT /v1/campaigns/{campaign_id}``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    type: CampaignType
    priority: Count = Field(default=50, ge=0, le=100)
    audience: Rule | None = None
    trigger: Trigger | None = None
    schedule: Schedule = Field(default_factory=Schedule)
    touchpoints: list[Touchpoint] = Field(default_factory=list, max_length=50)
    channels: list[Channel] = Field(default_factory=list, max_length=4)
    treatments: list[Treatment] = Field(min_length=1, max_length=20)
    control_group: Number = Field(default=0.0, ge=0.0, le=0.5)
    reentry: Reentry | None = None
    conversion: Conversion | None = None
    approval_required: bool = True


class Campaign(CampaignPut):
    campaign_id: str
    state: CampaignState
    version: int
    created_at: datetime
    updated_at: datetime
    updated_by: str | None = None


class CampaignList(BaseModel):
    campaigns: list[Campaign]
    next_cursor: str | None = None


class Transition(BaseModel):
    from_state: CampaignState | None
    to_state: CampaignState
    principal: str | None
    at: datetime


class TransitionList(BaseModel):
    campaign_id: str
    state: CampaignState
    transitions: list[Transition]


class PolicyRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channel: Annotated[str, StringConstraints(pattern=POLICY_SCOPE_PATTERN)] = Field(
        description=f"'*' for every contact, a channel, or a touchpoint name ({NAME_HELP})"
    )
    max: Count = Field(ge=0, le=10_000)
    per: Duration
    on_cap: Literal["defer", "drop"] = "drop"

    _check = field_validator("per")(_duration)


class QuietHours(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: Annotated[str, StringConstraints(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]
    end: Annotated[str, StringConstraints(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]


class ContactPolicy(BaseModel):
    """``PUT /v1/contact-policy``: contact pressure rules for every campaign and touchpoint."""

    model_config = ConfigDict(extra="forbid")
    rules: list[PolicyRule] = Field(default_factory=list, max_length=50)
    quiet_hours: QuietHours | None = None
    global_control: Number = Field(default=0.0, ge=0.0, le=0.5)


class DecisionRequest(BaseModel):
    """``POST /v1/decisions``."""

    model_config = ConfigDict(extra="forbid")
    customer_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:@-]{1,128}$")]
    touchpoint: Touchpoint
    placement: str | None = Field(default=None, max_length=100)
    context: dict[str, Any] = Field(default_factory=dict)
    limit: Count = Field(default=1, ge=1, le=10)


class DecidedOffer(BaseModel):
    tracking_id: str
    offer_id: str
    campaign_id: str
    treatment: str
    score: float
    content: dict[str, str]
    link: str | None = None


class Considered(BaseModel):
    campaign_id: str
    outcome: Literal["offered", "control", "ineligible", "suppressed", "outranked"]
    reason: str
    score: float | None = None


class DecisionResponse(BaseModel):
    decision_id: str
    customer_id: str
    touchpoint: str
    offers: list[DecidedOffer]
    explain: list[Considered] | None = None


RunStatus = Literal["running", "completed", "failed", "cancelled"]


class RunCounts(BaseModel):
    """What a run (or a simulation) did to its audience."""

    selected: int = Field(0, description="members of the frozen audience")
    processed: int = Field(0, description="members walked so far")
    control: int = 0
    suppressed: dict[str, int] = Field(
        default_factory=dict,
        description="by reason: consent, policy, reentry, unreachable, content, unknown",
    )
    ineligible: dict[str, int] = Field(
        default_factory=dict, description="by reason: schedule, treatment, offer"
    )
    dispatched: int = 0
    deferred: int = Field(0, description="held for quiet hours or a deferring cap")
    by_channel: dict[str, int] = Field(default_factory=dict)
    by_treatment: dict[str, int] = Field(default_factory=dict)


class RunStarted(BaseModel):
    run_id: RunId


class RunInfo(RunCounts):
    """``GET /v1/campaigns/{campaign_id}/runs/{run_id}``."""

    run_id: RunId
    campaign_id: str
    status: RunStatus
    trigger: Literal["manual", "cron"]
    tick: datetime | None = None
    snapshot_id: SnapshotId | None = None
    error: str | None = None
    started_at: datetime
    finished_at: datetime | None = None
    started_by: str | None = None


class RunList(BaseModel):
    campaign_id: str
    runs: list[RunInfo]


class Simulation(RunCounts):
    """``POST /v1/campaigns/{campaign_id}/simulate``: what a run (batch) or the last day of
    trigger events (triggered) would do, without reserving, recording or sending."""

    campaign_id: str
    kind: Literal["run", "triggers"]
    events: int | None = Field(None, description="trigger events replayed (triggered)")
    took_ms: float
