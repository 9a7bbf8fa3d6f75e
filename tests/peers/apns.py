"""An APNs provider API peer on loopback: HTTP/2 over TLS (ALPN h2), token auth checked like
Apple (kid, iss, ES256 signature, iat younger than an hour), headers and the 4096-byte limit
checked, Apple's answers given on command per device token.

``python -m tests.peers.apns DIR`` serves one in its own process (the benchmark's way of
giving client and peer a core each) and prints its settings as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, RequestReceived, StreamEnded, StreamReset
from h2.exceptions import H2Error
from h2.settings import SettingCodes

from tests.peers.base import LoopThread, make_tls

KEY_ID = "KAIROSKEY1"
TEAM_ID = "KAIROSTEAM"
TOPIC = "com.example.kairos"
TOKEN_LIFETIME = 3600.0  # Apple refuses provider tokens older than an hour
TOKEN_UPDATE_MIN = 20 * 60.0  # … and changes on one connection more often than this
_HEX = re.compile(rb"^[0-9a-fA-F]{16,200}$")
_CFG = dict(
    header_encoding=None,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
)


@dataclass(frozen=True)
class Received:
    """One notification request as the peer saw it, and what it answered."""

    token: str
    headers: dict[str, str]
    payload: dict[str, Any] | None
    size: int
    status: int
    reason: str | None
    jwt: str | None
    connection: int
    at: float  # time.monotonic() at receipt


@dataclass(frozen=True)
class _Answer:
    status: int
    reason: str | None
    extra: dict[str, Any]


class _Server:
    """State shared by every connection: keys, commanded answers, what was received."""

    def __init__(self, public_key: ec.EllipticCurvePublicKey) -> None:
        self.public_key = public_key
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.answers: dict[str, _Answer] = {}
        self.verified: dict[str, tuple[str | None, float]] = {}  # jwt → (refusal, iat)
        self.expired: set[str] = set()
        self.connections = 0
        self.live: set[_Protocol] = set()
        self.log: Any = None  # standalone: a file every request is written to, a line each

    def check_token(self, token: str) -> tuple[str | None, float]:
        """(refusal reason or None, iat) of a provider token; signatures verified once."""
        known = self.verified.get(token)
        if known is None:
            known = self._verify(token)
            self.verified[token] = known
        refusal, iat = known
        if refusal is None and (token in self.expired or time.time() - iat > TOKEN_LIFETIME):
            return "ExpiredProviderToken", iat
        return refusal, iat

    def _verify(self, token: str) -> tuple[str | None, float]:
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token, self.public_key, algorithms=["ES256"], options={"verify_iat": False}
            )
        except jwt.PyJWTError:
            return "InvalidProviderToken", 0.0
        if header.get("kid") != KEY_ID or claims.get("iss") != TEAM_ID:
            return "InvalidProviderToken", 0.0
        iat = claims.get("iat")
        if not isinstance(iat, int):
            return "InvalidProviderToken", 0.0
        return None, float(iat)


class _H2(H2Connection):
    """h2 walks every stream to count open ones before accepting a new one (quadratic with
    hundreds in flight): count and sweep here instead."""

    inflight = 0

    @property
    def open_inbound_streams(self) -> int:
        return self.inflight

    def forget(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and stream.closed:
            del self.streams[stream_id]
            self._closed_streams[stream_id] = stream.closed_by


class _Protocol(asyncio.Protocol):
    def __init__(self, server: _Server) -> None:
        self.s = server
        self.h2 = _H2(H2Configuration(client_side=False, **_CFG))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, tuple[dict[bytes, bytes], bytearray]] = {}
        self.token: str | None = None
        self.token_since = 0.0
        with server.lock:
            server.connections += 1
            self.number = server.connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.s.live.add(self)
        self.h2.initiate_connection()
        self.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
        self.h2.increment_flow_control_window(1 << 24)
        transport.write(self.h2.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.s.live.discard(self)

    def goaway(self) -> None:
        """Close as Apple does when it retires a connection: GOAWAY, then close."""
        if self.transport is None or self.transport.is_closing():
            return
        self.h2.close_connection(last_stream_id=self.h2.highest_inbound_stream_id)
        self.transport.write(self.h2.data_to_send())
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            events = self.h2.receive_data(data)
        except H2Error:
            self.transport.abort()
            return
        for ev in events:
            if isinstance(ev, RequestReceived):
                self.streams[ev.stream_id] = (dict(ev.headers), bytearray())  # type: ignore[arg-type]
                self.h2.inflight = len(self.streams)
            elif isinstance(ev, DataReceived):
                entry = self.streams.get(ev.stream_id)
                if entry is not None:
                    entry[1].extend(ev.data)
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, StreamEnded):
                entry = self.streams.pop(ev.stream_id, None)
                if entry is not None:
                    self._respond(ev.stream_id, *entry)
                self.h2.inflight = len(self.streams)
                self.h2.forget(ev.stream_id)
            elif isinstance(ev, StreamReset):
                self.streams.pop(ev.stream_id, None)
                self.h2.inflight = len(self.streams)
                self.h2.forget(ev.stream_id)
        out = self.h2.data_to_send()
        if out:
            self.transport.write(out)

    def _respond(self, sid: int, headers: dict[bytes, bytes], body: bytearray) -> None:
        status, reason, extra, token, provider_jwt = self._judge(headers, body)
        apns_id = headers.get(b"apns-id") or str(uuid.uuid4()).encode()
        out = [(b":status", str(status).encode()), (b"apns-id", apns_id)]
        if extra.get("retry_after") is not None:
            out.append((b"retry-after", str(extra["retry_after"]).encode()))
        payload: dict[str, Any] | None = None
        if status == 200 or reason not in ("PayloadTooLarge", "PayloadEmpty", "BadPayload"):
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError:
                payload = None
        if token is not None:
            record = Received(
                token=token,
                headers={k.decode(): v.decode() for k, v in headers.items()},
                payload=payload,
                size=len(body),
                status=status,
                reason=reason,
                jwt=provider_jwt,
                connection=self.number,
                at=time.monotonic(),
            )
            with self.s.lock:
                self.s.received.append(record)
                if self.s.log is not None:
                    alert = ((payload or {}).get("aps") or {}).get("alert") or {}
                    self.s.log.write(
                        json.dumps(
                            {
                                "at": record.at,
                                "status": status,
                                "token": record.token,
                                "body": alert.get("body") if isinstance(alert, dict) else None,
                            }
                        )
                        + "\n"
                    )
        if status == 200:
            self.h2.send_headers(sid, out, end_stream=True)
            return
        doc: dict[str, Any] = {"reason": reason}
        if extra.get("timestamp") is not None:
            doc["timestamp"] = extra["timestamp"]
        self.h2.send_headers(sid, [*out, (b"content-type", b"application/json")])
        self.h2.send_data(sid, orjson.dumps(doc), end_stream=True)

    def _judge(
        self, h: dict[bytes, bytes], body: bytearray
    ) -> tuple[int, str | None, dict[str, Any], str | None, str | None]:
        """(status, reason, extra, device token, provider token) as Apple would answer."""
        none: dict[str, Any] = {}
        if h.get(b":method") != b"POST":
            return 405, "MethodNotAllowed", none, None, None
        path = h.get(b":path", b"")
        if not path.startswith(b"/3/device/"):
            return 404, "BadPath", none, None, None
        device = path[len(b"/3/device/") :]
        token = device.decode(errors="replace")
        auth = h.get(b"authorization", b"")
        if not auth.startswith(b"bearer "):
            return 403, "MissingProviderToken", none, token, None
        provider_jwt = auth[7:].decode()
        refusal, _ = self.s.check_token(provider_jwt)
        if refusal is not None:
            return 403, refusal, none, token, provider_jwt
        now = time.monotonic()
        if provider_jwt != self.token:
            if self.token is not None and self.token not in self.s.expired:
                if now - self.token_since < TOKEN_UPDATE_MIN:
                    return 429, "TooManyProviderTokenUpdates", none, token, provider_jwt
            self.token, self.token_since = provider_jwt, now
        if b"apns-topic" not in h:
            return 400, "MissingTopic", none, token, provider_jwt
        if h[b"apns-topic"] != TOPIC.encode():
            return 400, "BadTopic", none, token, provider_jwt
        if h.get(b"apns-push-type", b"alert") not in (b"alert", b"background", b"voip"):
            return 400, "InvalidPushType", none, token, provider_jwt
        if h.get(b"apns-priority", b"10") not in (b"5", b"10", b"1"):
            return 400, "BadPriority", none, token, provider_jwt
        if not h.get(b"apns-expiration", b"0").isdigit():
            return 400, "BadExpirationDate", none, token, provider_jwt
        try:
            uuid.UUID(h.get(b"apns-id", b"00000000-0000-0000-0000-000000000000").decode())
        except ValueError:
            return 400, "BadMessageId", none, token, provider_jwt
        if len(h.get(b"apns-collapse-id", b"")) > 64:
            return 400, "BadCollapseId", none, token, provider_jwt
        if len(body) > 4096:
            return 413, "PayloadTooLarge", none, token, provider_jwt
        if not body:
            return 400, "PayloadEmpty", none, token, provider_jwt
        if not _HEX.match(device):
            return 400, "BadDeviceToken", none, token, provider_jwt
        commanded = self.s.answers.get(token)
        if commanded is not None:
            return commanded.status, commanded.reason, commanded.extra, token, provider_jwt
        return 200, None, none, token, provider_jwt


class ApnsPeer:
    """A started APNs peer: ``env`` points dispatch at it (URL, key, ids, topic, CA)."""

    def __init__(self, tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        self.key_file = tmp / f"AuthKey_{KEY_ID}.p8"
        self.key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self._server = _Server(key.public_key())
        tls = make_tls(tmp / "tls")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        ctx.set_alpn_protocols(["h2"])
        self._thread = LoopThread("apns-peer")

        async def serve() -> asyncio.Server:
            loop = asyncio.get_running_loop()
            return await loop.create_server(
                lambda: _Protocol(self._server), "127.0.0.1", 0, ssl=ctx, backlog=256
            )

        self._listener = self._thread.run(serve())
        port = self._listener.sockets[0].getsockname()[1]
        self.url = f"https://127.0.0.1:{port}"
        self.env = {
            "KAIROS_APNS_URL": self.url,
            "KAIROS_APNS_KEY_FILE": str(self.key_file),
            "KAIROS_APNS_KEY_ID": KEY_ID,
            "KAIROS_APNS_TEAM_ID": TEAM_ID,
            "KAIROS_APNS_TOPIC": TOPIC,
            "KAIROS_APNS_CA_FILE": str(tls.ca_file),
        }

    @property
    def received(self) -> list[Received]:
        """Every notification request so far, in arrival order."""
        with self._server.lock:
            return list(self._server.received)

    @property
    def provider_tokens(self) -> set[str]:
        """The distinct provider tokens (JWTs) the peer has been shown."""
        return {r.jwt for r in self.received if r.jwt}

    @property
    def connections(self) -> int:
        """How many connections clients opened."""
        return self._server.connections

    def answer(self, token: str, status: int, reason: str | None = None, **extra: Any) -> None:
        """Answer every later request for device ``token`` with ``status`` and ``reason``
        (``timestamp=`` goes in the JSON body, ``retry_after=`` in the Retry-After header)."""
        self._server.answers[token] = _Answer(status, reason, extra)

    def goaway(self) -> None:
        """Retire every open connection (GOAWAY, then close), as Apple does now and then."""

        async def close_all() -> None:
            for proto in list(self._server.live):
                proto.goaway()

        self._thread.run(close_all())

    def expire_tokens(self) -> None:
        """Treat every provider token seen so far as older than an hour."""
        with self._server.lock:
            self._server.expired.update(self._server.verified)

    def clear(self) -> None:
        """Forget what was received and every commanded answer."""
        with self._server.lock:
            self._server.received.clear()
            self._server.answers.clear()

    def stop(self) -> None:
        self._thread.loop.call_soon_threadsafe(self._listener.close)
        self._thread.stop()


def start(tmp: Path) -> ApnsPeer:
    """Start an APNs peer whose key, certificate and CA live in ``tmp``."""
    return ApnsPeer(tmp)


if __name__ == "__main__":
    # Standalone (benchmarks: the peer on its own CPU): ``python -m tests.peers.apns DIR
    # [LOG]``; with LOG every request is appended there as a JSON line (time.monotonic() is
    # the machine's CLOCK_MONOTONIC, comparable across processes).
    peer = start(Path(sys.argv[1]))
    if len(sys.argv) > 2:
        peer._server.log = open(sys.argv[2], "a", buffering=1)  # noqa: SIM115
    print(json.dumps(peer.env), flush=True)  # noqa: T201
    sys.stdin.read()  # serve until the parent closes our stdin
    print(json.dumps({"received": len(peer.received)}), flush=True)  # noqa: T201
    peer.stop()
