"""Dispatch service process (its endpoints and consumers arrive with their issues)."""

from __future__ import annotations

from fastapi import FastAPI

from services.dispatch import rewards
from shared.service import Runtime, create_service_app
from shared.settings import Settings


async def _setup(rt: Runtime) -> None:
    await rewards.setup(rt)
    for c in rt.consumers:
        await c.start()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The dispatch process: health, readiness, metrics, its schema and the outbox relay."""
    return create_service_app(
        "dispatch", schema="dispatch", settings=settings, routers=[rewards.router], setup=_setup
    )
