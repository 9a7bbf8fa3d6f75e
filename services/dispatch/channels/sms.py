"""SMS over a Twilio-compatible Messages API (form POST, basic auth, status callbacks): a real
Twilio account works, and so does any gateway that speaks the same protocol."""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson

from services.dispatch.channels.base import LanePools, Outgoing, Provider, Result
from shared.settings import Settings

log = logging.getLogger("kairos.dispatch.sms")

# GSM 03.38: the basic table (one septet each) and its extension table (escape + one septet).
GSM_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM_EXTENDED = frozenset("^{}\\[~]|€\f")
# Twilio's documented errors that are permanent for this message.
INVALID_NUMBER = 21211
OPTED_OUT = 21610


def segments(text: str) -> int:
    """How many SMS parts the carrier bills for ``text`` (GSM-7 160/153, else UCS-2 70/67)."""
    units: list[int]
    if all(ch in GSM_BASIC or ch in GSM_EXTENDED for ch in text):
        units = [2 if ch in GSM_EXTENDED else 1 for ch in text]
        single, part = 160, 153
    else:
        # UCS-2 counts UTF-16 code units: a character outside the BMP (emoji) takes two.
        units = [2 if ord(ch) > 0xFFFF else 1 for ch in text]
        single, part = 70, 67
    total = sum(units)
    if total <= single:
        return 1
    # Parts are filled greedily; an escape pair or a surrogate pair is never split.
    count, used = 1, 0
    for u in units:
        if used + u > part:
            count, used = count + 1, 0
        used += u
    return count


def parse_status_callback(form: Mapping[str, str]) -> tuple[str, str | None]:
    """A Twilio status callback as (``delivered`` | ``failed`` | ``sent`` | ``ignore``, reason)."""
    status = (form.get("MessageStatus") or form.get("SmsStatus") or "").lower()
    if status == "delivered":
        return "delivered", None
    if status in ("undelivered", "failed"):
        code = form.get("ErrorCode")
        message = form.get("ErrorMessage")
        reason = " ".join(p for p in (code, message) if p) or status
        return "failed", reason
    if status == "sent":
        return "sent", None
    return "ignore", None  # queued, accepted, sending, scheduled, read, canceled …


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to the sender's backoff


class SmsProvider(Provider):
    """Sends through ``POST {url}/2010-04-01/Accounts/{account}/Messages.json``."""

    name = "sms"

    def __init__(
        self,
        *,
        url: str,
        account: str,
        token: str,
        sender: str,
        public_url: str,
        connections: int = 64,
        timeout: float = 10.0,
    ) -> None:
        self.endpoint = f"{url.rstrip('/')}/2010-04-01/Accounts/{account}/Messages.json"
        self.account = account
        credentials = base64.b64encode(f"{account}:{token}".encode()).decode()
        self.headers = {
            "Authorization": f"Basic {credentials}",
            "Content-Type": "application/x-www-form-urlencoded",
        }
        self.sender = sender
        self.callback_base = f"{public_url.rstrip('/')}/callbacks/sms/"
        self.connections = connections
        self.timeout = aiohttp.ClientTimeout(total=timeout, connect=min(3.0, timeout))
        self._pools = LanePools(self._new_pool)

    def _new_pool(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self.connections, keepalive_timeout=30)
        return aiohttp.ClientSession(connector=connector, timeout=self.timeout)

    async def start(self) -> None:
        """Open the keep-alive connection pools (one per lane)."""
        self._pools.open()

    async def close(self) -> None:
        await self._pools.close()

    async def send(self, out: Outgoing) -> Result:
        """Submit one SMS and classify Twilio's answer."""
        req = out.request
        to = req.address.msisdn if req.address else None
        if not to:
            return Result("failed", reason="no mobile number for this customer")
        text = req.content.get("text") or req.content.get("body") or ""
        if not text:
            return Result("failed", reason="the message has no text")
        parts = segments(text)
        form = {
            "To": to,
            "From": self.sender,
            "Body": text,
            "StatusCallback": self.callback_base
            + out.links.token("c", req.tracking_id, channel="sms"),
        }
        session = self._pools.get(out.realtime)
        try:
            # Encoded here: aiohttp's FormData path costs more CPU than the rest of the send.
            body = urlencode(form).encode()
            async with session.post(self.endpoint, data=body, headers=self.headers) as resp:
                status, raw, headers = resp.status, await resp.read(), resp.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Result("retry", reason=f"SMS API unreachable: {type(exc).__name__} {exc}")
        return self._classify(status, raw, headers, parts)

    def _classify(self, status: int, raw: bytes, headers: Mapping[str, str], parts: int) -> Result:
        try:
            body: Any = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            body = {"message": raw[:200].decode(errors="replace")}
        if not isinstance(body, dict):
            body = {}
        answer = {"status": status, "code": body.get("code"), "message": body.get("message")}
        if status in (200, 201) and body.get("sid"):
            billed = body.get("num_segments")
            return Result(
                "sent",
                provider_id=str(body["sid"]),
                segments=int(billed) if str(billed or "").isdigit() else parts,
                answer={"status": status, "sid": body["sid"], "state": body.get("status")},
            )
        reason = f"{body.get('code') or status} {body.get('message') or ''}".strip()
        if status == 429 or status >= 500:
            return Result(
                "retry",
                reason=reason,
                retry_after=_retry_after(headers),
                throttled=status == 429,
                answer=answer,
            )
        if status in (401, 403):
            log.error(
                "the SMS API refused account %s (%s): check KAIROS_SMS_ACCOUNT and "
                "KAIROS_SMS_TOKEN",
                self.account,
                reason,
            )
            return Result("failed", reason=reason, answer=answer)
        if body.get("code") == OPTED_OUT:
            return Result("failed", reason=reason, opted_out=True, answer=answer)
        return Result("failed", reason=reason, answer=answer)  # 21211 and every other 4xx


def from_settings(settings: Settings) -> SmsProvider | None:
    """The SMS provider when ``KAIROS_SMS_URL`` and its account are set, else None."""
    s = settings
    if not s.sms_url:
        return None
    if not (s.sms_account and s.sms_token and s.sms_from):
        raise ValueError(
            "KAIROS_SMS_URL is set: KAIROS_SMS_ACCOUNT, KAIROS_SMS_TOKEN and KAIROS_SMS_FROM "
            "are needed too"
        )
    return SmsProvider(
        url=s.sms_url,
        account=s.sms_account,
        token=s.sms_token,
        sender=s.sms_from,
        public_url=s.public_url,
        connections=max(8, s.dispatch_concurrency),
    )
