"""Signed public links (click, open, unsubscribe, provider callbacks): compact, URL-safe,
unforgeable tokens that carry what the link needs, so serving it reads no database.

A token is ``base64url(payload) + "." + base64url(mac)``: the payload is a compact JSON array
``[kind, tracking_id, channel, url]`` and the MAC is HMAC-SHA256 over the payload with
``KAIROS_LINK_SECRET``, truncated to 16 bytes (128 bits: forging one is out of reach). The kind
is inside the MAC, so a click token is no unsubscribe token. Tokens do not expire (an e-mail
is read months later); rotating the secret retires every link (old secrets can be kept in
``KAIROS_LINK_SECRETS_PREVIOUS`` while mail in flight ages out).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from typing import Literal

import orjson

from shared.settings import Settings

Kind = Literal["t", "o", "u", "c"]  # click, open, unsubscribe, provider callback
KINDS: tuple[str, ...] = ("t", "o", "u", "c")
MAC_BYTES = 16
MAX_TOKEN = 4096


class InvalidLink(Exception):
    """A token that was forged, truncated, altered or made for another kind of link."""


@dataclass(frozen=True)
class Link:
    """What a verified token says."""

    kind: Kind
    tracking_id: str
    channel: str | None = None
    url: str | None = None


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class LinkSigner:
    """Makes and verifies link tokens; ``base_url`` is the public address of the gateway."""

    def __init__(self, secret: str, base_url: str, *, previous: tuple[str, ...] = ()) -> None:
        if not secret:
            raise ValueError("a link secret is required")
        self._keys = [s.encode() for s in (secret, *previous) if s]
        self.base_url = base_url.rstrip("/")

    def _mac(self, key: bytes, payload: bytes) -> bytes:
        return hmac.new(key, payload, hashlib.sha256).digest()[:MAC_BYTES]

    def token(
        self, kind: Kind, tracking_id: str, *, channel: str | None = None, url: str | None = None
    ) -> str:
        """A token for one link of one message."""
        if kind not in KINDS:
            raise ValueError(f"unknown link kind {kind!r}")
        payload = orjson.dumps([kind, tracking_id, channel, url])
        return _b64(payload) + "." + _b64(self._mac(self._keys[0], payload))

    def url(
        self, kind: Kind, tracking_id: str, *, channel: str | None = None, url: str | None = None
    ) -> str:
        """The public URL of a link: ``{base}/{kind}/{token}`` (``c`` → ``/callbacks/…``
        is built by the channel that needs it)."""
        return f"{self.base_url}/{kind}/{self.token(kind, tracking_id, channel=channel, url=url)}"

    def verify(self, kind: Kind, token: str) -> Link:
        """The link a token stands for; raises :class:`InvalidLink` for anything else."""
        if len(token) > MAX_TOKEN or token.count(".") != 1:
            raise InvalidLink("malformed token")
        body, mac = token.split(".")
        try:
            payload, given = _unb64(body), _unb64(mac)
        except (binascii.Error, ValueError) as exc:
            raise InvalidLink("malformed token") from exc
        if not any(hmac.compare_digest(self._mac(k, payload), given) for k in self._keys):
            raise InvalidLink("bad signature")
        try:
            k, tracking, channel, url = orjson.loads(payload)
        except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
            raise InvalidLink("malformed payload") from exc
        if k != kind or not isinstance(tracking, str) or not tracking:
            raise InvalidLink("token made for another link")
        return Link(kind, tracking, channel, url)


def signer_from(settings: Settings) -> LinkSigner:
    """The process's signer from its settings."""
    previous = tuple(s.strip() for s in settings.link_secrets_previous.split(",") if s.strip())
    return LinkSigner(settings.link_signer_secret(), settings.public_url, previous=previous)
