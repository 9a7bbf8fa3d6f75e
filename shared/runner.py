"""Run one Kairos process under uvicorn (SIGTERM drains through the app's lifespan)."""

from __future__ import annotations

import gc

import uvicorn

from shared.deadlines import guarded_protocol
from shared.settings import Settings, get_settings


def tune_gc(s: Settings) -> None:
    """Apply the collector's thresholds (``KAIROS_GC_THRESHOLDS``, e.g. ``[50000,20,10]``);
    see ``Settings.gc_thresholds`` for why they are not Python's default."""
    gc.set_threshold(*s.gc_thresholds)


def serve(name: str, factory: str) -> None:
    """Serve ``factory`` (an import path to create_app) on the process's configured port."""
    s = get_settings()
    tune_gc(s)
    host = s.gateway_host if name == "gateway" else s.host
    uvicorn.run(
        factory,
        factory=True,
        host=host,
        port=s.port_of(name),
        # Explicit, not "auto": uvicorn falls back to asyncio and h11 silently when these
        # are missing, which costs about a third of a process's requests per second. The
        # HTTP protocol is httptools' (guarded_protocol below subclasses it).
        loop="uvloop",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=20,
        # A slow-loris client gets a 408 instead of holding a connection open forever.
        http=guarded_protocol(s.request_header_timeout_s),
    )
