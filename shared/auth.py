"""API keys and scopes for the public gateway."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import orjson
from fastapi import Request
from pydantic import BaseModel, Field, TypeAdapter

from shared.errors import Forbidden, Unauthorized
from shared.settings import Settings

log = logging.getLogger("kairos.auth")

SCOPES = frozenset(
    {
        "events:write",
        "decisions:write",
        "responses:write",
        "inbox:read",
        "customers:read",
        "customers:write",
        "catalog:write",
        "campaigns:approve",
        "reports:read",
        "channels:inbound",
        "admin",
    }
)


class ApiKeyConfig(BaseModel):
    """One configured key: ``{"name": "pos-berlin", "key": "…", "scopes": [...]}``."""

    name: str = Field(min_length=1, max_length=100)
    key: str = Field(min_length=16)
    scopes: list[str]


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's name and its scopes (never the key itself)."""

    name: str
    scopes: frozenset[str]

    def can(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


class KeyRing:
    """Holds SHA-256 digests of the keys and checks a presented key in constant time."""

    def __init__(self, keys: list[ApiKeyConfig]) -> None:
        for k in keys:
            unknown = set(k.scopes) - SCOPES
            if unknown:
                raise ValueError(f"API key {k.name!r} has unknown scopes: {sorted(unknown)}")
        self._entries = [
            (hashlib.sha256(k.key.encode()).digest(), Principal(k.name, frozenset(k.scopes)))
            for k in keys
        ]

    def authenticate(self, presented: str) -> Principal | None:
        digest = hashlib.sha256(presented.encode()).digest()
        found: Principal | None = None
        for candidate, principal in self._entries:  # no early exit: same time for every key
            if hmac.compare_digest(candidate, digest):
                found = principal
        return found


def dev_key_path(settings: Settings) -> Path:
    return settings.run_dir / "api-key"


def load_keyring(settings: Settings) -> KeyRing:
    """Keys from KAIROS_API_KEYS; in dev without it, one generated admin key in .run/api-key."""
    if settings.api_keys:
        keys = TypeAdapter(list[ApiKeyConfig]).validate_python(orjson.loads(settings.api_keys))
        return KeyRing(keys)
    path = dev_key_path(settings)
    if path.exists():
        key = path.read_text().strip()
    else:
        key = "kairos_dev_" + secrets.token_urlsafe(24)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(key + "\n")
        path.chmod(0o600)
    log.warning("development API key (admin) is in %s", path)
    return KeyRing([ApiKeyConfig(name="dev-admin", key=key, scopes=["admin"])])


class RequireScope:
    """Dependency: the caller's principal, if its key carries one of ``scopes``. A class so the
    OpenAPI document can read which scopes an operation needs (``gateway.openapi``)."""

    def __init__(self, scopes: tuple[str, ...]) -> None:
        self.scopes = scopes

    async def __call__(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("Send an API key as 'Authorization: Bearer <key>'.")
        ring: KeyRing = request.app.state.keyring
        principal = ring.authenticate(token.strip())
        if principal is None:
            raise Unauthorized("The API key is not known.")
        request.state.principal = principal.name
        if not any(principal.can(s) for s in self.scopes):
            wanted = "' or '".join(self.scopes)
            raise Forbidden(f"The key '{principal.name}' lacks the scope '{wanted}'.")
        return principal


def require(scope: str, *alternatives: str) -> RequireScope:
    """Dependency: the caller's principal, if its key carries ``scope`` (or an alternative)."""
    return RequireScope((scope, *alternatives))
