"""W3C trace context across the hops the instrumentations do not cover: the gateway's
aiohttp calls to the services (a client span, ``traceparent`` in the outgoing headers).

NATS messages carry it too (``shared.bus.Bus.headers_for`` and the consumer's span). All
of it costs nothing when tracing is off (no OTLP endpoint configured).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, MutableMapping

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from shared.telemetry import tracing_enabled

tracer = trace.get_tracer("kairos.upstream")


@contextlib.contextmanager
def client_span(
    service: str, method: str, path: str, headers: MutableMapping[str, str]
) -> Iterator[Span | None]:
    """A CLIENT span for one call to ``service``, its context injected into ``headers``
    (``traceparent``, ``tracestate``); yields None and does nothing with tracing off."""
    if not tracing_enabled():
        yield None
        return
    with tracer.start_as_current_span(
        f"{method} {service}",
        kind=SpanKind.CLIENT,
        attributes={
            "http.request.method": method,
            "url.path": path,
            "peer.service": f"kairos-{service}",
        },
        record_exception=True,
    ) as span:
        propagate.inject(headers)
        yield span


def record_status(span: Span | None, status: int) -> None:
    """The answer's status on the client span (5xx marks it as an error)."""
    if span is None:
        return
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
