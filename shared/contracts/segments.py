"""Segment, preview and snapshot request and response schemas of API.md."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from shared.contracts.params import SnapshotId

SEGMENT_ID_PATTERN = r"^[A-Za-z0-9_.:@-]{1,128}$"
SegmentId = Annotated[str, StringConstraints(pattern=SEGMENT_ID_PATTERN)]
Rule = dict[str, Any]
RULE_DOC = (
    "A RULE of API.md: all / any / not / attr / tag / consent / segment / event / contacted "
    '(prop only in triggers), e.g. {"all": [{"tag": "value:gold"}, '
    '{"attr": "age", "op": "between", "value": [18, 35]}]}'
)


class SegmentPut(BaseModel):
    """``PUT /v1/segments/{segment_id}``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    rule: Rule = Field(description=RULE_DOC)


class Segment(BaseModel):
    segment_id: str
    name: str
    description: str | None = None
    rule: Rule
    version: int
    count: int | None = Field(
        default=None, description="Members now (absent while the audience index loads)"
    )
    created_at: datetime
    updated_at: datetime
    updated_by: str | None = None


class SegmentList(BaseModel):
    segments: list[Segment]
    next_cursor: str | None = None


class PreviewRequest(BaseModel):
    """``POST /v1/segments:preview``: size and make-up of an audience before it is saved."""

    model_config = ConfigDict(extra="forbid")
    rule: Rule = Field(description=RULE_DOC)
    breakdown: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] = Field(
        default_factory=list,
        max_length=10,
        description="'attributes.<name>', 'tags:<namespace>' or 'consents.<channel>'",
    )
    sample: int = Field(default=10, ge=0, le=100, description="How many member ids to show")
    top: int = Field(
        default=20, ge=1, le=100, description="Values per breakdown; the rest is '(other)'"
    )


class PreviewResult(BaseModel):
    count: int
    total: int
    breakdown: dict[str, dict[str, int]] = Field(default_factory=dict)
    sample: list[str] = Field(default_factory=list)
    took_ms: float
    as_of: datetime = Field(description="The last profile change the audience index has seen")


class RuleSnapshotRequest(BaseModel):
    """``POST /v1/snapshots``: freeze the members of a rule that is not a saved segment (a
    campaign's audience for a batch run)."""

    model_config = ConfigDict(extra="forbid")
    rule: Rule = Field(description=RULE_DOC)


class SnapshotCreated(BaseModel):
    snapshot_id: SnapshotId
    segment_id: str
    count: int
    created_at: datetime


class SnapshotPage(BaseModel):
    snapshot_id: SnapshotId
    segment_id: str
    count: int
    members: list[str]
    next_cursor: str | None = None


class IndexStatus(BaseModel):
    """The audience index of the selection process that answered."""

    state: str = Field(description="loading | ready")
    customers: int
    tags: int
    attributes: int
    event_types: int
    campaigns_contacted: int
    profile_seq: int
    loaded_from: str | None = None
    load_seconds: float | None = None
    rss_bytes: int
    last_change_at: datetime | None = None
