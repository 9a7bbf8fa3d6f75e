"""Catalog routes of the public API (offers, campaigns, lifecycle): forwarded to decision."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.responses import Response

from gateway.upstream import Upstreams, forward, relay
from shared.auth import Principal, require
from shared.contracts import catalog as api
from shared.contracts import params
from shared.service import Runtime, runtime

router = APIRouter(tags=["catalog"])
# The touchpoint decision alone, mounted before every other router: Starlette tries routes
# in order, and matching the ~100 routes ahead of it cost the gateway ~15% of its CPU per
# decision (py-spy, bench/results/pyspy-gateway-before-*). Its path is nobody else's.
decisions_router = APIRouter(tags=["catalog"])

Id = Annotated[str, Path(pattern=api.ID_PATTERN)]
RuntimeDep = Annotated[Runtime, Depends(runtime)]
Writer = Annotated[Principal, Depends(require("catalog:write"))]
Reader = Annotated[Principal, Depends(require("catalog:write", "reports:read"))]
Approver = Annotated[Principal, Depends(require("campaigns:approve"))]
Cursor = Annotated[str | None, Query(max_length=400)]
Limit = Annotated[int, Query(ge=1, le=500)]
JSON = {"content-type": "application/json"}


async def _forward(
    request: Request,
    rt: Runtime,
    principal: Principal,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    timeout: float | None = None,
) -> Response:
    return await forward(
        request, rt, principal, "decision", method, path, params=params, timeout=timeout
    )


def _page(cursor: str | None, limit: int) -> dict[str, str]:
    return {"limit": str(limit), **({"cursor": cursor} if cursor else {})}


@router.put("/v1/offers/{offer_id}", response_model=api.Offer)
async def put_offer(
    request: Request, offer_id: Id, body: api.OfferPut, principal: Writer, rt: RuntimeDep
) -> Response:
    """Create or replace an offer; its content templates are checked now."""
    return await _forward(request, rt, principal, "PUT", f"/v1/offers/{offer_id}")


@router.get("/v1/offers/{offer_id}", response_model=api.Offer)
async def get_offer(request: Request, offer_id: Id, principal: Reader, rt: RuntimeDep) -> Response:
    return await _forward(request, rt, principal, "GET", f"/v1/offers/{offer_id}")


@router.get("/v1/offers", response_model=api.OfferList)
async def list_offers(
    request: Request, principal: Reader, rt: RuntimeDep, cursor: Cursor = None, limit: Limit = 100
) -> Response:
    return await _forward(request, rt, principal, "GET", "/v1/offers", params=_page(cursor, limit))


@router.put("/v1/campaigns/{campaign_id}", response_model=api.Campaign)
async def put_campaign(
    request: Request, campaign_id: Id, body: api.CampaignPut, principal: Writer, rt: RuntimeDep
) -> Response:
    """Create a draft, or replace a draft or paused campaign."""
    return await _forward(request, rt, principal, "PUT", f"/v1/campaigns/{campaign_id}")


@router.get("/v1/campaigns/{campaign_id}", response_model=api.Campaign)
async def get_campaign(
    request: Request, campaign_id: Id, principal: Reader, rt: RuntimeDep
) -> Response:
    return await _forward(request, rt, principal, "GET", f"/v1/campaigns/{campaign_id}")


@router.get("/v1/campaigns", response_model=api.CampaignList)
async def list_campaigns(
    request: Request, principal: Reader, rt: RuntimeDep, cursor: Cursor = None, limit: Limit = 100
) -> Response:
    return await _forward(
        request, rt, principal, "GET", "/v1/campaigns", params=_page(cursor, limit)
    )


@router.get("/v1/campaigns/{campaign_id}/transitions", response_model=api.TransitionList)
async def transitions(
    request: Request, campaign_id: Id, principal: Reader, rt: RuntimeDep
) -> Response:
    """Every lifecycle step of the campaign: who, when, from and to."""
    return await _forward(request, rt, principal, "GET", f"/v1/campaigns/{campaign_id}/transitions")


def _lifecycle(action: str, doc: str) -> None:
    async def step(
        request: Request, campaign_id: Id, principal: Writer, rt: RuntimeDep
    ) -> Response:
        return await _forward(
            request, rt, principal, "POST", f"/v1/campaigns/{campaign_id}/{action}"
        )

    step.__doc__ = doc
    router.post(
        f"/v1/campaigns/{{campaign_id}}/{action}", response_model=api.Campaign, name=action
    )(step)


_lifecycle("submit", "draft → submitted: ask for approval.")
_lifecycle("activate", "approved or paused → active (draft → active when no approval is required).")
_lifecycle("pause", "active → paused: stops deciding and sending; it can be edited then.")
_lifecycle("complete", "active or paused → completed, for good.")


@router.post("/v1/campaigns/{campaign_id}/approve", response_model=api.Campaign)
async def approve(
    request: Request, campaign_id: Id, principal: Approver, rt: RuntimeDep
) -> Response:
    """submitted → approved; needs `campaigns:approve` and someone other than the submitter."""
    return await _forward(request, rt, principal, "POST", f"/v1/campaigns/{campaign_id}/approve")


Decider = Annotated[Principal, Depends(require("decisions:write"))]


@decisions_router.post(
    "/v1/decisions", response_model=api.DecisionResponse, response_model_exclude_none=True
)
async def decide(
    request: Request,
    body: api.DecisionRequest,
    principal: Decider,
    rt: RuntimeDep,
    explain: bool = False,
    dry_run: bool = False,
) -> Response:
    """The next best offers for a customer at a touchpoint (``explain``, ``dry_run``)."""
    up: Upstreams = rt.extras["upstreams"]
    params = {"explain": str(explain).lower(), "dry_run": str(dry_run).lower()}
    resp = await up.request(
        "decision",
        "POST",
        "/v1/decisions",
        principal=principal.name,
        content=await request.body(),
        headers=JSON,
        params=params,
    )
    return relay(resp)


@router.put("/v1/contact-policy", response_model=api.ContactPolicy)
async def put_policy(
    request: Request, body: api.ContactPolicy, principal: Writer, rt: RuntimeDep
) -> Response:
    """Contact pressure rules for every campaign and touchpoint."""
    return await _forward(request, rt, principal, "PUT", "/v1/contact-policy")


@router.get("/v1/contact-policy", response_model=api.ContactPolicy)
async def get_policy(request: Request, principal: Reader, rt: RuntimeDep) -> Response:
    return await _forward(request, rt, principal, "GET", "/v1/contact-policy")


RunId = Annotated[str, Path(pattern=params.RUN_ID_PATTERN)]


@router.post("/v1/campaigns/{campaign_id}/runs", response_model=api.RunStarted, status_code=202)
async def start_run(
    request: Request, campaign_id: Id, principal: Writer, rt: RuntimeDep
) -> Response:
    """Start a batch run over the campaign's audience now (active batch campaigns)."""
    return await _forward(request, rt, principal, "POST", f"/v1/campaigns/{campaign_id}/runs")


@router.get("/v1/campaigns/{campaign_id}/runs", response_model=api.RunList)
async def list_runs(
    request: Request,
    campaign_id: Id,
    principal: Reader,
    rt: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Response:
    """The campaign's runs, newest first."""
    return await _forward(
        request,
        rt,
        principal,
        "GET",
        f"/v1/campaigns/{campaign_id}/runs",
        params={"limit": str(limit)},
    )


@router.get("/v1/campaigns/{campaign_id}/runs/{run_id}", response_model=api.RunInfo)
async def get_run(
    request: Request, campaign_id: Id, run_id: RunId, principal: Reader, rt: RuntimeDep
) -> Response:
    """A run's status and counts (selected, control, suppressed by reason, dispatched)."""
    return await _forward(
        request, rt, principal, "GET", f"/v1/campaigns/{campaign_id}/runs/{run_id}"
    )


@router.post("/v1/campaigns/{campaign_id}/runs/{run_id}/cancel", response_model=api.RunInfo)
async def cancel_run(
    request: Request, campaign_id: Id, run_id: RunId, principal: Writer, rt: RuntimeDep
) -> Response:
    """Stop a running run; what it already requested stays requested."""
    return await _forward(
        request, rt, principal, "POST", f"/v1/campaigns/{campaign_id}/runs/{run_id}/cancel"
    )


@router.post("/v1/campaigns/{campaign_id}/simulate", response_model=api.Simulation)
async def simulate(
    request: Request, campaign_id: Id, principal: Writer, rt: RuntimeDep
) -> Response:
    """What a run or a day of triggers would do, without sending anything (it walks the
    whole audience: up to a few minutes for millions)."""
    return await _forward(
        request, rt, principal, "POST", f"/v1/campaigns/{campaign_id}/simulate", timeout=600
    )
