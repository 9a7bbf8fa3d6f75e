"""Profile HTTP endpoints (internal; the gateway forwards the public API here)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from starlette.responses import Response

from services.profile.customers import service
from services.profile.customers.repository import CustomerRepository
from services.profile.imports.pipeline import run_import
from services.profile.imports.reader import decoder_for
from services.profile.projection import Projection
from shared.contracts.customers import (
    CUSTOMER_ID_PATTERN,
    CustomerPatch,
    CustomerPut,
    Device,
    ImportResult,
    MergeList,
    MergeRecord,
    MergeRequest,
    Profile,
    WriteAccepted,
)
from shared.errors import JSONResponse
from shared.events import iso, utcnow
from shared.service import Runtime, runtime

router = APIRouter(prefix="/v1/customers", tags=["customers"])

CustomerIdPath = Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN)]
RuntimeDep = Annotated[Runtime, Depends(runtime)]
PrincipalHeader = Annotated[str | None, Header(alias="x-kairos-principal")]


def projection(rt: Runtime) -> Projection:
    proj: Projection = rt.extras["projection"]
    return proj


async def reproject(rt: Runtime, ids: list[str]) -> None:
    """Rewrite the Redis projection of profiles from what is committed."""
    assert rt.db is not None
    if not ids:
        return
    async with rt.db.sessions() as session:
        docs = await CustomerRepository(session).projection_docs(ids)
    await projection(rt).write_many(docs)


@router.put("/{customer_id}", response_model=WriteAccepted)
async def put_customer(
    customer_id: CustomerIdPath, body: CustomerPut, rt: RuntimeDep
) -> WriteAccepted:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        version = await service.put_customer(uow, customer_id=customer_id, body=body, now=utcnow())
    await reproject(rt, [customer_id])
    return WriteAccepted(customer_id=customer_id, version=version)


@router.patch("/{customer_id}", response_model=WriteAccepted)
async def patch_customer(
    customer_id: CustomerIdPath, body: CustomerPatch, rt: RuntimeDep
) -> WriteAccepted:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        version = await service.patch_customer(
            uow, customer_id=customer_id, body=body, now=utcnow()
        )
    await reproject(rt, [customer_id])
    return WriteAccepted(customer_id=customer_id, version=version)


@router.get("/{customer_id}", response_model=Profile)
async def get_customer(customer_id: CustomerIdPath, rt: RuntimeDep) -> Response:
    """The profile: from the Redis projection (one round trip), else from Postgres."""
    doc = await projection(rt).read(customer_id)
    if doc is not None:
        return JSONResponse(service.view_from_projection(doc, utcnow()))
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        prof = await service.get_profile(uow, customer_id=customer_id, now=utcnow())
    return JSONResponse(prof.model_dump(mode="json"))


@router.delete("/{customer_id}", status_code=202)
async def erase_customer(customer_id: CustomerIdPath, rt: RuntimeDep) -> dict[str, object]:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        ids = await service.erase(uow, customer_id=customer_id)
    for cid in ids:
        await projection(rt).erase(cid)
    return {"customer_id": customer_id, "erased": ids}


@router.post("/{customer_id}/devices", response_model=WriteAccepted, status_code=201)
async def add_device(customer_id: CustomerIdPath, body: Device, rt: RuntimeDep) -> WriteAccepted:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        owner, version, touched = await service.add_device(
            uow, customer_id=customer_id, device=body, now=utcnow()
        )
    await reproject(rt, touched)
    return WriteAccepted(customer_id=owner, version=version)


@router.post("/{customer_id}/merge", response_model=MergeRecord)
async def merge_customer(
    customer_id: CustomerIdPath,
    body: MergeRequest,
    rt: RuntimeDep,
    principal: PrincipalHeader = None,
) -> MergeRecord:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        m = await service.merge(
            uow, target=customer_id, source=body.from_, principal=principal, now=utcnow()
        )
    await reproject(rt, [customer_id])
    await projection(rt).erase(body.from_)
    assert m.merge_id is not None
    return MergeRecord(
        merge_id=m.merge_id,
        target=m.target,
        source=m.source,
        principal=m.principal,
        at=iso(m.at),
        moved=m.moved,
    )


@router.get("/{customer_id}/merges", response_model=MergeList)
async def list_merges(customer_id: CustomerIdPath, rt: RuntimeDep) -> MergeList:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        await service.lookup(uow, kind="customer_id", value=customer_id)
        rows = await CustomerRepository(uow.session).merges_of(customer_id)
    return MergeList(
        merges=[
            MergeRecord(
                merge_id=m.merge_id or 0,
                target=m.target,
                source=m.source,
                principal=m.principal,
                at=iso(m.at),
                moved=m.moved,
            )
            for m in rows
        ]
    )


lookup_router = APIRouter(tags=["customers"])


@lookup_router.get("/v1/customers:lookup")
async def lookup_customer(
    rt: RuntimeDep,
    kind: Annotated[str, Query(pattern=r"^[a-z_]{1,40}$")],
    value: Annotated[str, Query(min_length=1, max_length=320)],
) -> dict[str, str]:
    assert rt.db is not None
    async with rt.db.transaction() as uow:
        return {"customer_id": await service.lookup(uow, kind=kind, value=value)}


@lookup_router.get(
    "/v1/customers:export",
    response_class=Response,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
async def export_customers(
    rt: RuntimeDep,
    after: Annotated[str, Query(max_length=128)] = "",
    limit: Annotated[int, Query(ge=1, le=20_000)] = 5000,
) -> Response:
    """One page of projection documents in id order (NDJSON); a page shorter than ``limit``
    is the last. Read models elsewhere (selection's audience index) rebuild from it."""
    assert rt.db is not None
    async with rt.db.sessions() as session:
        lines = await CustomerRepository(session).export_page(after, limit)
    body = b"\n".join(lines) + (b"\n" if lines else b"")
    return Response(body, media_type="application/x-ndjson")


NDJSON_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/x-ndjson": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@lookup_router.post("/v1/customers:import", response_model=ImportResult, openapi_extra=NDJSON_BODY)
async def import_customers(
    request: Request,
    rt: RuntimeDep,
    content_encoding: Annotated[str | None, Header()] = None,
) -> ImportResult:
    """Stream NDJSON (gzip-compressed with ``Content-Encoding: gzip``); each good line is
    kept, each bad line reported with its number (and the field, where one is at fault)."""
    assert rt.db is not None
    decoder_for(content_encoding)  # 415 before reading anything
    out = await run_import(rt.db, projection(rt), request.stream(), content_encoding)
    return ImportResult(imported=out.imported, failed=out.failed, errors=out.errors)
