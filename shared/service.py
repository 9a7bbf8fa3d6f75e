"""The composition root every Kairos process shares: lifespan, health, metrics, errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from redis.asyncio import Redis
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import errors, metrics
from shared.bus import Bus, Consumer
from shared.db import Database, OutboxRelay
from shared.deadlines import BodyDeadline
from shared.errors import JSONResponse
from shared.redis import Keys, make_redis
from shared.settings import Settings, get_settings
from shared.telemetry import (
    MetricsMiddleware,
    configure_logging,
    configure_tracing,
    fastapi_telemetry_kwargs,
    metrics_endpoint,
)

log = logging.getLogger("kairos.service")


@dataclass
class Runtime:
    """What a process owns for its lifetime: settings, engine, Redis, NATS, consumers."""

    name: str
    settings: Settings
    bus: Bus
    redis: Redis
    keys: Keys
    db: Database | None = None
    consumers: list[Consumer] = field(default_factory=list)
    relay: OutboxRelay | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    background: list[asyncio.Task[Any]] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    readiness: dict[str, Callable[[], str]] = field(default_factory=dict)


Setup = Callable[[Runtime], Awaitable[None]]


class BodyLimit:
    """Refuses request bodies over a size with 413 (streamed count, not only Content-Length)."""

    def __init__(self, app: ASGIApp, default: int, overrides: dict[str, int]) -> None:
        self.app = app
        self.default = default
        self.overrides = overrides

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.overrides.get(scope["path"], self.default)
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > limit:
                await _too_large(scope, receive, send, limit)
                return
        seen = 0

        async def _receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return msg

        try:
            await self.app(scope, _receive, send)
        except _BodyTooLarge:
            await _too_large(scope, receive, send, limit)


class _BodyTooLarge(StarletteHTTPException):
    # An HTTPException: FastAPI's body parsing passes it through (it turned any other
    # exception from ``receive`` into a 400), and the problem+json handler answers 413.
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than {limit} bytes.")
        self.limit = limit


async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    resp = errors.problem(413, f"The request body is larger than {limit} bytes.")
    await resp(scope, receive, send)


async def _connect_with_retry(what: str, connect: Callable[[], Awaitable[Any]]) -> None:
    for attempt in range(60):
        try:
            await connect()
            return
        except Exception as exc:
            if attempt == 59:
                raise
            log.warning("%s not reachable yet (%s); retrying", what, exc)
            await asyncio.sleep(0.5)


def create_service_app(
    name: str,
    *,
    schema: str | None,
    routers: Sequence[APIRouter] = (),
    setup: Setup | None = None,
    settings: Settings | None = None,
    body_overrides: dict[str, int] | None = None,
    title: str | None = None,
) -> FastAPI:
    """Build a process's app; the lifespan owns its engine, Redis and NATS clients."""
    cfg = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(name, level=cfg.log_level, as_json=cfg.log_json)
        bus = Bus(
            cfg.nats_url,
            prefix=cfg.bus_prefix,
            source=f"kairos/{name}",
            replicas=cfg.stream_replicas,
        )
        rt = Runtime(name, cfg, bus, make_redis(cfg.redis_url), Keys(cfg.redis_prefix))
        if schema is not None:
            rt.db = Database(cfg.database_url, schema)
        app.state.rt = rt
        app.state.db = rt.db
        await _connect_with_retry("NATS", bus.connect)
        if rt.db is not None:
            rt.relay = OutboxRelay(rt.db, bus)
            rt.relay.start()
        if setup is not None:
            await setup(rt)
        log.info("%s started", name)
        try:
            yield
        finally:
            # All at once: each finishes its batch in hand (and a per-process one removes
            # itself from the server) well within the shutdown grace, however many there are.
            await asyncio.gather(*(c.stop() for c in rt.consumers), return_exceptions=True)
            for t in rt.background:
                t.cancel()
            for close in rt.closers:
                await close()
            if rt.relay is not None:
                await rt.relay.stop()
            await bus.close()
            await rt.redis.aclose()
            if rt.db is not None:
                await rt.db.dispose()
            log.info("%s stopped", name)

    app = FastAPI(
        title=title or f"Kairos {name}",
        lifespan=lifespan,
        default_response_class=JSONResponse,
        **fastapi_telemetry_kwargs(),
    )
    errors.install(app)
    app.add_middleware(BodyLimit, default=cfg.max_body_bytes, overrides=body_overrides or {})
    app.add_middleware(
        BodyDeadline, idle_s=cfg.request_body_idle_s, total_s=cfg.request_body_timeout_s
    )
    app.add_middleware(MetricsMiddleware, service=name)
    configure_tracing(name, app)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> Any:
        rt: Runtime = request.app.state.rt
        checks: dict[str, str] = {}
        probes: dict[str, Callable[[], Awaitable[Any]]] = {"redis": rt.redis.ping}
        if rt.db is not None:
            probes["database"] = rt.db.ping
        for what, probe in probes.items():
            try:
                await asyncio.wait_for(probe(), 2)
                checks[what] = "ok"
            except Exception as exc:
                checks[what] = f"down: {type(exc).__name__}"
        checks["nats"] = "ok" if rt.bus.is_connected() else "down"
        for what, check in rt.readiness.items():  # a process's own state (an index loading)
            checks[what] = check()
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"status": "ok" if ok else "down", "checks": checks}, 200 if ok else 503
        )

    @app.get("/metrics", include_in_schema=False)
    async def metrics_(request: Request) -> Response:
        """Prometheus text exposition, with the gauges sampled now (shared/metrics.py)."""
        rt: Runtime | None = getattr(request.app.state, "rt", None)
        if rt is not None:
            await metrics.sample(rt)
        return await metrics_endpoint(request)

    for r in routers:
        app.include_router(r)
    return app


async def runtime(request: Request) -> Runtime:
    """The process runtime from a request (FastAPI dependency)."""
    rt: Runtime = request.app.state.rt
    return rt
