"""Selection service: segments, previews, snapshots, and the audience index behind them."""

from __future__ import annotations

from fastapi import FastAPI

from services.selection.audience import Audience
from services.selection.models import SCHEMA
from services.selection.segments.endpoints import router
from shared.service import Runtime, create_service_app
from shared.settings import Settings


async def _setup(rt: Runtime) -> None:
    aud = Audience(rt)
    rt.extras["audience"] = aud
    await aud.start()
    rt.closers.append(aud.stop)
    rt.readiness["audience_index"] = lambda: (
        "ok" if aud.ready else f"loading ({aud.pop.total} customers so far)"
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """The selection process."""
    return create_service_app(
        "selection", schema=SCHEMA, routers=[router], setup=_setup, settings=settings
    )
