"""A small HTTP/2 client connection for the APNs provider: many concurrent requests over one
TLS transport, written for throughput (measured in bench/push.py).

Three choices make it several times faster than ``httpx`` over HTTP/2 on one core: frames
produced in one loop tick leave in one TLS write; open streams are counted here instead of by
h2 (which walks every stream before opening one); and request headers are HPACK-encoded by
:class:`RequestHeaders`, which caches the encoding of the headers that repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import H2Error, NoAvailableStreamIDError

MAX_STREAMS = 1000  # per connection, also bounded by the server's SETTINGS
_STATIC = {b":authority": 1, b":path": 4, b"authorization": 23}  # RFC 7541 Appendix A
_FULL = {(b":method", b"POST"): 3, (b":scheme", b"https"): 7}
_DYNAMIC_FIRST = 62  # index of the newest dynamic table entry


def _int(value: int, prefix: int, flags: int) -> bytes:
    """An HPACK integer (RFC 7541 §5.1) with ``prefix`` bits in its first byte."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(raw: bytes) -> bytes:
    return _int(len(raw), 7, 0) + raw  # no Huffman: cheaper to make than the bytes it saves


class RequestHeaders:
    """An HPACK encoder for our requests (replaces h2's, which searches both tables for every
    header of every request): static-table references where they exist, literals without
    indexing otherwise (cached for values that repeat), and the dynamic table used for one
    header only, ``authorization``, whose 200-byte token then costs one byte per request."""

    def __init__(self) -> None:
        self._max = 4096  # the decoder's table size until its SETTINGS say otherwise
        self._newest: bytes | None = None  # the authorization value at index 62
        self._resize = False
        self._cache: dict[tuple[bytes, bytes], bytes] = {}

    @property
    def header_table_size(self) -> int:
        return self._max

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        # h2 calls this when the server's SETTINGS_HEADER_TABLE_SIZE changes.
        self._max = min(value, 4096)
        self._resize = True

    def encode(self, headers: list[tuple[bytes, bytes]], huffman: bool = False) -> bytes:
        """One header block."""
        out: list[bytes] = []
        if self._resize:
            # Empty the table, then announce the size we use (RFC 7541 §4.2, §6.3).
            out += [_int(0, 5, 0x20), _int(self._max, 5, 0x20)]
            self._resize, self._newest = False, None
        cache = self._cache
        for name, value in headers:
            full = _FULL.get((name, value))
            if full is not None:
                out.append(_int(full, 7, 0x80))
            elif name == b"authorization":
                out.append(self._authorization(value))
            else:
                encoded = cache.get((name, value))
                if encoded is None:
                    index = _STATIC.get(name, 0)
                    head = _int(index, 4, 0) if index else b"\x00" + _string(name)
                    encoded = head + _string(value)
                    if name not in (b":path", b"apns-id") and len(cache) < 512:
                        cache[(name, value)] = encoded
                out.append(encoded)
        return b"".join(out)

    def _authorization(self, value: bytes) -> bytes:
        if value == self._newest:
            return _int(_DYNAMIC_FIRST, 7, 0x80)
        if len(value) + 13 + 32 > self._max:  # would not fit: the table could not keep it
            return _int(_STATIC[b"authorization"], 4, 0) + _string(value)
        # Literal with incremental indexing: it becomes entry 62 (older entries may go).
        self._newest = value
        return _int(_STATIC[b"authorization"], 6, 0x40) + _string(value)


class Unsent(ConnectionResetError):
    """The connection closed before the server processed the request (GOAWAY above it, a
    refused stream, a connection already closing): sending it again is safe."""


class _H2(H2Connection):
    """h2 counts open streams by walking all of them before each new one: quadratic with
    hundreds in flight (a sixth of the CPU at 3,000/s). The connection keeps the count and
    drops finished streams itself."""

    inflight = 0

    def __init__(self, config: H2Configuration) -> None:
        super().__init__(config)
        self.encoder = RequestHeaders()  # type: ignore[assignment]

    @property
    def open_outbound_streams(self) -> int:
        return self.inflight

    def forget(self, stream_id: int) -> None:
        """Drop a finished stream, remembering how it closed (as h2's own sweep does)."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.closed:
            del self.streams[stream_id]
            self._closed_streams[stream_id] = stream.closed_by


@dataclass
class _Stream:
    future: asyncio.Future[tuple[int, dict[bytes, bytes], bytes]]
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)


class Connection(asyncio.Protocol):
    """One HTTP/2 connection: many concurrent streams over one TLS transport."""

    def __init__(self, authority: bytes) -> None:
        self._authority = authority
        self._h2 = _H2(
            H2Configuration(
                client_side=True,
                header_encoding=None,
                # Our headers are well-formed by construction; h2 re-validating each one
                # costs more than encoding it.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
            )
        )
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, _Stream] = {}
        self._room = asyncio.Event()
        self._room.set()
        self._writable = True
        self._flush_pending = False
        self.dead = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._h2.initiate_connection()
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except H2Error as exc:
            self._fail(ConnectionError(f"HTTP/2 protocol error: {exc}"))
            return
        for ev in events:
            if isinstance(ev, ResponseReceived):
                st = self._streams.get(ev.stream_id)
                if st is not None:
                    st.headers = dict(ev.headers)
                    st.status = int(st.headers.get(b":status", b"0"))
            elif isinstance(ev, DataReceived):
                st = self._streams.get(ev.stream_id)
                if st is not None:
                    st.body += ev.data
                self._h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, StreamEnded):
                st = self._streams.get(ev.stream_id)
                if st is not None and not st.future.done():
                    st.future.set_result((st.status, st.headers, bytes(st.body)))
            elif isinstance(ev, StreamReset):
                st = self._streams.get(ev.stream_id)
                if st is not None and not st.future.done():
                    # REFUSED_STREAM (7): the server did not process it.
                    error = Unsent if ev.error_code == 7 else ConnectionResetError
                    st.future.set_exception(error(f"stream reset {ev.error_code}"))
            elif isinstance(ev, ConnectionTerminated):
                # GOAWAY: streams above last_stream_id were not processed; the rest finish.
                self.dead = True
                last = ev.last_stream_id or 0
                for sid, st in self._streams.items():
                    if sid > last and not st.future.done():
                        st.future.set_exception(Unsent("the server sent GOAWAY"))
        # Window updates and new settings may make room for waiting sends.
        self._room.set()
        self._schedule_flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionResetError(f"connection lost: {exc or 'closed'}"))

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        self._room.set()

    def _fail(self, exc: Exception) -> None:
        self.dead = True
        for st in self._streams.values():
            if not st.future.done():
                st.future.set_exception(exc)
        self._room.set()
        if self._transport is not None:
            self._transport.abort()

    def _schedule_flush(self) -> None:
        # Frames produced in one loop tick leave in one TLS write.
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _full(self, size: int) -> bool:
        limit = min(MAX_STREAMS, self._h2.remote_settings.max_concurrent_streams)
        return len(self._streams) >= limit or self._h2.outbound_flow_control_window < size

    async def request(
        self, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes, timeout: float
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        """POST ``body`` to ``path``; (status, headers, body) of the answer."""
        async with asyncio.timeout(timeout):
            while not self.dead and (self._full(len(body)) or not self._writable):
                self._room.clear()
                await self._room.wait()
            if self.dead:
                raise Unsent("connection closed")
            try:
                sid = self._h2.get_next_available_stream_id()
            except NoAvailableStreamIDError:
                # 2^30 requests on one connection (days at full rate): retire it.
                self.dead = True
                raise Unsent("stream ids exhausted") from None
            st = _Stream(asyncio.get_running_loop().create_future())
            self._streams[sid] = st
            self._h2.inflight = len(self._streams)
            try:
                self._h2.send_headers(
                    sid,
                    [
                        (b":method", b"POST"),
                        (b":scheme", b"https"),
                        (b":authority", self._authority),
                        (b":path", path),
                        *headers,
                    ],
                )
                self._h2.send_data(sid, body, end_stream=True)
                self._schedule_flush()
                return await st.future
            except BaseException:
                if not st.future.done() and not self.dead:
                    # Timed out or cancelled: tell the server we no longer wait.
                    with contextlib.suppress(H2Error):
                        self._h2.reset_stream(sid)
                        self._schedule_flush()
                raise
            finally:
                del self._streams[sid]
                self._h2.inflight = len(self._streams)
                self._h2.forget(sid)
                self._room.set()
                if self.dead and not self._streams and self._transport is not None:
                    self._transport.close()  # retired by GOAWAY and drained

    def close(self) -> None:
        self.dead = True
        if self._transport is not None:
            with contextlib.suppress(H2Error):
                self._h2.close_connection()
                self._flush()
            self._transport.close()
