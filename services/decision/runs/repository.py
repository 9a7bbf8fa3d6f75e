"""All SQL of ``decision.run``: batch runs, their leases and checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncSession


def _json(v: Any) -> str:
    return orjson.dumps(v).decode()


class RunRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def busy(self, campaign_id: str) -> str | None:
        """The campaign's run still going (a real one, not a dry run), if any."""
        v: str | None = (
            await self.session.execute(
                sa.text(
                    "SELECT run_id FROM decision.run WHERE campaign_id = :c "
                    "AND status = 'running' AND NOT dry_run LIMIT 1"
                ),
                {"c": campaign_id},
            )
        ).scalar()
        return v

    async def insert(
        self,
        run_id: str,
        campaign_id: str,
        *,
        tick: datetime | None,
        counts: dict[str, Any],
        principal: str | None,
    ) -> bool:
        """A new running run; False when this (campaign, tick) already has one."""
        res = await self.session.execute(
            sa.text(
                "INSERT INTO decision.run (run_id, campaign_id, status, tick, counts, "
                "started_at, created_by) VALUES (:r, :c, 'running', :t, "
                "CAST(:counts AS jsonb), now(), :by) ON CONFLICT (campaign_id, tick) "
                "DO NOTHING"
            ),
            {"r": run_id, "c": campaign_id, "t": tick, "counts": _json(counts), "by": principal},
        )
        return bool(res.rowcount)  # type: ignore[attr-defined]

    async def get(self, campaign_id: str, run_id: str) -> RowMapping | None:
        return (
            (
                await self.session.execute(
                    sa.text("SELECT * FROM decision.run WHERE run_id = :r AND campaign_id = :c"),
                    {"r": run_id, "c": campaign_id},
                )
            )
            .mappings()
            .first()
        )

    async def latest(self, campaign_id: str, limit: int) -> Sequence[RowMapping]:
        return (
            (
                await self.session.execute(
                    sa.text(
                        "SELECT * FROM decision.run WHERE campaign_id = :c "
                        "ORDER BY started_at DESC LIMIT :n"
                    ),
                    {"c": campaign_id, "n": limit},
                )
            )
            .mappings()
            .all()
        )

    async def cancel(self, campaign_id: str, run_id: str) -> bool:
        res = await self.session.execute(
            sa.text(
                "UPDATE decision.run SET status = 'cancelled', finished_at = now() "
                "WHERE run_id = :r AND campaign_id = :c AND status = 'running'"
            ),
            {"r": run_id, "c": campaign_id},
        )
        return bool(res.rowcount)  # type: ignore[attr-defined]

    async def claim(self, owner: str, lease_s: int) -> RowMapping | None:
        """Take the oldest running run whose lease has lapsed (another walker died)."""
        return (
            (
                await self.session.execute(
                    sa.text(
                        "UPDATE decision.run SET owner = :me, lease_until = now() + "
                        "make_interval(secs => :lease) WHERE run_id = (SELECT run_id FROM "
                        "decision.run WHERE status = 'running' AND (lease_until IS NULL OR "
                        "lease_until < now()) ORDER BY started_at LIMIT 1 FOR UPDATE SKIP "
                        "LOCKED) RETURNING *"
                    ),
                    {"me": owner, "lease": lease_s},
                )
            )
            .mappings()
            .first()
        )

    async def failed(self, run_id: str, error: str, failures: int, *, final: bool) -> None:
        await self.session.execute(
            sa.text(
                "UPDATE decision.run SET error = :e, counts = jsonb_set(counts, '{failures}', "
                "to_jsonb(CAST(:f AS int))), status = CASE WHEN :final THEN 'failed' "
                "ELSE status END, finished_at = CASE WHEN :final THEN now() END, "
                "lease_until = now() + interval '5 seconds' "
                "WHERE run_id = :r AND status = 'running'"
            ),
            {"e": error[:1000], "f": failures, "final": final, "r": run_id},
        )

    async def set_snapshot(self, run_id: str, owner: str, snapshot_id: str, selected: int) -> None:
        await self.session.execute(
            sa.text(
                "UPDATE decision.run SET snapshot_id = :s, selected = :n "
                "WHERE run_id = :r AND owner = :me"
            ),
            {"s": snapshot_id, "n": selected, "r": run_id, "me": owner},
        )

    async def checkpoint(
        self, run_id: str, owner: str, position: int, counts: dict[str, Any], lease_s: int
    ) -> str | None:
        """Save how far the run got and renew the lease; returns the run's status (None: it
        is no longer this owner's)."""
        status: str | None = (
            await self.session.execute(
                sa.text(
                    "UPDATE decision.run SET position = :p, counts = CAST(:counts AS jsonb), "
                    "lease_until = now() + make_interval(secs => :lease) "
                    "WHERE run_id = :r AND owner = :me AND status IN ('running', 'cancelled') "
                    "RETURNING status"
                ),
                {
                    "p": position,
                    "counts": _json(counts),
                    "lease": lease_s,
                    "r": run_id,
                    "me": owner,
                },
            )
        ).scalar()
        return status

    async def finish(self, run_id: str, status: str, error: str | None) -> None:
        await self.session.execute(
            sa.text(
                "UPDATE decision.run SET status = :s, error = :e, finished_at = now() "
                "WHERE run_id = :r AND status = 'running'"
            ),
            {"s": status, "e": error, "r": run_id},
        )
