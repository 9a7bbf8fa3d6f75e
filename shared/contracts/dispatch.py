"""The public contract of outbound messages: support's message view, the in-app inbox, the
SMS gateway's webhook, the local outbox."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MessageStatus = Literal[
    "queued", "sending", "sent", "delivered", "failed", "bounced", "expired", "in_doubt"
]
TRACKING_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
MSISDN_PATTERN = r"^\+?[0-9A-Za-z]{2,32}$"


class Attempt(BaseModel):
    """One try at the provider (for push: one device), an interruption or a later receipt."""

    n: int | None = Field(default=None, description="Attempt number (1 = first)")
    at: str
    result: str = Field(
        description="sent, delivered, failed, bounced, token_invalid, retry, expired,"
        " interrupted (in_doubt) or receipt"
    )
    provider: str | None = None
    provider_id: str | None = None
    reason: str | None = Field(default=None, description="The provider's answer")
    status: str | None = None
    duration_ms: float | None = None
    answer: dict[str, Any] = Field(default_factory=dict)
    device: dict[str, str] | None = None


class Message(BaseModel):
    """``GET /v1/messages/{tracking_id}``: one outbound message and every attempt."""

    tracking_id: str
    customer_id: str
    campaign_id: str
    treatment: str | None = None
    offer_id: str | None = None
    channel: str
    lane: str
    priority: int
    status: MessageStatus
    in_doubt: bool = Field(
        description="A send was interrupted between the provider call and its record: the"
        " provider may have received it twice"
    )
    provider: str | None = None
    provider_id: str | None = None
    reason: str | None = None
    content: dict[str, str] = Field(default_factory=dict)
    created_at: datetime
    requested_at: datetime | None = None
    sent_at: datetime | None = None
    delivered_at: datetime | None = None
    expires_at: datetime | None = None
    read_at: datetime | None = None
    attempts: list[Attempt]


class InboxMessage(BaseModel):
    message_id: str
    tracking_id: str
    title: str | None = None
    body: str | None = None
    deeplink: str | None = None
    created_at: datetime
    expires_at: datetime | None = None
    read: bool


class Inbox(BaseModel):
    """``GET /v1/customers/{customer_id}/inbox``: unexpired in-app messages, newest first."""

    messages: list[InboxMessage]


class InboxRead(BaseModel):
    message_id: str
    read: bool = True
    first_read: bool = Field(description="False when it had been read before")


class InboundSms(BaseModel):
    """``POST /v1/channels/sms/inbound``: a reply as the SMS gateway forwards it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: str = Field(alias="from", pattern=MSISDN_PATTERN)
    to: str = Field(min_length=1, max_length=32)
    text: str = Field(max_length=1600)


class InboundMatch(BaseModel):
    matched: bool
    tracking_id: str | None = None
    outcome: Literal["replied", "unsubscribed"] | None = None
    choice: str | None = None


class OutboxItem(BaseModel):
    seq: int
    tracking_id: str
    customer_id: str
    campaign_id: str
    channel: str
    to: str | None = Field(default=None, description="Address, or device count for push")
    content: dict[str, str]
    delivered_at: datetime | None = None


class OutboxPage(BaseModel):
    """``GET /v1/outbox``: what the local outbox received (providers not configured)."""

    items: list[OutboxItem]
    next_after: int = Field(description="Pass as ?after= to read on")
