"""Read deadlines for HTTP requests: a slow-loris client (headers or body trickled a byte at
a time) gets a clear 408 and its connection closed, instead of holding a socket and memory.

uvicorn times out idle keep-alive connections but not a request whose headers never finish,
so the header deadline lives in the HTTP protocol (``GuardedHttpTools``, used by
``shared.runner``). The body deadline is ASGI middleware (``BodyDeadline``): it counts only
the time spent waiting on the client, so a long import the server reads slowly (its own
back-pressure) is never cut short.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shared import errors


def _raw_problem(status: int, reason: str, detail: str) -> bytes:
    """A complete HTTP/1.1 problem+json response that closes the connection."""
    body = orjson.dumps(
        {
            "type": f"https://kairos.dev/problems/{status}",
            "title": reason,
            "status": status,
            "detail": detail,
        }
    )
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {errors.PROBLEM}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


LINGER_S = 2.0


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size bound on request headers.

    The clock starts when the connection opens and again when a request's first byte
    arrives; it stops when that request's headers are complete. Header bytes are counted
    in the parser's callbacks, so a body sent in the same packet never counts."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 65_536

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._in_headers = False
        self._refused = False
        super().connection_made(transport)
        self._arm()  # a connection that never sends a request is closed too

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._header_bytes += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        if self._header_bytes > self.max_header_bytes:  # all of them came in one read
            self._too_large()
            return
        self._in_headers = False
        self._disarm()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def _too_large(self) -> None:
        self._refuse(
            431,
            "Request Header Fields Too Large",
            f"The request headers are larger than {self.max_header_bytes} bytes.",
        )

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self._in_headers and self._header_bytes > self.max_header_bytes:
            self._too_large()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _expired(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not (self._in_headers or self.cycle is None):
            return
        self._refuse(
            408,
            "Request Timeout",
            f"The request headers did not arrive within {self.header_timeout_s:g} s.",
        )

    def _refuse(self, status: int, reason: str, detail: str) -> None:
        self._disarm()
        self._in_headers = False
        self._refused = True
        if not self.transport.is_closing():
            # A lingering close: the answer, then our FIN, while what the client still sends
            # is read and dropped for a moment. Closing at once with unread input would
            # send a reset, which can destroy the answer before the client reads it.
            self.transport.write(_raw_problem(status, reason, detail))
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)


def guarded_protocol(header_timeout_s: float, max_header_bytes: int = 65_536) -> type[Any]:
    """The protocol class for ``uvicorn.run(http=...)`` with these bounds."""
    return type(
        "GuardedHttpTools",
        (GuardedHttpTools,),
        {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes},
    )


class BodyTimedOut(StarletteHTTPException):
    """Raised from ``receive``: FastAPI passes an HTTPException from body parsing through
    unchanged, and the problem+json handler renders it (a plain exception became a 400)."""

    def __init__(self, idle_s: float, total_s: float) -> None:
        super().__init__(
            408,
            "The request body did not arrive in time (at most "
            f"{idle_s:g} s between chunks; after {total_s:g} s at least "
            f"{MIN_BODY_RATE // 1024} KiB/s).",
            headers={"connection": "close"},
        )


MIN_BODY_RATE = 16 * 1024  # bytes/s a body must average once it has taken total_s


class BodyDeadline:
    """Answers 408 when a request body's client keeps the server waiting too long: more than
    ``idle_s`` for one chunk, or, after ``total_s`` spent waiting, averaging under
    ``MIN_BODY_RATE`` (a trickle). Time the server spends on its own work between reads does
    not count, and a large upload at a real rate is never cut short."""

    def __init__(self, app: ASGIApp, idle_s: float, total_s: float) -> None:
        self.app = app
        self.idle_s = idle_s
        self.total_s = total_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        waited = 0.0
        received = 0
        body_done = False
        started = False

        async def _receive() -> Message:
            nonlocal waited, received, body_done
            if body_done:  # after the body: waiting for a disconnect is the app's business
                return await receive()
            if waited > self.total_s and received < MIN_BODY_RATE * waited:
                raise BodyTimedOut(self.idle_s, self.total_s)
            t0 = time.monotonic()
            try:
                msg = await asyncio.wait_for(receive(), self.idle_s)
            except TimeoutError:
                raise BodyTimedOut(self.idle_s, self.total_s) from None
            waited += time.monotonic() - t0
            received += len(msg.get("body", b""))
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                body_done = True
            return msg

        async def _send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, _receive, _send)
        except BodyTimedOut as exc:  # raised outside the app's own exception handling
            if started:
                return  # the response is under way; the connection simply ends
            resp = errors.problem(408, str(exc.detail), headers={"connection": "close"})
            await resp(scope, receive, send)
