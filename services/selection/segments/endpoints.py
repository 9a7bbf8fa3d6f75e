"""Selection HTTP endpoints (internal; the gateway forwards the public API here)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query
from starlette.responses import Response

from services.selection.audience import Audience
from services.selection.segments import service
from shared.contracts.customers import CUSTOMER_ID_PATTERN
from shared.contracts.params import SNAPSHOT_ID_PATTERN
from shared.contracts.segments import (
    SEGMENT_ID_PATTERN,
    IndexStatus,
    PreviewRequest,
    PreviewResult,
    RuleSnapshotRequest,
    Segment,
    SegmentList,
    SegmentPut,
    SnapshotCreated,
    SnapshotPage,
)
from shared.events import utcnow
from shared.redis import read_projections
from shared.service import Runtime, runtime

router = APIRouter(tags=["segments"])

SegmentIdPath = Annotated[str, Path(pattern=SEGMENT_ID_PATTERN)]
RuntimeDep = Annotated[Runtime, Depends(runtime)]
PrincipalHeader = Annotated[str | None, Header(alias="x-kairos-principal")]


def audience(rt: Runtime) -> Audience:
    a: Audience = rt.extras["audience"]
    return a


@router.put("/v1/segments/{segment_id}", response_model=Segment)
async def put_segment(
    segment_id: SegmentIdPath, body: SegmentPut, rt: RuntimeDep, principal: PrincipalHeader = None
) -> Segment:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        seg = await service.put_segment(
            uow, segment_id=segment_id, body=body, principal=principal, now=utcnow()
        )
        count = await service.count_segment(uow, audience(rt), seg)
        return service.view(seg, count)


@router.get("/v1/segments/{segment_id}", response_model=Segment)
async def get_segment(segment_id: SegmentIdPath, rt: RuntimeDep) -> Segment:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        seg = await service.get_segment(uow, segment_id)
        return service.view(seg, await service.count_segment(uow, audience(rt), seg))


@router.delete("/v1/segments/{segment_id}", status_code=204)
async def delete_segment(segment_id: SegmentIdPath, rt: RuntimeDep) -> Response:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        await service.delete_segment(uow, segment_id)
    return Response(status_code=204)


@router.get("/v1/segments", response_model=SegmentList)
async def list_segments(
    rt: RuntimeDep,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> SegmentList:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        return await service.list_segments(uow, cursor=cursor, limit=limit)


@router.post("/v1/segments:preview", response_model=PreviewResult)
async def preview(body: PreviewRequest, rt: RuntimeDep) -> PreviewResult:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        return await service.preview(uow, audience(rt), body)


@router.get("/v1/segments:status", response_model=IndexStatus)
async def index_status(rt: RuntimeDep) -> IndexStatus:
    a = audience(rt)
    pop = a.pop
    return IndexStatus(
        state=a.state,
        customers=pop.total,
        tags=len(pop.tags),
        attributes=len(pop.attrs),
        event_types=len(pop.events),
        campaigns_contacted=len(pop.contacts),
        profile_seq=pop.seq,
        loaded_from=a.loaded_from,
        load_seconds=a.load_seconds,
        rss_bytes=_rss(),
        last_change_at=a.last_change_at,
    )


@router.post("/v1/segments/{segment_id}/snapshots", response_model=SnapshotCreated, status_code=201)
async def create_snapshot(
    segment_id: SegmentIdPath, rt: RuntimeDep, principal: PrincipalHeader = None
) -> SnapshotCreated:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        return await service.create_snapshot(
            uow, audience(rt), segment_id=segment_id, principal=principal, now=utcnow()
        )


@router.get("/v1/segments/{segment_id}/snapshots/{snapshot_id}", response_model=SnapshotPage)
async def snapshot_page(
    segment_id: SegmentIdPath,
    snapshot_id: Annotated[str, Path(pattern=SNAPSHOT_ID_PATTERN)],
    rt: RuntimeDep,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> SnapshotPage:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        return await service.snapshot_page(
            uow, segment_id=segment_id, snapshot_id=snapshot_id, cursor=cursor, limit=limit
        )


@router.post("/v1/snapshots", response_model=SnapshotCreated, status_code=201)
async def create_rule_snapshot(
    body: RuleSnapshotRequest, rt: RuntimeDep, principal: PrincipalHeader = None
) -> SnapshotCreated:
    """Freeze the members of an ad-hoc rule (a campaign audience); ``segment_id`` is empty."""
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        return await service.create_snapshot(
            uow, audience(rt), segment_id="", principal=principal, now=utcnow(), rule=body.rule
        )


@router.get("/v1/snapshots/{snapshot_id}", response_model=SnapshotPage)
async def rule_snapshot_page(
    snapshot_id: Annotated[str, Path(pattern=SNAPSHOT_ID_PATTERN)],
    rt: RuntimeDep,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> SnapshotPage:
    """A page of any snapshot by its id alone."""
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        return await service.snapshot_page(
            uow, segment_id=None, snapshot_id=snapshot_id, cursor=cursor, limit=limit
        )


@router.get("/v1/customers/{customer_id}/segments")
async def customer_segments(
    customer_id: Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN)], rt: RuntimeDep
) -> dict[str, list[str]]:
    """Segments the customer belongs to now (the 360° view shows them)."""
    assert rt.db is not None
    (doc,) = await read_projections(rt.redis, rt.keys, [customer_id])
    async with rt.db.transaction() as uow:
        return {"segments": await service.segments_of_customer(uow, audience(rt), doc)}


def _rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            import os

            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
