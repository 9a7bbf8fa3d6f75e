"""All SQL of ``decision.timer``: pending firings, claimed by one replica at a time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

TimerKind = Literal["fire", "send", "retry"]
INSERT_CHUNK = 1000


@dataclass(frozen=True, slots=True)
class NewTimer:
    """A timer to store: ``fire`` a delayed or ``unless`` trigger, ``send`` what was reserved
    during quiet hours, or ``retry`` a contact a deferring cap held back."""

    timer_id: str
    kind: TimerKind
    due: datetime
    customer_id: str
    campaign_id: str
    payload: dict[str, Any]
    created_at: datetime
    unless_event: str | None = None


@dataclass(frozen=True, slots=True)
class DueTimer:
    """A timer claimed by this replica."""

    timer_id: str
    kind: TimerKind
    due: datetime
    customer_id: str
    campaign_id: str
    unless_event: str | None
    payload: dict[str, Any]
    attempts: int


class TimerRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def insert(self, timers: Sequence[NewTimer]) -> None:
        """Insert timers; one already there (a redelivered event) is left as it is."""
        for start in range(0, len(timers), INSERT_CHUNK):
            part = timers[start : start + INSERT_CHUNK]
            await self.session.execute(
                sa.text(
                    "INSERT INTO decision.timer (timer_id, kind, due, customer_id, campaign_id, "
                    "unless_event, payload, created_at) SELECT * FROM unnest(CAST(:id AS text[]), "
                    "CAST(:kind AS text[]), CAST(:due AS timestamptz[]), CAST(:cid AS text[]), "
                    "CAST(:camp AS text[]), CAST(:unless AS text[]), CAST(:payload AS jsonb[]), "
                    "CAST(:created AS timestamptz[])) "
                    "ON CONFLICT (timer_id) DO NOTHING"
                ),
                {
                    "id": [t.timer_id for t in part],
                    "kind": [t.kind for t in part],
                    "due": [t.due for t in part],
                    "cid": [t.customer_id for t in part],
                    "camp": [t.campaign_id for t in part],
                    "unless": [t.unless_event for t in part],
                    "payload": [orjson.dumps(t.payload).decode() for t in part],
                    "created": [t.created_at for t in part],
                },
            )

    async def cancel_answered(self, answers: Sequence[tuple[str, str, datetime]]) -> None:
        """Delete the ``unless`` timers that follow-up events (customer, event type, time)
        answer: only those whose trigger came before the follow-up."""
        if not answers:
            return
        await self.session.execute(
            sa.text(
                "DELETE FROM decision.timer t USING unnest(CAST(:c AS text[]), "
                "CAST(:e AS text[]), CAST(:at AS timestamptz[])) AS x(c, e, at) "
                "WHERE t.customer_id = x.c AND t.unless_event = x.e AND t.kind = 'fire' "
                "AND CAST(t.payload->'event'->>'time' AS timestamptz) <= x.at"
            ),
            {
                "c": [c for c, _, _ in answers],
                "e": [e for _, e, _ in answers],
                "at": [t for _, _, t in answers],
            },
        )

    async def next_due_s(self) -> float | None:
        """Seconds until the next unclaimed timer is due (negative: overdue), None if none."""
        v = (
            await self.session.execute(
                sa.text(
                    "SELECT extract(epoch FROM due - now()) FROM decision.timer "
                    "WHERE claimed_until IS NULL OR claimed_until < now() "
                    "ORDER BY due LIMIT 1"
                )
            )
        ).scalar()
        return None if v is None else float(v)

    async def claim_due(self, limit: int, lease_s: int) -> list[DueTimer]:
        """Claim due timers for this replica alone (a lease; SKIP LOCKED between replicas)."""
        # Lock, then update by key (a subquery with LIMIT inside the UPDATE can be planned
        # to run again per outer row: see ``shared.db.OutboxRelay``).
        ids = (
            (
                await self.session.execute(
                    sa.text(
                        "SELECT timer_id FROM decision.timer WHERE due <= now() "
                        "AND (claimed_until IS NULL OR claimed_until < now()) ORDER BY due "
                        "LIMIT :n FOR UPDATE SKIP LOCKED"
                    ),
                    {"n": limit},
                )
            )
            .scalars()
            .all()
        )
        if not ids:
            return []
        rows = (
            (
                await self.session.execute(
                    sa.text(
                        "UPDATE decision.timer t SET claimed_until = now() + "
                        "make_interval(secs => :lease), attempts = t.attempts + 1 "
                        "WHERE t.timer_id = ANY(:ids) "
                        "RETURNING t.timer_id, t.kind, t.due, t.customer_id, t.campaign_id, "
                        "t.unless_event, t.payload, t.attempts"
                    ),
                    {"ids": list(ids), "lease": lease_s},
                )
            )
            .mappings()
            .all()
        )
        return [DueTimer(**r) for r in rows]

    async def delete(self, timer_ids: Sequence[str]) -> None:
        if timer_ids:
            await self.session.execute(
                sa.text("DELETE FROM decision.timer WHERE timer_id = ANY(:ids)"),
                {"ids": list(timer_ids)},
            )
