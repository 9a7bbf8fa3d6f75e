"""Report endpoints: a campaign's report (JSON and CSV) and the programme report."""

from __future__ import annotations

import csv
import io
import math
from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from starlette.responses import Response

from services.feedback import stats
from services.feedback.reports.repository import FIELDS, ReportRepository
from shared.contracts.catalog import ID_PATTERN
from shared.contracts.params import MONTH_PATTERN
from shared.contracts.reports import (
    CampaignReport,
    Counts,
    Pressure,
    ProgrammeReport,
    Side,
    Uplift,
)
from shared.events import utcnow
from shared.service import Runtime, runtime

router = APIRouter(tags=["reports"])
RuntimeDep = Annotated[Runtime, Depends(runtime)]
CampaignId = Annotated[str, Path(pattern=ID_PATTERN)]
COLUMNS = list(FIELDS.values())


def _uplift(target: dict[str, Any], control: dict[str, Any]) -> Uplift:
    """``stats.uplift`` over target contacts (not control) against control contacts."""
    n_t, n_c = int(target["n"]), int(control["n"])
    x_t, x_c = min(int(target["converted"]), n_t), min(int(control["converted"]), n_c)
    doc = stats.uplift(x_t, n_t, x_c, n_c, float(target["revenue"]), float(control["revenue"]))
    return Uplift(
        **doc,
        target=Side(contacts=n_t, converted=x_t, revenue=float(target["revenue"])),
        control=Side(contacts=n_c, converted=x_c, revenue=float(control["revenue"])),
    )


def _side(counts: dict[str, Any] | None, n_field: str) -> dict[str, Any]:
    c = counts or {}
    return {
        "n": c.get(n_field, 0),
        "converted": c.get("converted", 0),
        "revenue": c.get("revenue", 0.0),
    }


async def campaign_report(rt: Runtime, campaign_id: str) -> CampaignReport:
    """A campaign's report from the aggregates; all zero for a campaign without contacts."""
    assert rt.db is not None
    async with rt.db.sessions() as session:
        doc = await ReportRepository(session).campaign(campaign_id)
    sides = doc["sides"]
    return CampaignReport(
        campaign_id=campaign_id,
        totals=Counts(**(doc["totals"] or {})),
        by_treatment={k: Counts(**v) for k, v in doc["by_treatment"].items()},
        by_channel={k: Counts(**v) for k, v in doc["by_channel"].items()},
        by_day={k: Counts(**v) for k, v in doc["by_day"].items()},
        clicks_by_link=doc["clicks_by_link"],
        uplift=_uplift(_side(sides.get(False), "targeted"), _side(sides.get(True), "control")),
    )


@router.get("/v1/campaigns/{campaign_id}/report", response_model=CampaignReport)
async def report(campaign_id: CampaignId, rt: RuntimeDep) -> CampaignReport:
    """Totals, slices and uplift against the control group, from the aggregates."""
    return await campaign_report(rt, campaign_id)


@router.get(
    "/v1/campaigns/{campaign_id}/report.csv",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}},
)
async def report_csv(campaign_id: CampaignId, rt: RuntimeDep) -> Response:
    """The report as rows: one per slice (total, treatment, channel, day)."""
    rep = await campaign_report(rt, campaign_id)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["campaign_id", "slice", "key", *COLUMNS])
    slices: list[tuple[str, str, Counts]] = [("total", "", rep.totals)]
    slices += [("treatment", k, v) for k, v in rep.by_treatment.items()]
    slices += [("channel", k, v) for k, v in rep.by_channel.items()]
    slices += [("day", k, v) for k, v in rep.by_day.items()]
    for kind, key, counts in slices:
        d = counts.model_dump()
        w.writerow([campaign_id, kind, key, *(d[c] for c in COLUMNS)])
    return Response(
        buf.getvalue(),
        media_type="text/csv",
        headers={"content-disposition": f'attachment; filename="{campaign_id}-report.csv"'},
    )


def _quantile(hist: list[tuple[int, int]], q: float) -> float:
    """The q-quantile of a distribution given as (value, count), lower median convention."""
    total = sum(c for _, c in hist)
    rank = max(1, math.ceil(q * total))
    seen = 0
    for value, count in hist:
        seen += count
        if seen >= rank:
            return float(value)
    return 0.0


@router.get("/v1/reports/programme", response_model=ProgrammeReport)
async def programme(
    rt: RuntimeDep,
    month: Annotated[
        str | None, Query(pattern=MONTH_PATTERN, description="YYYY-MM, default now")
    ] = None,
) -> ProgrammeReport:
    """The global control group against every treated contact, and contacts per customer."""
    assert rt.db is not None
    first = date.fromisoformat(month + "-01") if month else utcnow().date().replace(day=1)
    async with rt.db.sessions() as session:
        repo = ReportRepository(session)
        sides = await repo.programme()
        hist = await repo.pressure(first)
    treated = sides.get("treated", {})
    glob = sides.get("global", {})
    return ProgrammeReport(
        treated=Counts(**treated),
        global_control=Counts(**glob),
        uplift=_uplift(_side(treated, "targeted"), _side(glob, "control")),
        contacts_per_customer=Pressure(
            month=first.isoformat()[:7],
            customers=sum(c for _, c in hist),
            median=_quantile(hist, 0.5),
            p90=_quantile(hist, 0.9),
            max=hist[-1][0] if hist else 0,
        ),
    )
