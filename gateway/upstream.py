"""Forwarding from the gateway to the services that own the data."""

from __future__ import annotations

import logging
from typing import Any

import httpx
from starlette.responses import Response

from shared.errors import DomainError, Unavailable
from shared.settings import SERVICES, Settings

log = logging.getLogger("kairos.gateway.upstream")

PASS_HEADERS = ("content-type", "traceparent", "tracestate")


class GatewayTimeout(DomainError):
    status = 504
    title = "Gateway timeout"


class Upstreams:
    """One pooled HTTP client per service."""

    def __init__(self, settings: Settings) -> None:
        timeout = httpx.Timeout(settings.upstream_timeout_s, connect=1.0)
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=128)
        self.clients = {
            name: httpx.AsyncClient(base_url=settings.url_of(name), timeout=timeout, limits=limits)
            for name in SERVICES
        }

    async def close(self) -> None:
        for c in self.clients.values():
            await c.aclose()

    async def request(
        self,
        service: str,
        method: str,
        path: str,
        *,
        principal: str | None = None,
        content: Any = None,
        headers: dict[str, str] | None = None,
        params: Any = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """Call a service; an unreachable or slow service is a 503/504 problem."""
        hdrs = dict(headers or {})
        if principal:
            hdrs["x-kairos-principal"] = principal
        try:
            return await self.clients[service].request(
                method,
                path,
                content=content,
                headers=hdrs,
                params=params,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TimeoutException as exc:
            raise GatewayTimeout(f"The {service} service did not answer in time.") from exc
        except httpx.TransportError as exc:
            log.warning("%s unreachable: %s", service, exc)
            raise Unavailable(
                f"The {service} service is not reachable; try again shortly."
            ) from exc


def relay(resp: httpx.Response) -> Response:
    """Pass a service's answer through unchanged."""
    return Response(
        resp.content,
        status_code=resp.status_code,
        media_type=resp.headers.get("content-type", "application/json"),
    )
