"""Traces (OpenTelemetry), Prometheus metrics and JSON logs for every process."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter(
    "kairos_http_requests_total", "HTTP requests", ["service", "method", "route", "status"]
)
LATENCY = Histogram(
    "kairos_http_request_seconds",
    "HTTP request latency",
    ["service", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
QUIET_PATHS = ("/healthz", "/readyz", "/metrics")
access_log = logging.getLogger("kairos.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, with the service name and any ``extra`` fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("principal", "method", "path", "status", "ms"):
            if hasattr(record, key):
                doc[key] = getattr(record, key)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def configure_logging(service: str, *, level: str = "INFO", as_json: bool = True) -> None:
    """Route every logger to stderr, JSON by default."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(service)
        if as_json
        else logging.Formatter("%(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def tracing_enabled() -> bool:
    """Traces are recorded only when they have somewhere to go (OTLP endpoint configured)."""
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def fastapi_telemetry_kwargs() -> dict[str, Any]:
    """FastAPI's native telemetry (0.16x+): on with an exporter, off otherwise (it costs
    a span per request even when nothing records it)."""
    import inspect

    from fastapi import FastAPI

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    if tracing_enabled():
        # ``exclude`` is a predicate over the ASGI scope (a list made every request fail
        # with "'list' object is not callable"). One server span per request is what a
        # trace needs: no operation spans (dependencies, endpoint, serialisation) on the hot
        # path; metrics stay with Prometheus.
        return {
            "telemetry": {
                "exclude": _quiet,
                "operation_spans": False,
                "metrics": False,
                "logs": False,
            }
        }
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def _quiet(scope: Any) -> bool:
    """Health and metrics probes are never traced."""
    return scope.get("path") in QUIET_PATHS


def configure_tracing(service: str, app: Any | None = None) -> None:
    """OpenTelemetry traces over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set: HTTP
    server spans, httpx client spans, and W3C traceparent carried through NATS headers."""
    if not tracing_enabled():
        return
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider(resource=Resource.create({"service.name": f"kairos-{service}"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
    HTTPXClientInstrumentor().instrument()
    if app is not None and not fastapi_telemetry_kwargs():
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, excluded_urls=",".join(QUIET_PATHS))


class MetricsMiddleware:
    """Counts and times every request by route template (pure ASGI, no body buffering)."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def _send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", "unmatched")
            elapsed = time.perf_counter() - start
            REQUESTS.labels(self.service, scope["method"], name, str(status[0])).inc()
            LATENCY.labels(self.service, name).observe(elapsed)
            if access_log.isEnabledFor(logging.INFO) and scope["path"] not in QUIET_PATHS:
                state = scope.get("state") or {}
                access_log.info(
                    "%s %s %d",
                    scope["method"],
                    scope["path"],
                    status[0],
                    extra={
                        "principal": state.get("principal"),
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status[0],
                        "ms": round(elapsed * 1000, 2),
                    },
                )


async def metrics_endpoint(_: Request) -> Response:
    """Prometheus text exposition."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
