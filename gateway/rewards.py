"""Reward routes of the public API: read and revoke, forwarded to dispatch (which owns them)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from starlette.responses import Response

from gateway.upstream import forward
from shared.auth import Principal, require
from shared.contracts import rewards as api
from shared.service import Runtime, runtime

router = APIRouter(tags=["rewards"])

TrackingId = Annotated[str, Path(pattern=api.TRACKING_ID_PATTERN)]
RuntimeDep = Annotated[Runtime, Depends(runtime)]
Reader = Annotated[Principal, Depends(require("reports:read"))]
Writer = Annotated[Principal, Depends(require("catalog:write"))]
PROBLEMS: dict[int | str, dict[str, Any]] = {
    404: {"description": "No reward for this tracking id"},
    409: {"description": "The reward is not granted (pending or failed)"},
    502: {"description": "The bonus system refused the revoke"},
    503: {"description": "The bonus system did not answer; retry"},
}


@router.get(
    "/v1/rewards/{tracking_id}",
    response_model=api.Reward,
    responses={404: PROBLEMS[404]},
)
async def get_reward(
    request: Request, tracking_id: TrackingId, principal: Reader, rt: RuntimeDep
) -> Response:
    """The reward granted for a contact, if any, and its state."""
    return await forward(request, rt, principal, "dispatch", "GET", f"/v1/rewards/{tracking_id}")


@router.post("/v1/rewards/{tracking_id}/revoke", response_model=api.Reward, responses=PROBLEMS)
async def revoke_reward(
    request: Request, tracking_id: TrackingId, principal: Writer, rt: RuntimeDep
) -> Response:
    """Revoke a granted reward at the bonus system, once (again: the same answer)."""
    return await forward(
        request, rt, principal, "dispatch", "POST", f"/v1/rewards/{tracking_id}/revoke"
    )
