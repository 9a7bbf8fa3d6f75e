"""Web Push (RFC 8030) to browsers' push services: the payload encrypted for the subscription
(RFC 8291, aes128gcm), the application server identified by VAPID (RFC 8292)."""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import http_ece
import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)

from services.dispatch.channels.base import (
    LanePools,
    Outgoing,
    Provider,
    Result,
    provider_pool,
)
from services.dispatch.channels.pushdata import push_data, ttl_seconds
from shared.settings import Settings

log = logging.getLogger(__name__)

VAPID_LIFETIME = 12 * 3600  # seconds; RFC 8292 allows at most 24 h
VAPID_RENEW_BEFORE = 3600.0
DEFAULT_TTL = 28 * 86_400
MAX_BODY = 4096  # push services must accept at least this much (RFC 8030 §7.2)


def b64url(raw: bytes) -> str:
    """Unpadded base64url, the encoding of every key in Web Push."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    """Decode base64url with or without padding."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class BadSubscription(ValueError):
    """A device token that is not a Web Push subscription."""


def parse_subscription(token: str) -> tuple[str, bytes, bytes]:
    """(endpoint, p256dh public key, auth secret) of a subscription JSON."""
    try:
        sub = orjson.loads(token)
        endpoint, keys = str(sub["endpoint"]), sub["keys"]
        p256dh, auth = unb64url(keys["p256dh"]), unb64url(keys["auth"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BadSubscription(f"not a Web Push subscription: {exc}") from exc
    if urlsplit(endpoint).scheme not in ("https", "http") or len(p256dh) != 65 or len(auth) < 16:
        raise BadSubscription("subscription endpoint or keys malformed")
    return endpoint, p256dh, auth


class WebPushProvider(Provider):
    """Web Push for ``web`` devices, one HTTP client for every push service."""

    name = "webpush"

    def __init__(
        self,
        *,
        vapid_key: ec.EllipticCurvePrivateKey,
        subject: str,
        ca_file: Path | None = None,
        connections: int = 64,
        timeout: float = 10.0,
    ) -> None:
        self._key = vapid_key
        self._subject = subject
        self.public_key = b64url(
            vapid_key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
        )
        self._ca_file = ca_file
        self._connections = connections
        self._timeout = timeout
        self._pools = LanePools(self._new_pool)
        self._vapid: dict[str, tuple[str, float]] = {}  # audience → (header, renew at)

    async def start(self) -> None:
        self._pools.open()

    async def close(self) -> None:
        await self._pools.close()

    def _new_pool(self) -> aiohttp.ClientSession:
        return provider_pool(self._connections, self._timeout, self._ca_file)

    def authorization(self, endpoint: str) -> str:
        """The VAPID ``Authorization`` header for a push service (one JWT per origin, reused
        for hours: signing one per message would cost more than encrypting it)."""
        parts = urlsplit(endpoint)
        audience = f"{parts.scheme}://{parts.netloc}"
        cached = self._vapid.get(audience)
        now = time.time()
        if cached is not None and now < cached[1]:
            return cached[0]
        exp = int(now) + VAPID_LIFETIME
        token = jwt.encode(
            {"aud": audience, "exp": exp, "sub": self._subject}, self._key, algorithm="ES256"
        )
        header = f"vapid t={token}, k={self.public_key}"
        self._vapid[audience] = (header, exp - VAPID_RENEW_BEFORE)
        return header

    def notification(self, out: Outgoing) -> dict[str, Any]:
        """The JSON the service worker receives: visible text and our custom data."""
        content = out.request.content
        doc: dict[str, Any] = {k: content[k] for k in ("title", "body") if content.get(k)}
        doc["data"] = push_data(out)
        return doc

    async def send(self, out: Outgoing) -> Result:
        """Encrypt and post one notification to one subscription; classify the answer."""
        if out.device is None:
            return Result("failed", reason="NoDeviceToken")
        try:
            endpoint, p256dh, auth = parse_subscription(out.device.token)
        except BadSubscription as exc:
            return Result("token_invalid", reason=str(exc))
        plaintext = orjson.dumps(self.notification(out))
        # A fresh sender key per message, as RFC 8291 requires.
        body = http_ece.encrypt(
            plaintext,
            private_key=ec.generate_private_key(ec.SECP256R1()),
            dh=p256dh,
            auth_secret=auth,
            version="aes128gcm",
        )
        if len(body) > MAX_BODY:
            return Result("failed", reason="PayloadTooLarge", answer={"size": len(body)})
        request = out.request
        headers = {
            "TTL": str(ttl_seconds(request.expires_at, default=DEFAULT_TTL)),
            "Urgency": "high" if out.realtime else "normal",
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Authorization": self.authorization(endpoint),
        }
        collapse = request.content.get("collapse_id") or request.campaign_id
        # Topic: at most 32 base64url characters, so a digest of the collapse key.
        headers["Topic"] = b64url(hashlib.sha256(collapse.encode()).digest()[:24])
        try:
            async with self._pools.get(out.realtime).post(
                endpoint, data=body, headers=headers
            ) as resp:
                status = resp.status
                text = (await resp.read())[:300].decode(errors="replace")
                location = resp.headers.get("Location")
                retry_after = _seconds(resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return Result("retry", reason=f"{type(exc).__name__}: {exc}")
        answer = {"status": status, "body": text}
        if status in (200, 201, 202):
            return Result("sent", provider_id=location, answer=answer)
        if status in (404, 410):
            return Result("token_invalid", reason=f"HTTP {status}", answer=answer)
        if status == 429 or status >= 500:
            # Not throttled: a 429 from one browser's push service says nothing of the others.
            return Result("retry", reason=f"HTTP {status}", retry_after=retry_after, answer=answer)
        if status in (401, 403):
            log.error(
                "Web Push %s refused our VAPID identification (%s %s): check "
                "KAIROS_WEBPUSH_VAPID_KEY_FILE is the key whose public half the site gave "
                "browsers as applicationServerKey, and KAIROS_WEBPUSH_VAPID_SUBJECT",
                urlsplit(endpoint).netloc,
                status,
                text,
            )
        return Result("failed", reason=f"HTTP {status}", answer=answer)


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def from_settings(settings: Settings) -> WebPushProvider | None:
    """The Web Push provider when KAIROS_WEBPUSH_VAPID_KEY_FILE is set."""
    if not settings.webpush_vapid_key_file:
        return None
    key = load_pem_private_key(settings.webpush_vapid_key_file.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{settings.webpush_vapid_key_file} is not an EC P-256 key (VAPID)")
    return WebPushProvider(
        vapid_key=key, subject=settings.webpush_vapid_subject, ca_file=settings.webpush_ca_file
    )
