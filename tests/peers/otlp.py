"""An OpenTelemetry collector's OTLP/HTTP trace receiver on loopback: ``POST /v1/traces``
with a protobuf ``ExportTraceServiceRequest`` (gzip or not), as the SDK's exporter sends it;
keeps every span it receives, with the sending service's name."""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.peers.base import LoopThread

PROTOBUF = "application/x-protobuf"


@dataclass(frozen=True)
class Span:
    """One received span, ids in hex as in ``traceparent``."""

    service: str
    name: str
    kind: int  # the protobuf enum: 1 internal, 2 server, 3 client, 4 producer, 5 consumer
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, str]


class OtlpPeer:
    """The started receiver; ``env`` points the suite's processes at it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[Span] = []
        self.requests = 0
        self.refused = 0
        self.thread = LoopThread("peer-otlp")
        self.port: int = self.thread.run(self._serve())
        self.env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: spans reach the peer soon after they end
        }

    async def _serve(self) -> int:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        port: int = self._runner.addresses[0][1]
        return port

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self.requests += 1
        if request.content_type != PROTOBUF:
            with self._lock:
                self.refused += 1
            return web.Response(status=415, text="only application/x-protobuf")
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        msg = ExportTraceServiceRequest()
        try:
            msg.ParseFromString(body)
        except Exception:
            with self._lock:
                self.refused += 1
            return web.Response(status=400, text="not an ExportTraceServiceRequest")
        got = []
        for rs in msg.resource_spans:
            service = next(
                (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"),
                "",
            )
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        Span(
                            service=service,
                            name=s.name,
                            kind=int(s.kind),
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            attributes={
                                a.key: str(
                                    getattr(a.value, a.value.WhichOneof("value") or "string_value")
                                )
                                for a in s.attributes
                            },
                        )
                    )
        with self._lock:
            self._spans += got
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type=PROTOBUF
        )

    @property
    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    def trace(self, trace_id: str) -> list[Span]:
        """Every span of one trace received so far."""
        return [s for s in self.spans if s.trace_id == trace_id]

    def stop(self) -> None:
        self.thread.run(self._runner.cleanup())
        self.thread.stop()


def start(tmp: Path) -> OtlpPeer:
    """Start the receiver (not in the suite's default peers: tracing has its own stack)."""
    return OtlpPeer()
