"""A small keep-alive HTTP/1.1 client for the gateway's calls to the services.

Every public request costs the gateway one upstream call, so the client's own CPU is a
large share of the gateway's cost per request. aiohttp's ``ClientSession.request`` builds
a request, a response, a timer context, cookie and redirect handling and a stream reader
per call; this client writes one prepared head and parses the answer with ``httptools``
(the parser uvicorn uses), on connections pooled per service.

What it does and nothing more:

- one pool per (host, port); idle connections are reused most recent first, at most
  ``limit`` connections at once (further callers wait for one);
- an idle connection is dropped after ``idle_s`` (below uvicorn's 5 s keep-alive, so the
  server never closes one under us in the normal case); when a reused connection turns
  out to be closed before any byte of the answer came, the request is sent once more on
  a fresh connection (the server cannot have read it: it closes only idle connections);
- ``connect`` and ``total`` time limits; a timed-out connection is closed, never reused;
- ``Connection: close`` and protocol errors retire the connection.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlencode

import httptools


class UpstreamError(Exception):
    """The connection failed, closed early or spoke broken HTTP."""


@dataclass
class Answer:
    """One response, read whole."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class _Pending:
    future: asyncio.Future[Answer]
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    started: bool = False  # any byte of the answer arrived


class _Conn(asyncio.Protocol):
    """One connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.pending: _Pending | None = None
        self.closed = False
        self.keep_alive = True
        self.last_used = time.monotonic()
        self._name = b""

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        p = self.pending
        if p is None:  # nothing asked: the server is closing an idle connection
            self.close()
            return
        p.started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"invalid HTTP answer: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(UpstreamError(f"connection closed: {exc or 'by the server'}"))

    # -- httptools callbacks -----------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.pending is not None:
            self.pending.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        if self.pending is not None:
            self.pending.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self.pending is not None:
            self.pending.chunks.append(body)

    def on_message_complete(self) -> None:
        p, self.pending = self.pending, None
        if p is not None and not p.future.done():
            p.future.set_result(Answer(p.status, p.headers, b"".join(p.chunks)))

    # -- use ---------------------------------------------------------------------------
    def _fail(self, exc: Exception) -> None:
        p, self.pending = self.pending, None
        if p is not None and not p.future.done():
            p.future.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def send(self, data: bytes) -> _Pending:
        assert self.transport is not None
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self.pending = _Pending(fut)
        self.transport.write(data)
        return self.pending


class Pool:
    """Keep-alive connections to one host and port."""

    def __init__(self, host: str, port: int, *, limit: int = 64, idle_s: float = 4.0) -> None:
        self.host, self.port = host, port
        self.idle_s = idle_s
        self.idle: deque[_Conn] = deque()
        self.slots = asyncio.Semaphore(limit)
        self.host_header = f"host: {host}:{port}\r\n".encode()
        self.opened = 0  # connections opened so far (keep-alive reuse is visible in tests)

    async def _connect(self, timeout: float) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(_Conn, self.host, self.port)
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self.opened += 1
        return conn

    def _take_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()  # most recently used first
            if conn.closed or now - conn.last_used > self.idle_s:
                conn.close()
                continue
            return conn
        return None

    async def request(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes | None,
        *,
        total: float,
        connect: float,
    ) -> Answer:
        """Send one request and read its answer; raises UpstreamError or TimeoutError."""
        head = [f"{method} {target} HTTP/1.1\r\n".encode(), self.host_header]
        for k, v in headers.items():
            head.append(f"{k}: {v}\r\n".encode("latin-1"))
        head.append(b"content-length: %d\r\n\r\n" % len(body or b""))
        data = b"".join(head) + (body or b"")
        async with self.slots, asyncio.timeout(total):
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._connect(connect)
            try:
                pending = conn.send(data)
                try:
                    answer = await pending.future
                except UpstreamError:
                    if not (reused and not pending.started):
                        raise
                    # a keep-alive connection the server had closed: once more, fresh
                    conn.close()
                    conn = await self._connect(connect)
                    answer = await conn.send(data).future
            except BaseException:
                conn.close()
                raise
            if conn.keep_alive and not conn.closed:
                conn.last_used = time.monotonic()
                self.idle.append(conn)
            else:
                conn.close()
            return answer

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


def target_of(path: str, params: dict[str, str] | None) -> str:
    """The request target: the path with its query string."""
    return f"{path}?{urlencode(params)}" if params else path
