"""Profile service: customers, identities, consents, devices, behaviour counters."""

from __future__ import annotations

from fastapi import FastAPI

from services.profile.consumers import consumers
from services.profile.customers.endpoints import lookup_router, router
from services.profile.erasure import Erasure
from services.profile.imports.endpoints import router as imports_router
from services.profile.models import SCHEMA
from services.profile.projection import Projection
from shared.service import Runtime, create_service_app
from shared.settings import Settings


async def _setup(rt: Runtime) -> None:
    rt.extras["projection"] = Projection(rt.redis, rt.keys)
    if rt.settings.run_consumers:
        rt.consumers = [*consumers(rt), Erasure(rt).consumer()]
        for c in rt.consumers:
            await c.start()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The profile process."""
    from shared.settings import get_settings

    cfg = settings or get_settings()
    return create_service_app(
        "profile",
        schema=SCHEMA,
        routers=[lookup_router, router, imports_router],
        setup=_setup,
        settings=cfg,
        body_overrides={"/v1/customers:import": cfg.import_max_bytes},
    )
