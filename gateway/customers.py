"""Customer routes of the public API: forwarded to profile; the 360° view fans out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.responses import Response

from gateway.idempotency import idempotent
from gateway.upstream import Upstreams, relay
from shared.auth import Principal, require
from shared.contracts.customers import (
    CUSTOMER_ID_PATTERN,
    CustomerPatch,
    CustomerPut,
    CustomerView,
    Device,
    ErasureAccepted,
    ImportResult,
    LookupResult,
    MergeList,
    MergeRecord,
    MergeRequest,
    WriteAccepted,
)
from shared.errors import JSONResponse, NotFound, Unprocessable
from shared.service import Runtime, runtime

router = APIRouter(tags=["customers"])

CustomerId = Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN, description="The caller's own id")]
RuntimeDep = Annotated[Runtime, Depends(runtime)]
Reader = Annotated[Principal, Depends(require("customers:read"))]
Writer = Annotated[Principal, Depends(require("customers:write"))]
DeviceWriter = Annotated[Principal, Depends(require("customers:write", "events:write"))]
JSON = {"content-type": "application/json"}


def upstreams(rt: Runtime) -> Upstreams:
    up: Upstreams = rt.extras["upstreams"]
    return up


async def _forward(
    request: Request,
    rt: Runtime,
    principal: Principal,
    method: str,
    path: str,
    body: Any = None,
    *,
    remember: bool = True,
) -> Response:
    async def call() -> Response:
        # The body was validated into ``body`` already; forward the bytes as received rather
        # than serialising the model again (the owning service validates them itself).
        content = await request.body() if body is not None else None
        resp = await upstreams(rt).request(
            "profile", method, path, principal=principal.name, content=content, headers=JSON
        )
        return relay(resp)

    if method == "GET":
        return await call()
    return await idempotent(request, rt.redis, rt.keys, principal.name, call, remember=remember)


@router.put("/v1/customers/{customer_id}", response_model=WriteAccepted)
async def put_customer(
    request: Request, customer_id: CustomerId, body: CustomerPut, principal: Writer, rt: RuntimeDep
) -> Response:
    """Create or replace a profile."""
    return await _forward(request, rt, principal, "PUT", f"/v1/customers/{customer_id}", body)


@router.patch("/v1/customers/{customer_id}", response_model=WriteAccepted)
async def patch_customer(
    request: Request,
    customer_id: CustomerId,
    body: CustomerPatch,
    principal: Writer,
    rt: RuntimeDep,
) -> Response:
    """Merge changes into a profile (a null attribute removes it)."""
    return await _forward(request, rt, principal, "PATCH", f"/v1/customers/{customer_id}", body)


@router.delete("/v1/customers/{customer_id}", status_code=202, response_model=ErasureAccepted)
async def erase_customer(
    request: Request, customer_id: CustomerId, principal: Writer, rt: RuntimeDep
) -> Response:
    """Right to erasure: the profile now, every other store within seconds (``profile.erased``)."""
    return await _forward(
        request, rt, principal, "DELETE", f"/v1/customers/{customer_id}", remember=False
    )


@router.post("/v1/customers/{customer_id}/devices", response_model=WriteAccepted, status_code=201)
async def add_device(
    request: Request, customer_id: CustomerId, body: Device, principal: DeviceWriter, rt: RuntimeDep
) -> Response:
    """Register a push token."""
    return await _forward(
        request, rt, principal, "POST", f"/v1/customers/{customer_id}/devices", body
    )


@router.post("/v1/customers/{customer_id}/merge", response_model=MergeRecord)
async def merge_customer(
    request: Request, customer_id: CustomerId, body: MergeRequest, principal: Writer, rt: RuntimeDep
) -> Response:
    """Fold another profile into this one."""
    return await _forward(
        request, rt, principal, "POST", f"/v1/customers/{customer_id}/merge", body
    )


@router.get("/v1/customers/{customer_id}/merges", response_model=MergeList)
async def list_merges(
    request: Request, customer_id: CustomerId, principal: Reader, rt: RuntimeDep
) -> Response:
    """The merges recorded into this profile, newest first."""
    return await _forward(request, rt, principal, "GET", f"/v1/customers/{customer_id}/merges")


@router.get(
    "/v1/customers:lookup",
    response_model=LookupResult,
    responses={404: {"description": "No customer has this identity"}},
)
async def lookup_customer(
    principal: Reader,
    rt: RuntimeDep,
    kind: Annotated[
        str,
        Query(
            pattern=r"^[a-z_]{1,40}$",
            description="email, msisdn, device_id, anonymous_id, customer_id or an external id name",
        ),
    ],
    value: Annotated[str, Query(min_length=1, max_length=320)],
) -> Response:
    """Find the surviving profile that owns an identity."""
    resp = await upstreams(rt).request(
        "profile",
        "GET",
        "/v1/customers:lookup",
        params={"kind": kind, "value": value},
        principal=principal.name,
    )
    return relay(resp)


NDJSON_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-ndjson": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "One PUT body plus customer_id per line",
                }
            }
        },
    }
}


async def _not_empty(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The body as it streams, once a first line has arrived: an empty (or blank) body is a
    422 before anything is sent on, not an import of nothing."""
    head = b""
    async for chunk in chunks:
        head += chunk
        if head.strip():
            break
        if len(head) > 65_536:  # only blank space so far: keep no more of it
            head = b""
    if not head.strip():
        raise Unprocessable(
            "The body is empty: send one customer per line (NDJSON: a PUT body plus customer_id).",
            errors=[{"loc": ["body"], "msg": "no lines"}],
        )

    async def rest() -> AsyncIterator[bytes]:
        yield head
        async for chunk in chunks:
            yield chunk

    return rest()


@router.post("/v1/customers:import", response_model=ImportResult, openapi_extra=NDJSON_BODY)
async def import_customers(request: Request, principal: Writer, rt: RuntimeDep) -> Response:
    """Stream NDJSON (or gzip-compressed NDJSON) through to the profile service (no buffering
    at the gateway)."""
    headers = {"content-type": "application/x-ndjson", "x-kairos-principal": principal.name}
    encoding = request.headers.get("content-encoding")
    if encoding:  # gzip bodies go through compressed; the profile service inflates them
        headers["content-encoding"] = encoding
    resp = await upstreams(rt).stream(
        "profile", "/v1/customers:import", await _not_empty(request.stream()), headers
    )
    return relay(resp)


async def _optional(rt: Runtime, service: str, path: str, budget: float) -> dict[str, Any] | None:
    try:
        resp = await upstreams(rt).request(service, "GET", path, timeout=budget)
    except Exception:
        return None
    if resp.status_code != 200:
        return None
    data: dict[str, Any] = orjson.loads(resp.content)
    return data


@router.get("/v1/customers/{customer_id}", response_model=CustomerView)
async def customer_view(customer_id: CustomerId, principal: Reader, rt: RuntimeDep) -> Response:
    """The 360° view: profile, segments and history gathered in parallel within the budget."""
    budget = rt.settings.view_budget_ms / 1000
    up = upstreams(rt)
    profile_task = asyncio.create_task(
        up.request("profile", "GET", f"/v1/customers/{customer_id}", principal=principal.name)
    )
    seg_task = asyncio.create_task(
        _optional(rt, "selection", f"/v1/customers/{customer_id}/segments", budget)
    )
    hist_task = asyncio.create_task(
        _optional(rt, "feedback", f"/v1/customers/{customer_id}/history", budget)
    )
    try:
        profile = await profile_task
    finally:
        if not profile_task.done() or profile_task.cancelled() or profile_task.exception():
            seg_task.cancel()
            hist_task.cancel()
    if profile.status_code == 404:
        raise NotFound(f"Customer '{customer_id}' is not known.")
    if profile.status_code != 200:
        seg_task.cancel()
        hist_task.cancel()
        return relay(profile)
    view: dict[str, Any] = orjson.loads(profile.content)
    segments, history = await asyncio.gather(seg_task, hist_task)
    missing = []
    if segments is None:
        missing.append("selection")
    if history is None:
        missing.append("feedback")
    view["segments"] = (segments or {}).get("segments", [])
    view["contacts"] = (history or {}).get("contacts", [])[:50]
    view["responses"] = (history or {}).get("responses", [])[:50]
    view["partial"] = bool(missing)
    view["missing"] = missing
    return JSONResponse(view)
