"""Keyset reads of the history: a customer's newest rows, pages for exports and selection."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from shared.errors import Unprocessable
from shared.events import iso

S = "feedback"

CONTACT_COLUMNS = (
    "tracking_id",
    "at",
    "customer_id",
    "campaign_id",
    "decision_id",
    "treatment",
    "offer_id",
    "touchpoint",
    "channel",
    "placement",
    "control",
    "control_kind",
    "status",
    "value",
    "run_id",
    "sent_at",
    "delivered_at",
    "failed_at",
    "bounced_at",
    "expired_at",
)
RESPONSE_COLUMNS = (
    "tracking_id",
    "outcome",
    "at",
    "customer_id",
    "campaign_id",
    "treatment",
    "offer_id",
    "channel",
    "control",
    "value",
    "link",
    "text",
    "choice",
    "source",
)
# The keyset of each table: its time, then what makes a row unique within that time.
KEYSET = {"contacts": ("at", "tracking_id"), "responses": ("at", "tracking_id", "outcome")}
COLUMNS = {"contacts": CONTACT_COLUMNS, "responses": RESPONSE_COLUMNS}


def encode_cursor(values: Sequence[Any]) -> str:
    """An opaque cursor from the last row's keyset values."""
    parts = [iso(v) if isinstance(v, datetime) else str(v) for v in values]
    return base64.urlsafe_b64encode("\x1f".join(parts).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, n: int) -> list[str]:
    """The keyset values of a cursor; a 422 naming ``after`` if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        parts = raw.split("\x1f")
        datetime.fromisoformat(parts[0].replace("Z", "+00:00"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unprocessable(
            "after: not a cursor from this endpoint",
            errors=[{"loc": ["after"], "msg": "bad cursor"}],
        ) from exc
    if len(parts) != n:
        raise Unprocessable(
            "after: not a cursor from this endpoint",
            errors=[{"loc": ["after"], "msg": "bad cursor"}],
        )
    return parts


class HistoryReads:
    """Read-only queries over contacts and responses."""

    def __init__(self, session: AsyncSession | AsyncConnection) -> None:
        self.session = session

    async def customer(self, customer_id: str, limit: int = 50) -> dict[str, list[dict[str, Any]]]:
        """The newest contacts and responses of a customer."""
        contacts = await self.session.execute(
            sa.text(
                f"SELECT tracking_id, campaign_id, offer_id, treatment, channel, touchpoint,"
                f" status, control, at FROM {S}.contacts WHERE customer_id = :c"
                f" ORDER BY at DESC, tracking_id DESC LIMIT :n"
            ),
            {"c": customer_id, "n": limit},
        )
        responses = await self.session.execute(
            sa.text(
                f"SELECT tracking_id, campaign_id, outcome, value, channel, at FROM {S}.responses"
                f" WHERE customer_id = :c ORDER BY at DESC, tracking_id DESC LIMIT :n"
            ),
            {"c": customer_id, "n": limit},
        )
        return {
            "contacts": [{**r._asdict(), "at": iso(r.at)} for r in contacts.all()],
            "responses": [{**r._asdict(), "at": iso(r.at)} for r in responses.all()],
        }

    async def page(
        self,
        table: str,
        *,
        since: datetime,
        until: datetime,
        after: list[str] | None,
        limit: int,
        columns: Sequence[str] | None = None,
        targets_only: bool = False,
    ) -> list[sa.Row[Any]]:
        """One keyset page of ``table`` with ``since <= at < until``, after a cursor."""
        keys = KEYSET[table]
        cols = ", ".join(columns or COLUMNS[table])
        where = ["at >= :since", "at < :until"]
        params: dict[str, Any] = {"since": since, "until": until, "n": limit}
        if targets_only:
            where.append("NOT control")
        if after is not None:
            holders = []
            for i, (k, v) in enumerate(zip(keys, after, strict=True)):
                params[f"k{i}"] = (
                    datetime.fromisoformat(v.replace("Z", "+00:00")) if k == "at" else v
                )
                holders.append(f":k{i}")
            where.append(f"({', '.join(keys)}) > ({', '.join(holders)})")
        # Walk the (at, key) index in order. A planner misled by stale statistics (a month
        # just bulk-written) would otherwise collect the whole rest of the range and sort
        # it, for every page: an export quadratic in its size.
        await self.session.execute(sa.text("SET LOCAL enable_sort = off"))
        rows = await self.session.execute(
            sa.text(
                f"SELECT {cols} FROM {S}.{table} WHERE {' AND '.join(where)}"
                f" ORDER BY {', '.join(keys)} LIMIT :n"
            ),
            params,
        )
        return list(rows.all())
