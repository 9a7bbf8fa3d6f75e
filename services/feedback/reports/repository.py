"""Reads of the report aggregates (never of the history): a campaign's slices in one
GROUPING SETS query, the programme's two sides, the contact-pressure histogram."""

from __future__ import annotations

from datetime import date
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

S = "feedback"
# Aggregate column -> report field (``control_n`` is the ``control`` count).
FIELDS = {
    "targeted": "targeted",
    "control_n": "control",
    "offered": "offered",
    "sent": "sent",
    "delivered": "delivered",
    "failed": "failed",
    "bounced": "bounced",
    "opened": "opened",
    "clicked": "clicked",
    "accepted": "accepted",
    "declined": "declined",
    "converted": "converted",
    "unsubscribed": "unsubscribed",
    "revenue": "revenue",
}
SUMS = ", ".join(f"sum({c}) AS {c}" for c in FIELDS)


def _counts(row: Any) -> dict[str, Any]:
    m = row._mapping
    return {f: (float(m[c] or 0) if f == "revenue" else int(m[c] or 0)) for c, f in FIELDS.items()}


class ReportRepository:
    """Sums over ``report_daily``, ``link_clicks`` and ``pressure_hist``."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def campaign(self, campaign_id: str) -> dict[str, Any]:
        """Totals, by treatment, channel, day and control side, in one statement."""
        rows = await self.session.execute(
            sa.text(
                f"SELECT GROUPING(treatment) AS gt, GROUPING(channel) AS gc, GROUPING(day) AS gd,"
                f" GROUPING(control) AS gk, treatment, channel, day, control, {SUMS}"
                f" FROM {S}.report_daily WHERE campaign_id = :c"
                f" GROUP BY GROUPING SETS ((), (treatment), (channel), (day), (control))"
            ),
            {"c": campaign_id},
        )
        out: dict[str, Any] = {
            "totals": None,
            "by_treatment": {},
            "by_channel": {},
            "by_day": {},
            "sides": {},
        }
        for r in rows.all():
            counts = _counts(r)
            if r.gt and r.gc and r.gd and r.gk:
                out["totals"] = counts
            elif not r.gt:
                out["by_treatment"][r.treatment or "none"] = counts
            elif not r.gc:
                out["by_channel"][r.channel or "none"] = counts
            elif not r.gd:
                out["by_day"][r.day.isoformat()] = counts
            else:
                out["sides"][bool(r.control)] = counts
        out["by_day"] = dict(sorted(out["by_day"].items()))
        clicks = await self.session.execute(
            sa.text(
                f"SELECT link, clicks FROM {S}.link_clicks WHERE campaign_id = :c ORDER BY clicks DESC"
            ),
            {"c": campaign_id},
        )
        out["clicks_by_link"] = {r[0]: int(r[1]) for r in clicks.all()}
        return out

    async def programme(self) -> dict[str, dict[str, Any]]:
        """Treated contacts and the global control group's contacts, across every campaign."""
        rows = await self.session.execute(
            sa.text(
                f"SELECT CASE WHEN NOT control THEN 'treated' WHEN control_kind = 'global'"
                f" THEN 'global' ELSE 'campaign' END AS side, {SUMS}"
                f" FROM {S}.report_daily GROUP BY 1"
            )
        )
        return {r.side: _counts(r) for r in rows.all()}

    async def pressure(self, month: date) -> list[tuple[int, int]]:
        """(contacts, customers with that many contacts) of a month, by contacts."""
        rows = await self.session.execute(
            sa.text(
                f"SELECT n, customers FROM {S}.pressure_hist WHERE month = :m AND customers > 0"
                " ORDER BY n"
            ),
            {"m": month},
        )
        return [(int(r[0]), int(r[1])) for r in rows.all()]
