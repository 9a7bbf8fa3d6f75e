"""Decision service: the catalog (offers, campaigns, lifecycle); decisions come next."""

from __future__ import annotations

from fastapi import FastAPI

from services.decision.catalog.endpoints import router as catalog_router
from services.decision.models import SCHEMA
from shared.service import create_service_app
from shared.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """The decision process."""
    return create_service_app(
        "decision", schema=SCHEMA, routers=[catalog_router], settings=settings
    )
