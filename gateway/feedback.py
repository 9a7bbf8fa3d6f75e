"""Feedback routes of the public API: responses, reports and exports, forwarded to feedback.

Exports are streamed through: a dedicated GET that passes the service's chunks on as they
come (``Upstreams.request`` reads a whole answer, which an export of millions of rows must
not be).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Literal

import aiohttp
from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.responses import Response, StreamingResponse

from gateway.upstream import Upstreams, forward
from shared.auth import Principal, require
from shared.contracts.catalog import ID_PATTERN
from shared.contracts.params import MONTH_PATTERN, Rfc3339
from shared.contracts.reports import CampaignReport, ProgrammeReport, ResponseAccepted, ResponseIn
from shared.errors import Unavailable
from shared.service import Runtime, runtime

log = logging.getLogger("kairos.gateway.feedback")
router = APIRouter(tags=["feedback"])
RuntimeDep = Annotated[Runtime, Depends(runtime)]
Responder = Annotated[Principal, Depends(require("responses:write"))]
Reporter = Annotated[Principal, Depends(require("reports:read"))]
CampaignId = Annotated[str, Path(pattern=ID_PATTERN)]


@router.post(
    "/v1/responses",
    response_model=ResponseAccepted,
    status_code=202,
    responses={404: {"description": "No contact has this tracking id"}},
)
async def post_response(
    request: Request, body: ResponseIn, principal: Responder, rt: RuntimeDep
) -> Response:
    """Record a response to a contact; the same (tracking_id, outcome) counts once."""
    return await forward(request, rt, principal, "feedback", "POST", "/v1/responses")


@router.get("/v1/campaigns/{campaign_id}/report", response_model=CampaignReport)
async def campaign_report(
    request: Request, campaign_id: CampaignId, principal: Reporter, rt: RuntimeDep
) -> Response:
    """Totals, by treatment, channel and day, clicks per link, and uplift against control."""
    return await forward(
        request, rt, principal, "feedback", "GET", f"/v1/campaigns/{campaign_id}/report"
    )


@router.get(
    "/v1/campaigns/{campaign_id}/report.csv",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}},
)
async def campaign_report_csv(
    request: Request, campaign_id: CampaignId, principal: Reporter, rt: RuntimeDep
) -> Response:
    """The campaign report as CSV rows (total, each treatment, channel and day)."""
    return await forward(
        request, rt, principal, "feedback", "GET", f"/v1/campaigns/{campaign_id}/report.csv"
    )


@router.get("/v1/reports/programme", response_model=ProgrammeReport)
async def programme_report(
    request: Request,
    principal: Reporter,
    rt: RuntimeDep,
    month: Annotated[
        str | None, Query(pattern=MONTH_PATTERN, description="YYYY-MM, default now")
    ] = None,
) -> Response:
    """The global control group against everyone treated, and contacts per customer."""
    params = {"month": month} if month else None
    return await forward(
        request, rt, principal, "feedback", "GET", "/v1/reports/programme", params=params
    )


async def _stream_get(
    rt: Runtime, principal: Principal, path: str, params: dict[str, str]
) -> Response:
    """GET from feedback and pass the body on chunk by chunk, with no overall time limit."""
    up: Upstreams = rt.extras["upstreams"]
    try:
        resp = await up.session.get(
            up.base["feedback"] + path,
            params=params,
            headers={"x-kairos-principal": principal.name},
            timeout=aiohttp.ClientTimeout(total=None, connect=1.0, sock_read=60.0),
        )
    except aiohttp.ClientError as exc:
        raise Unavailable("The feedback service is not reachable; try again shortly.") from exc
    content_type = resp.headers.get("content-type", "application/octet-stream")
    if resp.status != 200:
        body = await resp.read()
        resp.release()
        return Response(body, status_code=resp.status, media_type=content_type)

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in resp.content.iter_chunked(1 << 16):
                yield chunk
        finally:
            resp.release()

    headers = {
        k: v
        for k, v in resp.headers.items()
        if k.lower() in ("content-disposition", "cache-control")
    }
    return StreamingResponse(chunks(), media_type=content_type, headers=headers)


def _export(table: str) -> None:
    async def export(
        principal: Reporter,
        rt: RuntimeDep,
        since: Rfc3339 | None = None,
        until: Rfc3339 | None = None,
        format: Literal["ndjson", "csv", "parquet"] = "ndjson",  # noqa: A002 (the API's name)
    ) -> Response:
        params: dict[str, str] = {"format": format}
        if since is not None:
            params["since"] = since.isoformat()
        if until is not None:
            params["until"] = until.isoformat()
        return await _stream_get(rt, principal, f"/v1/exports/{table}", params)

    export.__doc__ = f"Stream every {table[:-1]} with since <= at < until (ndjson, csv, parquet)."
    router.get(
        f"/v1/exports/{table}",
        response_class=StreamingResponse,
        name=f"export_{table}",
        responses={
            200: {
                "content": {
                    "application/x-ndjson": {},
                    "text/csv": {},
                    "application/vnd.apache.parquet": {},
                }
            }
        },
    )(export)


_export("contacts")
_export("responses")
