"""Apple Push Notification service: the HTTP/2 provider API with token (ES256 JWT) auth.

Our own small HTTP/2 client (:mod:`services.dispatch.channels.h2client`) rather than ``httpx``
or ``aioapns``: against the loopback peer it costs about 140 µs of CPU per push, aioapns 450 and
httpx 1,800 (``python -m bench.push --compare``), and aioapns signs a token per connection.

One provider token per process, shared by every connection and renewed after 40 minutes:
Apple refuses a token older than an hour and answers 429 TooManyProviderTokenUpdates when a
team changes tokens more often than every 20 minutes (which a token per connection does).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from h2.exceptions import H2Error

from services.dispatch.channels.base import Outgoing, Provider, Result
from services.dispatch.channels.h2client import Connection, Unsent
from services.dispatch.channels.pushdata import (
    expires_epoch,
    push_data,
    rfc3339_from_epoch,
)
from shared.settings import Settings

log = logging.getLogger(__name__)

MAX_PAYLOAD = 4096  # bytes, Apple's limit for alert notifications
TOKEN_RENEW_AFTER = 40 * 60.0  # seconds: inside Apple's 20–60 minute window
# A namespace for apns-id: the same (message, device) always gets the same id, so a retry
# is recognisable in Apple's console and in our attempts.
APNS_ID_NAMESPACE = uuid.UUID("6f1d7a2e-3b4c-5d6e-8f90-a1b2c3d4e5f6")
_ALERT_KEYS = ("sound", "badge", "category", "thread_id", "collapse_id")


class ProviderToken:
    """The process's one ES256 provider token, minted lazily and renewed on age or refusal."""

    def __init__(self, key: EllipticCurvePrivateKey, *, key_id: str, team_id: str) -> None:
        self._key, self._key_id, self._team_id = key, key_id, team_id
        self._value = ""
        self._issued = 0.0
        self.minted = 0  # how many tokens this process made (a test and a metric read it)

    def current(self) -> str:
        """The token to send now (a new one once the current is 40 minutes old)."""
        if not self._value or time.time() - self._issued >= TOKEN_RENEW_AFTER:
            self._mint()
        return self._value

    def renew(self, refused: str) -> str:
        """A new token after Apple refused ``refused`` as expired; concurrent sends that saw
        the same refusal share one renewal."""
        if refused == self._value:
            self._mint()
        return self._value

    def _mint(self) -> None:
        self._issued = time.time()
        self._value = jwt.encode(
            {"iss": self._team_id, "iat": int(self._issued)},
            self._key,
            algorithm="ES256",
            headers={"kid": self._key_id},
        )
        self.minted += 1


class ApnsProvider(Provider):
    """APNs over ``connections`` HTTP/2 connections sharing one provider token."""

    name = "apns"

    def __init__(
        self,
        *,
        url: str,
        key: EllipticCurvePrivateKey,
        key_id: str,
        team_id: str,
        topic: str,
        ca_file: Path | None = None,
        connections: int = 2,
        timeout: float = 10.0,
    ) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "api.push.apple.com"
        self._port = parts.port or 443
        self._authority = (
            self._host if self._port == 443 else f"{self._host}:{self._port}"
        ).encode()
        self._topic = topic.encode()
        self._ca_file = ca_file
        self._timeout = timeout
        self.token = ProviderToken(key, key_id=key_id, team_id=team_id)
        self._slots: list[Connection | None] = [None] * connections
        self._locks = [asyncio.Lock() for _ in range(connections)]
        self._next = 0
        self._ssl: ssl.SSLContext | None = None
        self._last_config_log = 0.0

    async def start(self) -> None:
        """Open every connection now (a failure is logged; sends reconnect)."""
        results = await asyncio.gather(
            *(self._connection(i) for i in range(len(self._slots))), return_exceptions=True
        )
        for res in results:
            if isinstance(res, BaseException):
                log.warning("APNs %s:%s unreachable at start: %s", self._host, self._port, res)
                break

    async def close(self) -> None:
        for conn in self._slots:
            if conn is not None:
                conn.close()
        self._slots = [None] * len(self._slots)

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=str(self._ca_file) if self._ca_file else None)
            ctx.set_alpn_protocols(["h2"])
            self._ssl = ctx
        return self._ssl

    async def _connection(self, index: int) -> Connection:
        conn = self._slots[index]
        if conn is not None and not conn.dead:
            return conn
        async with self._locks[index]:
            conn = self._slots[index]
            if conn is not None and not conn.dead:
                return conn
            loop = asyncio.get_running_loop()
            transport, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Connection(self._authority),
                    self._host,
                    self._port,
                    ssl=self._context(),
                    server_hostname=self._host,
                ),
                self._timeout,
            )
            sslobj = transport.get_extra_info("ssl_object")
            if sslobj is None or sslobj.selected_alpn_protocol() != "h2":
                transport.close()
                raise ConnectionError(f"{self._host}:{self._port} does not speak HTTP/2 (ALPN)")
            self._slots[index] = proto
            return proto

    async def _pick(self) -> Connection:
        # Round robin; a dead or missing connection is reopened when its turn comes.
        index = self._next
        self._next = (index + 1) % len(self._slots)
        conn = self._slots[index]
        if conn is not None and not conn.dead:
            return conn
        return await self._connection(index)

    def payload(self, out: Outgoing) -> dict[str, Any]:
        """The notification's JSON: ``aps`` (alert, sound, badge …) and our custom data."""
        content = out.request.content
        alert = {k: content[k] for k in ("title", "subtitle", "body") if content.get(k)}
        aps: dict[str, Any] = {"alert": alert}
        if content.get("sound"):
            aps["sound"] = content["sound"]
        if content.get("badge", "").isdigit():
            aps["badge"] = int(content["badge"])
        if content.get("category"):
            aps["category"] = content["category"]
        if content.get("thread_id"):
            aps["thread-id"] = content["thread_id"]
        if content.get("image"):
            aps["mutable-content"] = 1  # lets the app's extension fetch the image
        data = {k: v for k, v in push_data(out).items() if k not in _ALERT_KEYS}
        return {"aps": aps, **data}

    async def send(self, out: Outgoing) -> Result:
        """Send one alert to one iOS device and classify Apple's answer."""
        request, device = out.request, out.device
        if device is None or not device.token:
            return Result("failed", reason="NoDeviceToken")
        body = orjson.dumps(self.payload(out))
        if len(body) > MAX_PAYLOAD:
            return Result("failed", reason="PayloadTooLarge", answer={"size": len(body)})
        apns_id = str(uuid.uuid5(APNS_ID_NAMESPACE, f"{request.tracking_id}:{device.token}"))
        headers = [
            (b"apns-topic", self._topic),
            (b"apns-push-type", b"alert"),
            (b"apns-priority", b"10" if out.realtime else b"5"),
            (b"apns-expiration", str(expires_epoch(request.expires_at) or 0).encode()),
            (b"apns-id", apns_id.encode()),
        ]
        collapse = (request.content.get("collapse_id") or request.campaign_id).encode()
        if len(collapse) <= 64:  # Apple's limit; a longer id would be refused
            headers.append((b"apns-collapse-id", collapse))
        path = b"/3/device/" + device.token.encode()
        renewed = resent = False
        while True:
            token = self.token.current()
            try:
                conn = await self._pick()
                status, rheaders, rbody = await conn.request(
                    path,
                    [(b"authorization", b"bearer " + token.encode()), *headers],
                    body,
                    self._timeout,
                )
            except Unsent as exc:
                if resent:
                    return Result("retry", reason=f"Unsent: {exc}")
                resent = True  # on another (or a new) connection, at once
                continue
            except (OSError, TimeoutError, H2Error) as exc:
                return Result("retry", reason=f"{type(exc).__name__}: {exc}")
            if status == 200:
                return Result("sent", provider_id=apns_id, answer={"status": 200})
            reason, stamp = _reason(rbody)
            if status == 403 and reason == "ExpiredProviderToken" and not renewed:
                renewed = True
                self.token.renew(token)
                continue
            return self._classify(status, reason, stamp, rheaders)

    def _classify(
        self, status: int, reason: str, stamp: object, headers: dict[bytes, bytes]
    ) -> Result:
        answer: dict[str, Any] = {"status": status, "reason": reason}
        retry_after = _retry_after(headers)
        if status == 410 or (status == 400 and reason == "BadDeviceToken"):
            since = rfc3339_from_epoch(stamp) if stamp is not None else None
            return Result("token_invalid", reason=reason, token_invalid_since=since, answer=answer)
        if status == 403 and reason in ("InvalidProviderToken", "ExpiredProviderToken"):
            self._config_error(
                f"APNs refused the provider token ({reason}): check that KAIROS_APNS_KEY_FILE is "
                "the .p8 key whose id is KAIROS_APNS_KEY_ID, that KAIROS_APNS_TEAM_ID is the team "
                "that owns it, that the key has APNs enabled, and the host's clock"
            )
            if reason == "InvalidProviderToken":
                return Result("failed", reason=reason, answer=answer)
            # Still expired after a fresh token: the host's clock is off; try again later.
            return Result("retry", reason=reason, answer=answer)
        if status == 429:
            if reason == "TooManyProviderTokenUpdates":
                self._config_error(
                    "APNs: TooManyProviderTokenUpdates: another process signs tokens with the "
                    "same key too often; share one key per deployment or space renewals"
                )
            return Result(
                "retry", reason=reason, retry_after=retry_after, throttled=True, answer=answer
            )
        if status >= 500:
            return Result("retry", reason=reason, retry_after=retry_after, answer=answer)
        return Result("failed", reason=reason or f"HTTP {status}", answer=answer)

    def _config_error(self, message: str) -> None:
        # Once a minute: every send fails the same way, one actionable line is enough.
        now = time.monotonic()
        if now - self._last_config_log >= 60.0:
            self._last_config_log = now
            log.error(message)


def _reason(body: bytes) -> tuple[str, object]:
    try:
        doc = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        return body[:200].decode(errors="replace"), None
    if not isinstance(doc, dict):
        return "", None
    return str(doc.get("reason") or ""), doc.get("timestamp")


def _retry_after(headers: dict[bytes, bytes]) -> float | None:
    value = headers.get(b"retry-after")
    try:
        return float(value) if value else None
    except ValueError:
        return None  # an HTTP date: let dispatch back off


def from_settings(settings: Settings) -> ApnsProvider | None:
    """The APNs provider when KAIROS_APNS_URL is set (its key settings then required)."""
    if not settings.apns_url:
        return None
    missing = [
        f"KAIROS_APNS_{name.upper()}"
        for name in ("key_file", "key_id", "team_id", "topic")
        if not getattr(settings, f"apns_{name}")
    ]
    if missing:
        raise ValueError(f"KAIROS_APNS_URL is set but {', '.join(missing)} is not")
    assert settings.apns_key_file is not None
    assert settings.apns_key_id is not None
    assert settings.apns_team_id is not None
    assert settings.apns_topic is not None
    key = load_pem_private_key(settings.apns_key_file.read_bytes(), password=None)
    if not isinstance(key, EllipticCurvePrivateKey):
        raise ValueError(f"{settings.apns_key_file} is not an EC P-256 key (the APNs .p8 key)")
    return ApnsProvider(
        url=settings.apns_url,
        key=key,
        key_id=settings.apns_key_id,
        team_id=settings.apns_team_id,
        topic=settings.apns_topic,
        ca_file=settings.apns_ca_file,
        connections=settings.apns_connections,
    )
