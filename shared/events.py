"""CloudEvents 1.0 envelope used on every subject."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, Field


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def iso(ts: datetime) -> str:
    """RFC 3339 in UTC with a Z suffix."""
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


class CloudEvent(BaseModel):
    """A CloudEvents 1.0 structured-mode envelope; ``subject`` is the customer id."""

    id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    source: str
    type: str
    specversion: str = "1.0"
    time: str = Field(default_factory=lambda: iso(utcnow()))
    subject: str | None = None
    datacontenttype: str = "application/json"
    data: dict[str, Any] = Field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """Serialise with orjson (fields are plain JSON types, so no model_dump is needed)."""
        return orjson.dumps(self.__dict__)

    @staticmethod
    def envelope(
        *, source: str, type: str, subject: str | None, data: dict[str, Any]
    ) -> dict[str, Any]:
        """A new envelope as a plain dict, for code that emits thousands at once."""
        return {
            "id": str(uuid.UUID(int=random.getrandbits(128), version=4)),
            "source": source,
            "type": type,
            "specversion": "1.0",
            "time": iso(utcnow()),
            "subject": subject,
            "datacontenttype": "application/json",
            "data": data,
        }

    @classmethod
    def new(
        cls, *, source: str, type: str, subject: str | None, data: dict[str, Any]
    ) -> CloudEvent:
        """A new envelope without re-validating what the caller built (hot paths)."""
        return cls.model_construct(
            id=str(uuid.UUID(int=random.getrandbits(128), version=4)),
            source=source,
            type=type,
            specversion="1.0",
            time=iso(utcnow()),
            subject=subject,
            datacontenttype="application/json",
            data=data,
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> CloudEvent:
        """Parse and validate an envelope; raises on anything malformed."""
        return cls.model_validate(orjson.loads(raw))
