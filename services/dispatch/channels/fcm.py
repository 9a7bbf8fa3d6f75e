"""Firebase Cloud Messaging, HTTP v1 API: OAuth2 bearer tokens from the service account
(JWT-bearer grant), one ``messages:send`` per device, FCM's error codes classified."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

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

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
RENEW_BEFORE = 300.0  # seconds before expiry: no send races an expiring token
DEFAULT_TTL = 28 * 86_400  # FCM's own maximum, when the message has no expiry
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_CONFIG_ERRORS = {
    "SENDER_ID_MISMATCH": "the device token belongs to another Firebase project than "
    "KAIROS_FCM_CREDENTIALS_FILE's project_id",
    "THIRD_PARTY_AUTH_ERROR": "the APNs certificate or key uploaded to Firebase is invalid or "
    "missing (Firebase console → Cloud Messaging)",
    "UNAUTHENTICATED": "the service account cannot send: check KAIROS_FCM_CREDENTIALS_FILE and "
    "that the account has the Firebase Cloud Messaging API Admin role",
    "PERMISSION_DENIED": "the service account cannot send: give it the Firebase Cloud "
    "Messaging API Admin role and enable the FCM API in the project",
}


class CredentialsError(Exception):
    """The token endpoint refused the service account (a configuration error)."""


class AccessToken:
    """The OAuth2 access token of the service account: cached, renewed before it expires,
    one request in flight however many sends wait for it."""

    def __init__(self, credentials: dict[str, Any], key: RSAPrivateKey) -> None:
        self._email = str(credentials["client_email"])
        self._key_id = credentials.get("private_key_id")
        self._uri = str(credentials["token_uri"])
        self._key = key
        self._value = ""
        self._expires = 0.0
        self._lock = asyncio.Lock()
        self.fetched = 0  # tokens obtained (a test and a metric read it)

    async def get(self, session: aiohttp.ClientSession) -> str:
        """A token valid for at least a few more minutes."""
        if self._value and time.time() < self._expires - RENEW_BEFORE:
            return self._value
        async with self._lock:
            if not self._value or time.time() >= self._expires - RENEW_BEFORE:
                await self._fetch(session)
            return self._value

    async def refresh(self, session: aiohttp.ClientSession, refused: str) -> str:
        """A new token after FCM answered 401 to ``refused`` (once for concurrent sends)."""
        async with self._lock:
            if self._value == refused:
                await self._fetch(session)
            return self._value

    async def _fetch(self, session: aiohttp.ClientSession) -> None:
        now = int(time.time())
        assertion = jwt.encode(
            {"iss": self._email, "scope": SCOPE, "aud": self._uri, "iat": now, "exp": now + 3600},
            self._key,
            algorithm="RS256",
            headers={"kid": self._key_id} if self._key_id else None,
        )
        async with session.post(
            self._uri, data={"grant_type": GRANT, "assertion": assertion}
        ) as resp:
            raw = await resp.read()
            if 400 <= resp.status < 500:
                raise CredentialsError(
                    f"the token endpoint {self._uri} refused {self._email}: "
                    f"{resp.status} {raw[:200].decode(errors='replace')}"
                )
            resp.raise_for_status()
        doc = orjson.loads(raw)
        self._value = str(doc["access_token"])
        self._expires = time.time() + float(doc.get("expires_in", 3600))
        self.fetched += 1


class FcmProvider(Provider):
    """FCM HTTP v1 for Android devices."""

    name = "fcm"

    def __init__(
        self,
        *,
        url: str,
        credentials: dict[str, Any],
        key: RSAPrivateKey,
        ca_file: Path | None = None,
        connections: int = 64,
        timeout: float = 10.0,
    ) -> None:
        self._send_url = f"{url.rstrip('/')}/v1/projects/{credentials['project_id']}/messages:send"
        self.token = AccessToken(credentials, key)
        self._ca_file = ca_file
        self._connections = connections
        self._timeout = timeout
        self._pools = LanePools(self._new_pool)
        self._last_config_log = 0.0

    async def start(self) -> None:
        self._pools.open()

    async def close(self) -> None:
        await self._pools.close()

    def _new_pool(self) -> aiohttp.ClientSession:
        return provider_pool(
            self._connections,
            self._timeout,
            self._ca_file,
            json_serialize=lambda o: orjson.dumps(o).decode(),
        )

    def message(self, out: Outgoing) -> dict[str, Any]:
        """The ``message`` object of ``messages:send`` for one device."""
        assert out.device is not None
        content = out.request.content
        notification = {k: content[k] for k in ("title", "body") if content.get(k)}
        if content.get("image"):
            notification["image"] = content["image"]
        android: dict[str, Any] = {
            "priority": "HIGH" if out.realtime else "NORMAL",
            "ttl": f"{ttl_seconds(out.request.expires_at, default=DEFAULT_TTL)}s",
            "collapse_key": content.get("collapse_id") or out.request.campaign_id,
        }
        return {
            "token": out.device.token,
            "notification": notification,
            "data": push_data(out),
            "android": android,
        }

    async def send(self, out: Outgoing) -> Result:
        """Send one notification to one Android device and classify FCM's answer."""
        if out.device is None or not out.device.token:
            return Result("failed", reason="NoDeviceToken")
        session = self._pools.get(out.realtime)
        body = orjson.dumps({"message": self.message(out)})
        refreshed = False
        while True:
            try:
                token = await self.token.get(session)
                async with session.post(
                    self._send_url,
                    data=body,
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Content-Type": "application/json",
                    },
                ) as resp:
                    status, raw = resp.status, await resp.read()
                    retry_after = _seconds(resp.headers.get("Retry-After"))
            except CredentialsError as exc:
                self._config_error(f"FCM: {exc}")
                return Result("failed", reason="CredentialsRefused")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                return Result("retry", reason=f"{type(exc).__name__}: {exc}")
            if status == 200:
                name = _json(raw).get("name")
                return Result("sent", provider_id=name, answer={"status": 200})
            code, message = _error(raw)
            if status == 401 and code != "THIRD_PARTY_AUTH_ERROR" and not refreshed:
                refreshed = True
                try:
                    await self.token.refresh(session, token)
                except (aiohttp.ClientError, OSError, TimeoutError, CredentialsError) as exc:
                    return Result("retry", reason=f"token refresh: {exc}")
                continue
            return self._classify(status, code, message, retry_after)

    def _classify(self, status: int, code: str, message: str, retry_after: float | None) -> Result:
        answer = {"status": status, "code": code, "message": message[:300]}
        if code == "UNREGISTERED" or status == 404:
            return Result("token_invalid", reason=code or "UNREGISTERED", answer=answer)
        if code == "QUOTA_EXCEEDED" or status == 429:
            return Result(
                "retry", reason=code, retry_after=retry_after, throttled=True, answer=answer
            )
        if code in ("UNAVAILABLE", "INTERNAL") or status >= 500:
            return Result("retry", reason=code, retry_after=retry_after, answer=answer)
        if code in _CONFIG_ERRORS or status in (401, 403):
            self._config_error(f"FCM {code or status}: {_CONFIG_ERRORS.get(code, message)}")
        return Result("failed", reason=code or f"HTTP {status}", answer=answer)

    def _config_error(self, message: str) -> None:
        # Once a minute: every send fails the same way, one actionable line is enough.
        now = time.monotonic()
        if now - self._last_config_log >= 60.0:
            self._last_config_log = now
            log.error(message)


def _json(raw: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _error(raw: bytes) -> tuple[str, str]:
    """(FCM error code, message): the FcmError detail's errorCode, else the canonical status."""
    err = _json(raw).get("error")
    if not isinstance(err, dict):
        return "", raw[:300].decode(errors="replace")
    for detail in err.get("details") or []:
        if isinstance(detail, dict) and detail.get("@type") == FCM_ERROR:
            return str(detail.get("errorCode") or ""), str(err.get("message") or "")
    return str(err.get("status") or ""), str(err.get("message") or "")


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None  # an HTTP date: let dispatch back off


def from_settings(settings: Settings) -> FcmProvider | None:
    """The FCM provider when KAIROS_FCM_URL is set (the credentials file then required)."""
    if not settings.fcm_url:
        return None
    if not settings.fcm_credentials_file:
        raise ValueError("KAIROS_FCM_URL is set but KAIROS_FCM_CREDENTIALS_FILE is not")
    credentials = orjson.loads(settings.fcm_credentials_file.read_bytes())
    missing = [
        k
        for k in ("client_email", "private_key", "token_uri", "project_id")
        if not credentials.get(k)
    ]
    if missing:
        raise ValueError(f"{settings.fcm_credentials_file} lacks {', '.join(missing)}")
    key = load_pem_private_key(credentials["private_key"].encode(), password=None)
    if not isinstance(key, RSAPrivateKey):
        raise ValueError(f"{settings.fcm_credentials_file}: private_key is not an RSA key")
    return FcmProvider(
        url=settings.fcm_url,
        credentials=credentials,
        key=key,
        ca_file=settings.fcm_ca_file,
    )
