"""The bonus system's webhook: one signed POST per grant or revoke, classified.

The body is signed like Stripe's webhooks: ``Kairos-Signature: t=<unix>,v1=<hex>`` where the
hex is HMAC-SHA256 with ``KAIROS_REWARDS_SECRET`` over ``"<t>." + body``; the receiver checks
the MAC and that ``t`` is recent, so a captured request cannot be replayed later. The
``Idempotency-Key`` is stable per tracking id and action, so a retry after a timeout (the
grant may have been booked) is answered from the receiver's memory instead of booked twice.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import orjson

from shared.settings import Settings

log = logging.getLogger("kairos.dispatch.rewards")

Action = Literal["grant", "revoke"]
Outcome = Literal["ok", "transient", "permanent"]


@dataclass(frozen=True)
class Answer:
    """What the bonus system answered: ok (2xx), transient (5xx, 429, timeouts), permanent."""

    outcome: Outcome
    status: int | None
    detail: str

    def record(self, action: Action, at: str) -> dict[str, Any]:
        """The answer as one entry of the reward's ``attempts`` (stored)."""
        return {"time": at, "action": action, "status": self.status, "answer": self.detail}


def signature(secret: str, body: bytes, t: int) -> str:
    """The ``Kairos-Signature`` header value for ``body`` sent at unix time ``t``."""
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def grant_id(tracking_id: str) -> str:
    """The grant's id: stable per tracking id, so a redelivered response grants nothing new."""
    return "rwd_" + hashlib.sha256(f"kairos-reward:{tracking_id}".encode()).hexdigest()[:24]


def idempotency_key(grant: str, action: Action) -> str:
    """One key per grant and action (the revoke of a grant is a request of its own)."""
    return grant if action == "grant" else f"{grant}-revoke"


class RewardsClient:
    """POSTs signed grant and revoke requests to ``KAIROS_REWARDS_URL``."""

    def __init__(self, url: str, secret: str, *, timeout: float = 10.0) -> None:
        self.url = url
        self.secret = secret
        self._http = httpx.AsyncClient(timeout=timeout)

    async def close(self) -> None:
        await self._http.aclose()

    async def call(self, payload: dict[str, Any]) -> Answer:
        """Send one request (``payload["action"]`` is grant or revoke) and classify the answer."""
        body = orjson.dumps(payload)
        headers = {
            "content-type": "application/json",
            "Kairos-Signature": signature(self.secret, body, int(time.time())),
            "Idempotency-Key": idempotency_key(payload["grant_id"], payload["action"]),
        }
        try:
            resp = await self._http.post(self.url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            return Answer("transient", None, f"timeout: {type(exc).__name__}")
        except httpx.HTTPError as exc:
            return Answer("transient", None, f"unreachable: {type(exc).__name__} {exc}"[:300])
        detail = resp.text[:300]
        if resp.is_success:
            return Answer("ok", resp.status_code, detail)
        if resp.status_code in (408, 425, 429) or resp.status_code >= 500:
            return Answer("transient", resp.status_code, detail)
        if resp.status_code in (401, 403):
            log.error(
                "the rewards webhook %s refused our signature (%s): KAIROS_REWARDS_SECRET "
                "must be the secret the bonus system was given",
                self.url,
                resp.status_code,
            )
        return Answer("permanent", resp.status_code, detail)


def from_settings(settings: Settings) -> RewardsClient | None:
    """The webhook client when ``KAIROS_REWARDS_URL`` and its secret are set, else None."""
    if not settings.rewards_url:
        return None
    if not settings.rewards_secret:
        raise ValueError("KAIROS_REWARDS_URL is set but KAIROS_REWARDS_SECRET is missing")
    return RewardsClient(settings.rewards_url, settings.rewards_secret)
