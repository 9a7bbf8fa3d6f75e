"""The public gateway: API keys, the /v1 contract, forwarding, the 360° view fan-out."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI

import gateway.openapi
from gateway import catalog, customers, dispatch, events, feedback, links, rewards, segments
from gateway.media import MediaTypes
from gateway.upstream import Upstreams
from shared.auth import dev_key_path, load_keyring
from shared.service import Runtime, create_service_app
from shared.settings import Settings, get_settings

log = logging.getLogger("kairos.gateway")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway process."""
    cfg = settings or get_settings()

    async def setup(rt: Runtime) -> None:
        app.state.keyring = load_keyring(cfg)
        if not cfg.api_keys:
            log.warning("no KAIROS_API_KEYS: development admin key in %s", dev_key_path(cfg))
        up = Upstreams(cfg)
        rt.extras["upstreams"] = up
        rt.closers.append(up.close)

    app = create_service_app(
        "gateway",
        schema=None,
        routers=[
            catalog.decisions_router,
            events.router,
            dispatch.router,
            rewards.router,
            customers.router,
            segments.router,
            catalog.router,
            feedback.router,
            links.router,
        ],
        setup=setup,
        settings=cfg,
        body_overrides={"/v1/customers:import": cfg.import_max_bytes},
        title="Kairos",
    )
    app.add_middleware(MediaTypes)
    # Fail fast on a bad key configuration rather than at the first request.
    app.state.keyring = load_keyring(cfg)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = gateway.openapi.build(app, cfg)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
