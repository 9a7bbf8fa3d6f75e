"""Selection service: segments, previews, snapshots (audience indexes arrive with their issue)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, FastAPI, Path

from shared.contracts.customers import CUSTOMER_ID_PATTERN
from shared.service import create_service_app
from shared.settings import Settings

router = APIRouter(tags=["segments"])


@router.get("/v1/customers/{customer_id}/segments")
async def customer_segments(
    customer_id: Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN)],
) -> dict[str, list[str]]:
    """Segments the customer belongs to. No segment store exists yet, so none can match."""
    return {"segments": []}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The selection process."""
    return create_service_app("selection", schema="selection", routers=[router], settings=settings)
