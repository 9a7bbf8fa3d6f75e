"""Customer (profile) request and response schemas of API.md."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from zoneinfo import available_timezones

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

CUSTOMER_ID_PATTERN = r"^[A-Za-z0-9_.:@-]{1,128}$"
CustomerId = Annotated[str, StringConstraints(pattern=CUSTOMER_ID_PATTERN)]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=200, strict=True)]
AttrName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]{0,127}$")]
Channel = Literal["push", "email", "sms", "inapp"]

_TIMEZONES: frozenset[str] = frozenset(available_timezones())

MAX_ATTRIBUTES = 2000
MAX_TAGS = 5000


class Consents(BaseModel):
    """Consent per channel; unknown channels are refused."""

    model_config = ConfigDict(extra="forbid")
    push: bool | None = None
    email: bool | None = None
    sms: bool | None = None
    inapp: bool | None = None

    def given(self) -> dict[str, bool]:
        return {
            k: v
            for k, v in (
                ("push", self.push),
                ("email", self.email),
                ("sms", self.sms),
                ("inapp", self.inapp),
            )
            if v is not None
        }


class Identities(BaseModel):
    """Known identities; extra keys are external ids (``crm_id`` …) and must be strings."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "additionalProperties": {
                "anyOf": [{"type": "string", "minLength": 1, "maxLength": 200}, {"type": "null"}]
            }
        },
    )
    email: str | None = Field(
        default=None, max_length=320, json_schema_extra={"pattern": "@"}, examples=["a@example.com"]
    )
    msisdn: str | None = Field(default=None, pattern=r"^\+?[0-9]{5,20}$")
    device_id: str | None = Field(default=None, max_length=200)
    anonymous_id: str | None = Field(default=None, max_length=200)

    @field_validator("email")
    @classmethod
    def _email(cls, v: str | None) -> str | None:
        if v is not None and "@" not in v:
            raise ValueError("not an e-mail address")
        return v

    def as_dict(self) -> dict[str, str]:
        # The fields and the extra keys as stored, without ``model_dump`` copying them first
        # (this runs for every import line).
        out = {k: v for k, v in self.__dict__.items() if v is not None}
        for k, v in (self.__pydantic_extra__ or {}).items():
            if v is not None:
                out[k] = v
        for k, v in out.items():
            if not isinstance(v, str) or not v or len(v) > 200 and k != "email":
                raise ValueError(f"identity {k!r} must be a non-empty string")
        return out


def _check_tz(v: str | None) -> str | None:
    if v is not None and v not in _TIMEZONES:
        raise ValueError(f"unknown time zone {v!r} (use an IANA name such as Europe/Berlin)")
    return v


class CustomerPut(BaseModel):
    """The body of ``PUT /v1/customers/{id}``: the whole profile."""

    model_config = ConfigDict(extra="forbid")
    attributes: dict[AttrName, Any] = Field(default_factory=dict, max_length=MAX_ATTRIBUTES)
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    consents: Consents = Field(default_factory=Consents)
    identities: Identities = Field(default_factory=Identities)
    timezone: str | None = None
    locale: str | None = Field(default=None, pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")

    _tz = field_validator("timezone")(_check_tz)

    @field_validator("attributes")
    @classmethod
    def _no_null(cls, v: dict[str, Any]) -> dict[str, Any]:
        return {k: x for k, x in v.items() if x is not None}


class CustomerImportLine(CustomerPut):
    """One NDJSON line of an import: a PUT body plus ``customer_id``."""

    customer_id: CustomerId


class CustomerPatch(BaseModel):
    """The body of ``PATCH /v1/customers/{id}``."""

    model_config = ConfigDict(extra="forbid")
    attributes: dict[AttrName, Any] | None = Field(default=None, max_length=MAX_ATTRIBUTES)
    tags_add: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    tags_remove: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    consents: Consents | None = None
    identities: Identities | None = None
    timezone: str | None = None
    locale: str | None = Field(default=None, pattern=r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")

    _tz = field_validator("timezone")(_check_tz)


class Device(BaseModel):
    """A push-capable device of a customer."""

    model_config = ConfigDict(extra="forbid")
    platform: Literal["ios", "android", "web"]
    token: str = Field(min_length=8, max_length=4096)
    app_id: str = Field(min_length=1, max_length=200)


class MergeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: CustomerId = Field(alias="from")


class Contact(BaseModel):
    tracking_id: str
    campaign_id: str | None = None
    offer_id: str | None = None
    channel: str | None = None
    touchpoint: str | None = None
    status: str
    control: bool = False
    at: str


class ResponseItem(BaseModel):
    tracking_id: str
    outcome: str
    at: str


class Profile(BaseModel):
    """What the profile service holds for one customer."""

    customer_id: str
    attributes: dict[str, Any]
    tags: list[str]
    consents: dict[str, bool]
    identities: dict[str, str]
    devices: list[Device]
    counters: dict[str, dict[str, int]]
    last: dict[str, dict[str, Any]] = Field(default_factory=dict)
    first_seen: dict[str, str] = Field(default_factory=dict)
    last_seen: dict[str, str] = Field(default_factory=dict)
    timezone: str | None = None
    locale: str | None = None
    created_at: str
    updated_at: str
    version: int


class CustomerView(Profile):
    """The 360° view of ``GET /v1/customers/{id}``."""

    segments: list[str] = Field(default_factory=list)
    contacts: list[Contact] = Field(default_factory=list)
    responses: list[ResponseItem] = Field(default_factory=list)
    partial: bool = False
    missing: list[str] = Field(default_factory=list)


class WriteAccepted(BaseModel):
    customer_id: str
    version: int


class ImportResult(BaseModel):
    imported: int
    failed: int
    errors: list[dict[str, Any]]


class MergeRecord(BaseModel):
    merge_id: int
    target: str
    source: str
    principal: str | None
    at: str
    moved: dict[str, Any]


class MergeList(BaseModel):
    merges: list[MergeRecord]


class LookupResult(BaseModel):
    """``GET /v1/customers:lookup``: the surviving profile that owns the identity."""

    customer_id: str


class ErasureAccepted(BaseModel):
    """``DELETE /v1/customers/{customer_id}``: the ids whose personal data is being erased
    (the customer and every profile merged into it)."""

    customer_id: str
    erased: list[str]
