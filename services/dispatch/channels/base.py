"""The one interface every provider client implements, and what it answers.

Dispatch's sender hands a provider one :class:`Outgoing` (one message, and for push one device)
and gets one :class:`Result` back: the provider's answer already mapped to what dispatch does
next. Provider clients never touch the database or the bus; they own their connections,
credentials and protocol, and map every documented answer. An exception escaping ``send`` is
treated as a transient failure (retried with backoff), so a client raises only for what it
cannot classify.
"""

from __future__ import annotations

import ssl
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp

from shared.contracts.bus import Device, DispatchRequested
from shared.links import LinkSigner

# sent: the provider accepted it; delivered: it reached the customer (in-app, local outbox,
# a receipt); failed / bounced: permanent, with the provider's reason; token_invalid: the
# device token is dead (push); retry: transient (timeouts, resets, 429, 5xx), try again after
# ``retry_after`` if the provider said so, else with backoff.
ResultKind = Literal["sent", "delivered", "failed", "bounced", "token_invalid", "retry"]


@dataclass(frozen=True)
class Outgoing:
    """One send: the request as decision built it, the device for push, and the signer for
    the links a channel writes into the message (click, open, unsubscribe, callbacks)."""

    request: DispatchRequested
    links: LinkSigner
    device: Device | None = None
    attempt: int = 1  # 1 for the first try; providers may use it in logs

    @property
    def realtime(self) -> bool:
        return self.request.lane == "realtime"


@dataclass(frozen=True)
class Result:
    """A provider's answer, classified."""

    kind: ResultKind
    provider_id: str | None = None  # apns-id, FCM message name, SMTP Message-ID, Twilio SID
    reason: str | None = None  # the provider's own words (BadDeviceToken, 550 5.1.1 …)
    retry_after: float | None = None  # seconds, when the provider said (Retry-After)
    # Pause the whole provider (every replica) until then: 429 from APNs/FCM/Twilio.
    throttled: bool = False
    token_invalid_since: str | None = None  # RFC 3339, from the provider's timestamp
    opted_out: bool = False  # SMS 21610: the customer has unsubscribed at the carrier
    segments: int | None = None  # SMS: GSM-7 / UCS-2 segments billed
    answer: dict[str, Any] = field(default_factory=dict)  # status code, body excerpt: stored


class Provider(ABC):
    """A provider client: one per process, shared by every sender task."""

    name: str  # "apns", "fcm", "webpush", "smtp", "sms", "local"

    async def start(self) -> None:
        """Open connections, load credentials; raise with an actionable message if wrong."""
        return None

    async def close(self) -> None:
        """Close connections."""
        return None

    @abstractmethod
    async def send(self, out: Outgoing) -> Result:
        """Send one message (one device for push) and classify the answer."""


def provider_pool(
    connections: int, timeout: float, ca_file: str | Path | None, **extra: Any
) -> aiohttp.ClientSession:
    """A keep-alive HTTPS pool of ``connections`` to a push service (FCM, Web Push)."""
    ctx: ssl.SSLContext | bool = True
    if ca_file:
        ctx = ssl.create_default_context(cafile=str(ca_file))
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, ssl=ctx),
        # The provider's silence times out, not the wait for a pooled connection
        # (hundreds of sends may queue for 64 connections at a batch's peak).
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
        **extra,
    )


class LanePools:
    """One aiohttp keep-alive pool per lane, for the HTTP providers (FCM, Web Push, SMS).

    A batch run keeps as many sends in flight as a pool has connections; a realtime message
    (an OTP, a triggered offer) sharing that pool queued behind all of them (an SMS even
    timed out into a retry, its connect timeout counting the wait for a free connection)."""

    def __init__(self, make: Callable[[], aiohttp.ClientSession]) -> None:
        self._make = make
        self._pools: dict[bool, aiohttp.ClientSession] = {}

    def get(self, realtime: bool) -> aiohttp.ClientSession:
        """The lane's pool, opened on first use (inside the running event loop)."""
        pool = self._pools.get(realtime)
        if pool is None:
            pool = self._pools[realtime] = self._make()
        return pool

    def open(self) -> None:
        for realtime in (True, False):
            self.get(realtime)

    async def close(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            await pool.close()
