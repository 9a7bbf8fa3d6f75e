"""A Web Push service on loopback (HTTPS): hands out subscriptions bound to the application
server's VAPID key, verifies VAPID (RFC 8292), decrypts the aes128gcm body (RFC 8291) with the
subscription's private key and records the plaintext; answers on command per subscription."""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import http_ece
import jwt
import orjson
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.peers.base import LoopThread, make_tls

SUBJECT = "mailto:push-ops@kairos.test"
_TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_VAPID = re.compile(r"^vapid t=([^,\s]+),\s*k=([A-Za-z0-9_-]+)$")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Received:
    """One push message as the push service saw it: headers, decrypted JSON, the answer."""

    token: str  # the subscription JSON, as registered as the device token
    headers: dict[str, str]
    payload: dict[str, Any] | None  # the decrypted body, parsed
    status: int
    reason: str | None
    at: float  # time.monotonic() at receipt


@dataclass(frozen=True)
class _Subscription:
    json: str
    key: ec.EllipticCurvePrivateKey
    auth: bytes
    server_key: str  # the applicationServerKey it was created for (base64url)


class WebPushPeer:
    """A started push service: ``env`` gives dispatch the VAPID key, subject and CA."""

    def __init__(self, tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        vapid = ec.generate_private_key(ec.SECP256R1())
        self.vapid_key_file = tmp / "vapid.pem"
        self.vapid_key_file.write_bytes(
            vapid.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.application_server_key = _b64(
            vapid.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
        )
        self._lock = threading.Lock()
        self._subs: dict[str, _Subscription] = {}
        self._received: list[Received] = []
        self._answers: dict[str, tuple[int, str | None, dict[str, Any]]] = {}
        tls = make_tls(tmp / "tls")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
        self._thread = LoopThread("webpush-peer")
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_post("/push/{sub}", self._push)
        self._runner = web.AppRunner(app, access_log=None)

        async def serve() -> int:
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ctx)
            await site.start()
            return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

        self.origin = f"https://127.0.0.1:{self._thread.run(serve())}"
        self.env = {
            "KAIROS_WEBPUSH_VAPID_KEY_FILE": str(self.vapid_key_file),
            "KAIROS_WEBPUSH_VAPID_SUBJECT": SUBJECT,
            "KAIROS_WEBPUSH_CA_FILE": str(tls.ca_file),
        }

    def subscription(self, application_server_key: str | None = None) -> str:
        """A new subscription (JSON) as a browser would hand the site: register it as a
        ``web`` device's token. Bound to the VAPID key of ``env`` unless told another."""
        sub_id = uuid.uuid4().hex
        key = ec.generate_private_key(ec.SECP256R1())
        auth = os.urandom(16)
        doc = json.dumps(
            {
                "endpoint": f"{self.origin}/push/{sub_id}",
                "keys": {
                    "p256dh": _b64(
                        key.public_key().public_bytes(
                            serialization.Encoding.X962,
                            serialization.PublicFormat.UncompressedPoint,
                        )
                    ),
                    "auth": _b64(auth),
                },
            }
        )
        server_key = application_server_key or self.application_server_key
        with self._lock:
            self._subs[sub_id] = _Subscription(doc, key, auth, server_key)
        return doc

    def _sub_id(self, token: str) -> str:
        endpoint = json.loads(token)["endpoint"] if token.startswith("{") else token
        return str(endpoint).rsplit("/", 1)[-1]

    async def _push(self, request: web.Request) -> web.Response:
        body = await request.read()
        sub = self._subs.get(request.match_info["sub"])
        if sub is None:
            return web.Response(status=404, text="no such subscription")
        status, reason, payload = self._judge(request, body, sub)
        extra: dict[str, Any] = {}
        if status == 201:
            commanded = self._answers.get(request.match_info["sub"])
            if commanded is not None:
                status, reason, extra = commanded
        with self._lock:
            self._received.append(
                Received(sub.json, dict(request.headers), payload, status, reason, time.monotonic())
            )
        headers = {}
        if status == 201:
            headers["Location"] = f"{self.origin}/m/{uuid.uuid4().hex}"
        if extra.get("retry_after") is not None:
            headers["Retry-After"] = str(extra["retry_after"])
        return web.Response(status=status, text=reason or "", headers=headers)

    def _judge(
        self, request: web.Request, body: bytes, sub: _Subscription
    ) -> tuple[int, str | None, dict[str, Any] | None]:
        """(status, reason, decrypted payload) as a push service would answer."""
        match = _VAPID.match(request.headers.get("Authorization", ""))
        if match is None:
            return 401, "missing or malformed VAPID authorization", None
        token, k = match.groups()
        if k != sub.server_key:
            return 403, "VAPID key differs from the subscription's applicationServerKey", None
        try:
            public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), _unb64(k))
            claims = jwt.decode(
                token,
                public,
                algorithms=["ES256"],
                audience=self.origin,
                options={"require": ["exp", "aud", "sub"]},
            )
        except (jwt.PyJWTError, ValueError) as exc:
            return 401, f"VAPID token invalid: {exc}", None
        if claims["exp"] > time.time() + 86_400:
            return 401, "VAPID exp more than 24 hours ahead", None
        if not str(claims["sub"]).startswith(("mailto:", "https:")):
            return 401, "VAPID sub is neither mailto: nor https:", None
        ttl = request.headers.get("TTL", "")
        if not ttl.isdigit():
            return 400, "TTL header missing", None
        if request.headers.get("Urgency", "normal") not in ("very-low", "low", "normal", "high"):
            return 400, "bad Urgency", None
        topic = request.headers.get("Topic")
        if topic is not None and not _TOPIC.match(topic):
            return 400, "bad Topic", None
        if request.headers.get("Content-Encoding") != "aes128gcm":
            return 400, "Content-Encoding must be aes128gcm", None
        if len(body) > 4096:
            return 413, "payload too large", None
        try:
            plaintext = http_ece.decrypt(
                body, private_key=sub.key, auth_secret=sub.auth, version="aes128gcm"
            )
            payload = orjson.loads(plaintext)
        except Exception as exc:  # any decryption or parse failure is the sender's fault
            return 400, f"cannot decrypt: {exc}", None
        return 201, None, payload

    @property
    def received(self) -> list[Received]:
        """Every push message so far, in arrival order."""
        with self._lock:
            return list(self._received)

    def answer(self, token: str, status: int, reason: str | None = None, **extra: Any) -> None:
        """Answer later valid messages to subscription ``token`` (its JSON or endpoint) with
        ``status`` (``retry_after=`` sets Retry-After)."""
        self._answers[self._sub_id(token)] = (status, reason, extra)

    def clear(self) -> None:
        """Forget what was received and every commanded answer."""
        with self._lock:
            self._received.clear()
            self._answers.clear()

    def stop(self) -> None:
        self._thread.run(self._runner.cleanup())
        self._thread.stop()


def start(tmp: Path) -> WebPushPeer:
    """Start a Web Push service whose VAPID key and certificate live in ``tmp``."""
    return WebPushPeer(tmp)


if __name__ == "__main__":
    peer = start(Path(sys.argv[1]))
    print(json.dumps(peer.env), flush=True)  # noqa: T201
    sys.stdin.read()
    peer.stop()
