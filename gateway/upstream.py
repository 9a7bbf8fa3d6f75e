"""Forwarding from the gateway to the services that own the data.

Calls whose answer is read whole go through ``gateway.client`` (keep-alive pools and an
``httptools`` parser: a fraction of aiohttp's CPU per call, see bench/upstream.py); streamed
bodies (imports, exports) through aiohttp. httpx is not used here: httpcore's pool checks
every pooled connection on each request, which made the 360° view (three upstream calls)
CPU-bound at ~180 requests/s. Each call carries the trace context (``traceparent``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
from starlette.requests import Request
from starlette.responses import Response

from gateway.client import Pool, UpstreamError, target_of
from gateway.idempotency import idempotent
from shared.auth import Principal
from shared.errors import DomainError, Unavailable
from shared.service import Runtime
from shared.settings import SERVICES, Settings
from shared.tracing import client_span, record_status

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
    """One keep-alive pool per service (and an aiohttp session for streamed bodies)."""

    def __init__(self, settings: Settings, *, pool_limit: int = 64) -> None:
        self.settings = settings
        self.base = {name: settings.url_of(name).rstrip("/") for name in SERVICES}
        self.timeout = aiohttp.ClientTimeout(total=settings.upstream_timeout_s, connect=1.0)
        self._session: aiohttp.ClientSession | None = None
        self.pools: dict[str, Pool] = {}
        for name, url in self.base.items():
            parts = urlsplit(url)
            if parts.scheme == "http" and parts.hostname and not parts.path:
                self.pools[name] = Pool(parts.hostname, parts.port or 80, limit=pool_limit)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=256, limit_per_host=64, keepalive_timeout=4)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self.timeout, auto_decompress=False
            )
        return self._session

    async def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        service: str,
        method: str,
        path: str,
        *,
        principal: str | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Call a service; an unreachable or slow service is a 503/504 problem."""
        hdrs = dict(headers or {})
        if principal:
            hdrs["x-kairos-principal"] = principal
        total = self.settings.upstream_timeout_s if timeout is None else timeout
        pool = self.pools.get(service)
        with client_span(service, method, path, hdrs) as span:
            try:
                if pool is None:
                    reply = await self._aiohttp(service, method, path, hdrs, content, params, total)
                else:
                    ans = await pool.request(
                        method,
                        target_of(path, params),
                        hdrs,
                        content,
                        total=total,
                        connect=min(1.0, total),
                    )
                    reply = Reply(
                        ans.status, ans.body, ans.headers.get("content-type", "application/json")
                    )
            except TimeoutError as exc:
                raise GatewayTimeout(f"The {service} service did not answer in time.") from exc
            except (UpstreamError, aiohttp.ClientError) as exc:
                log.warning("%s unreachable: %s", service, exc)
                raise Unavailable(
                    f"The {service} service is not reachable; try again shortly."
                ) from exc
            record_status(span, reply.status_code)
            return reply

    async def _aiohttp(
        self,
        service: str,
        method: str,
        path: str,
        headers: dict[str, str],
        content: bytes | None,
        params: dict[str, str] | None,
        total: float,
    ) -> Reply:
        """A service behind a URL the pool does not take (https, a path prefix)."""
        async with self.session.request(
            method,
            self.base[service] + path,
            data=content,
            headers=headers,
            params=params,
            timeout=aiohttp.ClientTimeout(total=total, connect=min(1.0, total)),
        ) as resp:
            body = await resp.read()
            return Reply(resp.status, body, resp.headers.get("content-type", "application/json"))

    async def stream(
        self, service: str, path: str, body: AsyncIterator[bytes], headers: dict[str, str]
    ) -> Reply:
        """POST a streamed body (imports) with no overall time limit."""
        headers = dict(headers)
        with client_span(service, "POST", path, headers) as span:
            reply = await self._stream(service, path, body, headers)
            record_status(span, reply.status_code)
            return reply

    async def _stream(
        self, service: str, path: str, body: AsyncIterator[bytes], headers: dict[str, str]
    ) -> Reply:
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
