"""Feedback service: contact and response history, reports (history store arrives with its issue)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Path

from shared.contracts.customers import CUSTOMER_ID_PATTERN
from shared.service import create_service_app
from shared.settings import Settings

router = APIRouter(tags=["history"])


@router.get("/v1/customers/{customer_id}/history")
async def customer_history(
    customer_id: Annotated[str, Path(pattern=CUSTOMER_ID_PATTERN)],
) -> dict[str, list[Any]]:
    """Newest contacts and responses of a customer. Nothing records contacts yet: empty."""
    return {"contacts": [], "responses": []}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The feedback process."""
    return create_service_app("feedback", schema="feedback", routers=[router], settings=settings)
