"""Decision service process (its endpoints and consumers arrive with their issues)."""

from __future__ import annotations

from fastapi import FastAPI

from shared.service import create_service_app
from shared.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """The decision process: health, readiness, metrics, its schema and the outbox relay."""
    return create_service_app("decision", schema="decision", settings=settings)
