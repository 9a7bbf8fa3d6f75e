"""Segment routes of the public API: forwarded to the selection service."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.responses import Response

from gateway.upstream import forward
from shared.auth import Principal, require
from shared.contracts.params import SNAPSHOT_ID_PATTERN
from shared.contracts.segments import (
    SEGMENT_ID_PATTERN,
    IndexStatus,
    PreviewRequest,
    PreviewResult,
    Segment,
    SegmentList,
    SegmentPut,
    SnapshotCreated,
    SnapshotPage,
)
from shared.service import Runtime, runtime

router = APIRouter(tags=["segments"])

SegmentId = Annotated[str, Path(pattern=SEGMENT_ID_PATTERN)]
RuntimeDep = Annotated[Runtime, Depends(runtime)]
Writer = Annotated[Principal, Depends(require("catalog:write"))]
Reader = Annotated[Principal, Depends(require("catalog:write", "reports:read"))]


async def _forward(
    request: Request,
    rt: Runtime,
    principal: Principal,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
) -> Response:
    return await forward(request, rt, principal, "selection", method, path, params=params)


@router.put("/v1/segments/{segment_id}", response_model=Segment)
async def put_segment(
    request: Request, segment_id: SegmentId, body: SegmentPut, principal: Writer, rt: RuntimeDep
) -> Response:
    """Create or replace a segment (a named audience rule)."""
    return await _forward(request, rt, principal, "PUT", f"/v1/segments/{segment_id}")


@router.get("/v1/segments/{segment_id}", response_model=Segment)
async def get_segment(
    request: Request, segment_id: SegmentId, principal: Reader, rt: RuntimeDep
) -> Response:
    """A segment with its current member count."""
    return await _forward(request, rt, principal, "GET", f"/v1/segments/{segment_id}")


@router.delete("/v1/segments/{segment_id}", status_code=204)
async def delete_segment(
    request: Request, segment_id: SegmentId, principal: Writer, rt: RuntimeDep
) -> Response:
    """Delete a segment no other segment refers to."""
    return await _forward(request, rt, principal, "DELETE", f"/v1/segments/{segment_id}")


@router.get("/v1/segments", response_model=SegmentList)
async def list_segments(
    request: Request,
    principal: Reader,
    rt: RuntimeDep,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Response:
    """Segments in id order, a page at a time."""
    params = {"limit": str(limit), **({"cursor": cursor} if cursor else {})}
    return await _forward(request, rt, principal, "GET", "/v1/segments", params=params)


@router.post("/v1/segments:preview", response_model=PreviewResult)
async def preview(
    request: Request, body: PreviewRequest, principal: Reader, rt: RuntimeDep
) -> Response:
    """Count, breakdown and a sample of an audience rule, before saving it."""
    return await _forward(request, rt, principal, "POST", "/v1/segments:preview")


@router.get("/v1/segments:status", response_model=IndexStatus)
async def index_status(request: Request, principal: Reader, rt: RuntimeDep) -> Response:
    """The audience index: size, state, memory, freshness."""
    return await _forward(request, rt, principal, "GET", "/v1/segments:status")


@router.post("/v1/segments/{segment_id}/snapshots", response_model=SnapshotCreated, status_code=201)
async def create_snapshot(
    request: Request, segment_id: SegmentId, principal: Writer, rt: RuntimeDep
) -> Response:
    """Freeze the segment's membership now (announced as ``segment.snapshot.ready``)."""
    return await _forward(request, rt, principal, "POST", f"/v1/segments/{segment_id}/snapshots")


@router.get("/v1/segments/{segment_id}/snapshots/{snapshot_id}", response_model=SnapshotPage)
async def snapshot_page(
    request: Request,
    segment_id: SegmentId,
    snapshot_id: Annotated[str, Path(pattern=SNAPSHOT_ID_PATTERN)],
    principal: Reader,
    rt: RuntimeDep,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    """A page of a snapshot's members; follow ``next_cursor`` until it is null."""
    params = {"limit": str(limit), **({"cursor": cursor} if cursor else {})}
    path = f"/v1/segments/{segment_id}/snapshots/{snapshot_id}"
    return await _forward(request, rt, principal, "GET", path, params=params)
