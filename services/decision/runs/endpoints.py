"""Batch runs and simulation HTTP endpoints (internal; the gateway forwards here)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query

from services.decision.runs.service import Runs
from shared.contracts import catalog as api
from shared.contracts.params import RUN_ID_PATTERN
from shared.service import Runtime, runtime

router = APIRouter(tags=["runs"])
IdPath = Annotated[str, Path(pattern=api.ID_PATTERN)]
RunPath = Annotated[str, Path(pattern=RUN_ID_PATTERN)]
RuntimeDep = Annotated[Runtime, Depends(runtime)]
PrincipalHeader = Annotated[str | None, Header(alias="x-kairos-principal")]


def runs(rt: Runtime) -> Runs:
    r: Runs = rt.extras["runs"]
    return r


@router.post("/v1/campaigns/{campaign_id}/runs", response_model=api.RunStarted, status_code=202)
async def start_run(
    campaign_id: IdPath, rt: RuntimeDep, principal: PrincipalHeader = None
) -> api.RunStarted:
    """Start a batch run over the campaign's audience now; follow it by its run id."""
    run_id = await runs(rt).start(campaign_id, principal)
    assert run_id is not None  # only cron ticks can lose the race
    return api.RunStarted(run_id=run_id)


@router.get("/v1/campaigns/{campaign_id}/runs", response_model=api.RunList)
async def list_runs(
    campaign_id: IdPath, rt: RuntimeDep, limit: Annotated[int, Query(ge=1, le=500)] = 50
) -> api.RunList:
    return await runs(rt).runs(campaign_id, limit)


@router.get("/v1/campaigns/{campaign_id}/runs/{run_id}", response_model=api.RunInfo)
async def get_run(campaign_id: IdPath, run_id: RunPath, rt: RuntimeDep) -> api.RunInfo:
    return await runs(rt).get(campaign_id, run_id)


@router.post("/v1/campaigns/{campaign_id}/runs/{run_id}/cancel", response_model=api.RunInfo)
async def cancel_run(campaign_id: IdPath, run_id: RunPath, rt: RuntimeDep) -> api.RunInfo:
    """Stop a running run at its next page; what was already requested stays requested."""
    return await runs(rt).cancel(campaign_id, run_id)


@router.post("/v1/campaigns/{campaign_id}/simulate", response_model=api.Simulation)
async def simulate(campaign_id: IdPath, rt: RuntimeDep) -> api.Simulation:
    """What a run (batch) or the last day of trigger events (triggered) would do, without
    reserving, recording or sending anything. Works in every state, drafts included."""
    return await runs(rt).simulate(campaign_id)
