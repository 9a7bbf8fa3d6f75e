"""An FCM HTTP v1 peer on loopback: the OAuth2 token endpoint of a generated service account
(JWT-bearer grant, RS256 assertion verified) and ``messages:send`` checking the bearer token
and answering FCM's error JSON on command per device token.

``python -m tests.peers.fcm DIR`` serves one in its own process and prints its settings.
"""

from __future__ import annotations

import json
import re
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.peers.base import LoopThread

PROJECT = "kairos-test"
EMAIL = "kairos-dispatch@kairos-test.iam.gserviceaccount.com"
SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_TTL = re.compile(r"^\d+(\.\d{1,9})?s$")
# FCM's HTTP status → the canonical status in its error JSON.
_CANONICAL = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


@dataclass(frozen=True)
class Received:
    """One ``messages:send`` as the peer saw it, and what it answered."""

    token: str
    headers: dict[str, str]
    payload: dict[str, Any]
    status: int
    reason: str | None
    at: float  # time.monotonic() at receipt


@dataclass(frozen=True)
class _Answer:
    status: int
    reason: str | None
    extra: dict[str, Any]


def _error(status: int, code: str | None, message: str) -> web.Response:
    err: dict[str, Any] = {
        "code": status,
        "message": message,
        "status": _CANONICAL.get(status, "UNKNOWN"),
    }
    if code:
        err["details"] = [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}
        ]
    return web.Response(
        status=status, body=orjson.dumps({"error": err}), content_type="application/json"
    )


class FcmPeer:
    """A started FCM peer: ``env`` points dispatch at it (URL and credentials file)."""

    def __init__(self, tmp: Path, *, expires_in: int = 3600) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._public = key.public_key()
        self.expires_in = expires_in
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._answers: dict[str, _Answer] = {}
        self._tokens: dict[str, float] = {}  # access token → expiry (time.time())
        self.token_requests = 0
        self._thread = LoopThread("fcm-peer")
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post("/v1/projects/{project}/messages:send", self._send)
        self._runner = web.AppRunner(app, access_log=None)

        async def serve() -> int:
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0, backlog=256)
            await site.start()
            return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

        port = self._thread.run(serve())
        self.url = f"http://127.0.0.1:{port}"
        self.token_uri = f"{self.url}/token"
        self.credentials_file = tmp / "service-account.json"
        self.credentials_file.write_text(
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": PROJECT,
                    "private_key_id": uuid.uuid4().hex,
                    "private_key": key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ).decode(),
                    "client_email": EMAIL,
                    "token_uri": self.token_uri,
                }
            )
        )
        self.env = {
            "KAIROS_FCM_URL": self.url,
            "KAIROS_FCM_CREDENTIALS_FILE": str(self.credentials_file),
        }

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        with self._lock:
            self.token_requests += 1
        if form.get("grant_type") != GRANT:
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        try:
            claims = jwt.decode(
                str(form.get("assertion", "")),
                self._public,
                algorithms=["RS256"],
                audience=self.token_uri,
                issuer=EMAIL,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.PyJWTError as exc:
            return web.json_response(
                {"error": "invalid_grant", "error_description": str(exc)}, status=400
            )
        if (
            SCOPE not in str(claims.get("scope", "")).split()
            or claims["exp"] - claims["iat"] > 3600
        ):
            return web.json_response({"error": "invalid_scope"}, status=400)
        value = "ya29." + secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[value] = time.time() + self.expires_in
        return web.json_response(
            {"access_token": value, "expires_in": self.expires_in, "token_type": "Bearer"}
        )

    async def _send(self, request: web.Request) -> web.Response:
        raw = await request.read()
        auth = request.headers.get("Authorization", "")
        expiry = self._tokens.get(auth[7:]) if auth.startswith("Bearer ") else None
        if expiry is None or expiry < time.time():
            return _error(401, None, "Request had invalid authentication credentials.")
        if request.match_info["project"] != PROJECT:
            return _error(403, "SENDER_ID_MISMATCH", "SenderId mismatch")
        try:
            message = orjson.loads(raw)["message"]
            token = str(message["token"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        status, reason, extra = self._judge(message)
        with self._lock:
            self._received.append(
                Received(
                    token=token,
                    headers=dict(request.headers),
                    payload=message,
                    status=status,
                    reason=reason,
                    at=time.monotonic(),
                )
            )
        if status == 200:
            name = f"projects/{PROJECT}/messages/{uuid.uuid4().hex}"
            return web.Response(body=orjson.dumps({"name": name}), content_type="application/json")
        response = _error(status, reason, reason or "error")
        if extra.get("retry_after") is not None:
            response.headers["Retry-After"] = str(extra["retry_after"])
        return response

    def _judge(self, message: dict[str, Any]) -> tuple[int, str | None, dict[str, Any]]:
        android = message.get("android") or {}
        bad = (
            android.get("priority", "NORMAL") not in ("HIGH", "NORMAL")
            or not _TTL.match(str(android.get("ttl", "0s")))
            or any(not isinstance(v, str) for v in (message.get("data") or {}).values())
        )
        if bad:
            return 400, "INVALID_ARGUMENT", {}
        commanded = self._answers.get(str(message["token"]))
        if commanded is not None:
            return commanded.status, commanded.reason, commanded.extra
        return 200, None, {}

    @property
    def received(self) -> list[Received]:
        """Every accepted-for-judgement send so far, in arrival order."""
        with self._lock:
            return list(self._received)

    def answer(self, token: str, status: int, reason: str | None = None, **extra: Any) -> None:
        """Answer later sends to ``token`` with ``status`` and FCM error code ``reason``
        (``retry_after=`` sets the Retry-After header)."""
        self._answers[token] = _Answer(status, reason, extra)

    def revoke_tokens(self) -> None:
        """Make every access token issued so far invalid (FCM then answers 401)."""
        with self._lock:
            self._tokens.clear()

    def clear(self) -> None:
        """Forget what was received and every commanded answer."""
        with self._lock:
            self._received.clear()
            self._answers.clear()

    def stop(self) -> None:
        self._thread.run(self._runner.cleanup())
        self._thread.stop()


def start(tmp: Path) -> FcmPeer:
    """Start an FCM peer whose service-account file lives in ``tmp``."""
    return FcmPeer(tmp)


if __name__ == "__main__":
    peer = start(Path(sys.argv[1]))
    print(json.dumps(peer.env), flush=True)  # noqa: T201
    sys.stdin.read()  # serve until the parent closes our stdin
    print(json.dumps({"received": len(peer.received)}), flush=True)  # noqa: T201
    peer.stop()
