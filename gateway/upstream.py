"""Forwarding from the gateway to the services that own the data.

aiohttp rather than httpx here: httpcore's pool checks every pooled connection on each
request, which made the 360° view (three upstream calls) CPU-bound at ~180 requests/s.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from starlette.requests import Request
from starlette.responses import Response

from gateway.idempotency import idempotent
from shared.auth import Principal
from shared.errors import DomainError, Unavailable
from shared.service import Runtime
from shared.settings import SERVICES, Settings

log = logging.getLogger("kairos.gateway.upstream")


class GatewayTimeout(DomainError):
    status = 504
    title = "Gateway timeout"


@dataclass(frozen=True)
class Reply:
    """A service's answer, read whole."""

    status_code: int
    content: bytes
    content_type: str


class Upstreams:
    """One pooled keep-alive HTTP session per service."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base = {name: settings.url_of(name).rstrip("/") for name in SERVICES}
        self.timeout = aiohttp.ClientTimeout(total=settings.upstream_timeout_s, connect=1.0)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=256, limit_per_host=64, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self.timeout, auto_decompress=False
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        service: str,
        method: str,
        path: str,
        *,
        principal: str | None = None,
        content: Any = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Call a service; an unreachable or slow service is a 503/504 problem."""
        hdrs = dict(headers or {})
        if principal:
            hdrs["x-kairos-principal"] = principal
        kw: dict[str, Any] = {}
        if timeout is not None:
            kw["timeout"] = aiohttp.ClientTimeout(total=timeout, connect=min(1.0, timeout))
        try:
            async with self.session.request(
                method, self.base[service] + path, data=content, headers=hdrs, params=params, **kw
            ) as resp:
                body = await resp.read()
                return Reply(
                    resp.status, body, resp.headers.get("content-type", "application/json")
                )
        except TimeoutError as exc:
            raise GatewayTimeout(f"The {service} service did not answer in time.") from exc
        except aiohttp.ClientError as exc:
            log.warning("%s unreachable: %s", service, exc)
            raise Unavailable(
                f"The {service} service is not reachable; try again shortly."
            ) from exc

    async def stream(
        self, service: str, path: str, body: AsyncIterator[bytes], headers: dict[str, str]
    ) -> Reply:
        """POST a streamed body (imports) with no overall time limit."""
        try:
            async with self.session.post(
                self.base[service] + path,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=None, connect=1.0),
            ) as resp:
                return Reply(
                    resp.status,
                    await resp.read(),
                    resp.headers.get("content-type", "application/json"),
                )
        except aiohttp.ClientError as exc:
            raise Unavailable(
                f"The {service} service is not reachable; try again shortly."
            ) from exc


def relay(resp: Reply) -> Response:
    """Pass a service's answer through unchanged."""
    # A service's 503 says "a dependency is down, come back": keep saying when.
    headers = {"retry-after": "1"} if resp.status_code == 503 else None
    return Response(
        resp.content, status_code=resp.status_code, media_type=resp.content_type, headers=headers
    )


async def forward(
    request: Request,
    rt: Runtime,
    principal: Principal,
    service: str,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    timeout: float | None = None,
) -> Response:
    """Pass a request to the owning service as received (the body was validated here already,
    the service validates it again), with the principal; writes honour Idempotency-Key."""

    async def call() -> Response:
        up: Upstreams = rt.extras["upstreams"]
        content = await request.body() if method in ("PUT", "POST", "PATCH") else None
        resp = await up.request(
            service,
            method,
            path,
            principal=principal.name,
            content=content,
            headers={"content-type": "application/json"},
            params=params,
            timeout=timeout,
        )
        return relay(resp)

    if method == "GET":
        return await call()
    return await idempotent(request, rt.redis, rt.keys, principal.name, call)
