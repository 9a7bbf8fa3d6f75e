"""Decision and contact-policy HTTP endpoints (internal; the gateway forwards here)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query
from starlette.responses import Response

from services.decision.catalog.service import changed
from services.decision.engine import Engine
from services.decision.models import ContactPolicyRow
from shared.contracts import catalog as api
from shared.events import utcnow
from shared.service import Runtime, runtime

router = APIRouter(tags=["decisions"])
RuntimeDep = Annotated[Runtime, Depends(runtime)]
PrincipalHeader = Annotated[str | None, Header(alias="x-kairos-principal")]


def engine(rt: Runtime) -> Engine:
    e: Engine = rt.extras["engine"]
    return e


@router.post("/v1/decisions", response_model=api.DecisionResponse, response_model_exclude_none=True)
async def decide(
    body: api.DecisionRequest,
    rt: RuntimeDep,
    explain: Annotated[bool, Query()] = False,
    dry_run: Annotated[bool, Query()] = False,
) -> Response:
    """The next best offers for a customer at a touchpoint (no database write here).

    The engine builds a typed ``DecisionResponse``; it is serialised by pydantic-core at
    once rather than validated again against ``response_model`` on the hot path."""
    resp = await engine(rt).decide(body, explain=explain, dry_run=dry_run)
    return Response(resp.model_dump_json(exclude_none=True), media_type="application/json")


@router.put("/v1/contact-policy", response_model=api.ContactPolicy)
async def put_policy(
    body: api.ContactPolicy, rt: RuntimeDep, principal: PrincipalHeader = None
) -> api.ContactPolicy:
    assert rt.db is not None
    now = utcnow()
    async with rt.db.transaction() as uow:
        row = await uow.session.get(ContactPolicyRow, 1, with_for_update=True)
        doc = body.model_dump(mode="json")
        if row is None:
            row = ContactPolicyRow(id=1, body=doc, updated_at=now, updated_by=principal)
            uow.session.add(row)
        else:
            row.body, row.version, row.updated_at, row.updated_by = (
                doc,
                row.version + 1,
                now,
                principal,
            )
        await uow.session.flush()
        changed(uow, "contact_policy", "contact-policy", row.version)
    return body


@router.get("/v1/contact-policy", response_model=api.ContactPolicy)
async def get_policy(rt: RuntimeDep) -> api.ContactPolicy:
    assert rt.db is not None
    async with rt.db.sessions() as s:
        row = await s.get(ContactPolicyRow, 1)
    return api.ContactPolicy.model_validate(row.body) if row else api.ContactPolicy()
