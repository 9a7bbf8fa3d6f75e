"""The senders: claim due messages per channel and lane, send them through their provider,
store each outcome and publish it.

Every (channel, lane) has its own workers, so realtime and triggered messages never wait
behind a batch run's backlog, and a provider that is down or throttled holds back its own
channel only. An outcome is stored, and its ``delivery.<status>`` put in the outbox, in one
transaction; a transient failure is retried with exponential backoff and jitter until the
message's expiry or ``KAIROS_DISPATCH_MAX_AGE_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from opentelemetry import propagate, trace
from prometheus_client import Counter, Histogram

from services.dispatch import store
from services.dispatch.channels.base import Outgoing, Provider, Result
from services.dispatch.providers import Providers
from services.dispatch.ratelimit import RateLimiter
from shared.contracts.bus import DeliveryReported, Platform, ResponseReceived
from shared.db import Database, UnitOfWork
from shared.events import iso, utcnow
from shared.links import LinkSigner

log = logging.getLogger("kairos.dispatch.sender")
tracer = trace.get_tracer("kairos.dispatch")
SOURCE = "kairos/dispatch"

SENT = Counter(
    "kairos_dispatch_attempts_total", "Send attempts by outcome", ["channel", "provider", "result"]
)
SEND_SECONDS = Histogram(
    "kairos_dispatch_send_seconds",
    "Provider call duration",
    ["provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

LANES: dict[str, tuple[int, int]] = {"realtime": (2, 50), "batch": (2, 200)}  # workers, claim
# A claim outlives any batch's sends (provider calls time out well before); a replica that
# dies holding claims is recovered after it, or at once when it restarts under its name.
LEASE_S = 120.0
IDLE_POLL_S = 1.0  # same-process intake wakes the workers; the poll finds retries falling due
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 300.0


def backoff(attempt: int, retry_after: float | None) -> float:
    """Seconds before the next attempt: the provider's Retry-After, else exponential with
    full jitter around it (so replicas retrying a recovered provider do not stampede)."""
    if retry_after is not None and retry_after > 0:
        return retry_after
    base = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** max(0, attempt - 1))
    return base * random.uniform(0.5, 1.5)


@dataclass
class Sent:
    """The combined answer for one message (for push: over every device)."""

    result: Result
    provider: str
    attempts: list[dict[str, Any]] = field(default_factory=list)
    invalid: list[tuple[Platform, str, Result]] = field(default_factory=list)  # platform, token


class Sender:
    """Workers per channel and lane over the message table."""

    def __init__(
        self,
        db: Database,
        providers: Providers,
        limiter: RateLimiter,
        links: LinkSigner,
        *,
        owner: str,
        concurrency: int,
        max_age_s: float,
        retention_days: int = 30,
    ) -> None:
        self.db = db
        self.providers = providers
        self.limiter = limiter
        self.links = links
        self.owner = owner
        self.max_age = timedelta(seconds=max_age_s)
        self.retention = timedelta(days=retention_days)
        self.concurrency = concurrency
        self._events = {(c, lane): asyncio.Event() for c in Providers.CHANNELS for lane in LANES}
        self._sems = {k: asyncio.Semaphore(concurrency) for k in self._events}

    def wake(self, channel: str, lane: str) -> None:
        """New messages are waiting on this channel and lane."""
        ev = self._events.get((channel, lane))
        if ev is not None:
            ev.set()

    def tasks(self) -> list[asyncio.Task[None]]:
        """Start every worker and the recovery of interrupted sends."""
        out = [asyncio.create_task(self._recover_forever(), name="dispatch:recover")]
        for channel in Providers.CHANNELS:
            for lane, (workers, size) in LANES.items():
                for i in range(workers):
                    out.append(
                        asyncio.create_task(
                            self._lane(channel, lane, size), name=f"dispatch:{channel}:{lane}:{i}"
                        )
                    )
        return out

    async def _recover_forever(self) -> None:
        first = True
        purged_at = 0.0
        while True:
            if time.monotonic() - purged_at > 3600:
                purged_at = time.monotonic()
                await self._purge()
            try:
                async with self.db.transaction() as uow:
                    n = await store.recover(
                        uow.session, now=utcnow(), owner=self.owner if first else None
                    )
                first = False
                if n:
                    log.warning("%d interrupted sends marked in_doubt and queued again", n)
                    for key in self._events:
                        self.wake(*key)
            except Exception as exc:
                log.warning("recovery of interrupted sends failed: %s", exc)
            await asyncio.sleep(5.0)

    async def _purge(self) -> None:
        """Delete finished messages past the retention, in chunks (a daily trickle)."""
        try:
            while True:
                async with self.db.transaction() as uow:
                    n = await store.purge(uow.session, before=utcnow() - self.retention)
                if n < 10_000:
                    return
        except Exception as exc:
            log.warning("purging old messages failed: %s", exc)

    async def _lane(self, channel: str, lane: str, size: int) -> None:
        ev = self._events[(channel, lane)]
        while True:
            try:
                held = await self.limiter.throttled_for(self.providers.names(channel))
                if held > 0:  # a provider said 429: every replica waits it out
                    await asyncio.sleep(min(held, 5.0))
                    continue
                ev.clear()
                n = await self.round(channel, lane, size)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database or Redis blinked: try again shortly
                log.warning("sender %s/%s: %s", channel, lane, exc)
                await asyncio.sleep(0.5)
                continue
            if n == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), IDLE_POLL_S)

    async def round(self, channel: str, lane: str, size: int) -> int:
        """Claim, send and record one batch; returns how many were claimed."""
        now = utcnow()
        async with self.db.transaction() as uow:
            claimed = await store.claim(
                uow.session,
                channel=channel,
                lane=lane,
                limit=size,
                owner=self.owner,
                lease_s=LEASE_S,
                now=now,
            )
        if not claimed:
            return 0
        live = [c for c in claimed if c.expires_at is None or c.expires_at > now]
        await self.limiter.acquire(channel, len(live))
        sem = self._sems[(channel, lane)]

        async def one(c: store.Claimed) -> Sent:
            async with sem:
                return await self._send(c)

        sent = await asyncio.gather(*(one(c) for c in live))
        by_id = {c.tracking_id: s for c, s in zip(live, sent, strict=True)}
        # What the providers answered exists only in memory now: a database blip must not
        # turn these sends into in_doubt ones, so the record is retried well within the lease.
        for attempt in range(30):
            try:
                async with self.db.transaction() as uow:
                    at = utcnow()
                    outcomes = [
                        self._outcome(uow, c, by_id.get(c.tracking_id), at) for c in claimed
                    ]
                    await store.finish(uow.session, outcomes, at)
                break
            except Exception as exc:
                if attempt == 29:
                    raise
                log.warning("recording %d outcomes failed (%s); retrying", len(claimed), exc)
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        return len(claimed)

    # -- one message -------------------------------------------------------------------
    async def _send(self, c: store.Claimed) -> Sent:
        ctx = propagate.extract({"traceparent": c.traceparent} if c.traceparent else {})
        with tracer.start_as_current_span(
            f"dispatch {c.req.channel}",
            context=ctx,
            attributes={"kairos.tracking_id": c.tracking_id, "kairos.attempt": c.attempt},
        ):
            if c.req.channel == "push":
                return await self._push(c)
            provider = self.providers.for_channel(c.req.channel)
            return await self._call(provider, Outgoing(c.req, self.links, attempt=c.attempt))

    async def _call(self, provider: Provider, out: Outgoing) -> Sent:
        t0 = time.perf_counter()
        try:
            res = await provider.send(out)
        except Exception as exc:  # unclassified: a transient failure by the interface's rule
            log.warning("%s send raised %s: %s", provider.name, type(exc).__name__, exc)
            res = Result("retry", reason=f"{type(exc).__name__}: {exc}"[:500])
        took = time.perf_counter() - t0
        SEND_SECONDS.labels(provider.name).observe(took)
        SENT.labels(out.request.channel, provider.name, res.kind).inc()
        attempt: dict[str, Any] = {
            "at": iso(utcnow()),
            "provider": provider.name,
            "result": res.kind,
            "reason": res.reason,
            "provider_id": res.provider_id,
            "duration_ms": round(took * 1000, 2),
            "answer": res.answer,
        }
        if out.device is not None:
            attempt["device"] = {"platform": out.device.platform, "token": out.device.token[-12:]}
        if res.throttled:
            await self.limiter.throttle(provider.name, res.retry_after or 1.0)
        return Sent(res, provider.name, [attempt])

    async def _push(self, c: store.Claimed) -> Sent:
        devices = (c.req.address.devices if c.req.address else None) or []
        results = await asyncio.gather(
            *(
                self._call(
                    self.providers.for_platform(d.platform),
                    Outgoing(c.req, self.links, device=d, attempt=c.attempt),
                )
                for d in devices
            )
        )
        attempts = [a for s in results for a in s.attempts]
        invalid = [
            (d.platform, d.token, s.result)
            for d, s in zip(devices, results, strict=True)
            if s.result.kind == "token_invalid"
        ]
        kinds = [s.result for s in results]
        providers = ",".join(sorted({s.provider for s in results})) or "none"
        ok = [r for r in kinds if r.kind in ("sent", "delivered")]
        if ok:
            kind = "delivered" if all(r.kind == "delivered" for r in ok) else "sent"
            ids = ",".join(r.provider_id for r in ok if r.provider_id)
            res = Result(kind, provider_id=ids or None)  # type: ignore[arg-type]
        elif any(r.kind == "retry" for r in kinds):
            after = max((r.retry_after or 0.0 for r in kinds), default=0.0)
            reason = "; ".join(r.reason or "retry" for r in kinds if r.kind == "retry")
            res = Result("retry", reason=reason, retry_after=after or None)
        elif not devices:
            res = Result("failed", reason="no push device registered")
        elif len(invalid) == len(devices):
            res = Result("failed", reason="token_invalid: every device token was refused")
        else:
            res = Result("failed", reason="; ".join(r.reason or r.kind for r in kinds))
        return Sent(res, providers, attempts, invalid)

    # -- outcomes ------------------------------------------------------------------------
    def _outcome(
        self, uow: UnitOfWork, c: store.Claimed, sent: Sent | None, now: datetime
    ) -> store.Outcome:
        req = c.req
        reason: str | None
        if sent is None:  # expired before it could be sent
            status, reason = "expired", "expired before it could be sent"
            self._report(uow, c, status, None, None, reason)
            return store.Outcome(
                c.tracking_id,
                status,
                None,
                None,
                reason,
                [{"n": c.attempt, "at": iso(now), "result": "expired", "reason": reason}],
            )
        res = sent.result
        attempt = [{"n": c.attempt, **a} for a in sent.attempts]
        for platform, token, r in sent.invalid:
            subject, ev = DeliveryReported(
                tracking_id=req.tracking_id,
                customer_id=req.customer_id,
                campaign_id=req.campaign_id,
                channel=req.channel,
                status="token_invalid",
                provider=sent.provider,
                reason=r.reason,
                attempts=c.attempt,
                token_invalid=True,
                platform=platform,
                token=token,
                token_invalid_since=r.token_invalid_since,
            ).to_event(source=SOURCE)
            uow.emit(subject, ev)
        if res.opted_out:  # the carrier says the customer opted out: an unsubscribe
            subject, ev = ResponseReceived(
                tracking_id=req.tracking_id,
                outcome="unsubscribed",
                channel=req.channel,
                customer_id=req.customer_id,
                source="provider",
            ).to_event(source=SOURCE, id_=f"optout-{req.tracking_id}")
            uow.emit(subject, ev)
        if res.kind == "retry":
            delay = backoff(c.attempt, res.retry_after)
            nxt = now + timedelta(seconds=delay)
            if c.expires_at is not None and nxt >= c.expires_at:
                status, reason = "expired", f"expired while retrying: {res.reason}"
            elif nxt - c.created_at > self.max_age:
                status, reason = "failed", f"gave up after {c.attempt} attempts: {res.reason}"
            else:
                return store.Outcome(
                    c.tracking_id,
                    "in_doubt" if c.in_doubt else "queued",
                    sent.provider,
                    None,
                    res.reason,
                    attempt,
                    nxt,
                )
        elif res.kind == "token_invalid":
            status, reason = "failed", res.reason or "token_invalid"
        else:
            status, reason = res.kind, res.reason
        self._report(uow, c, status, sent.provider, res.provider_id, reason)
        return store.Outcome(c.tracking_id, status, sent.provider, res.provider_id, reason, attempt)

    def _report(
        self,
        uow: UnitOfWork,
        c: store.Claimed,
        status: str,
        provider: str | None,
        provider_id: str | None,
        reason: str | None,
    ) -> None:
        subject, ev = DeliveryReported(
            tracking_id=c.req.tracking_id,
            customer_id=c.req.customer_id,
            campaign_id=c.req.campaign_id,
            channel=c.req.channel,
            status=status,  # type: ignore[arg-type]
            provider=provider,
            provider_id=provider_id,
            reason=reason,
            attempts=c.attempt,
        ).to_event(source=SOURCE, id_=f"delivery-{c.tracking_id}-{status}")
        uow.emit(subject, ev)


def final_events(
    uow: UnitOfWork, rows: Sequence[tuple[store.NewMessage, str]], *, provider: str | None
) -> None:
    """``delivery.<status>`` for messages final at intake (in-app delivered, refused ones)."""
    for msg, status in rows:
        subject, ev = DeliveryReported(
            tracking_id=msg.req.tracking_id,
            customer_id=msg.req.customer_id,
            campaign_id=msg.req.campaign_id,
            channel=msg.req.channel,
            status=status,  # type: ignore[arg-type]
            provider=provider if status == "delivered" else None,
            reason=msg.reason,
            attempts=0,
        ).to_event(source=SOURCE, id_=f"delivery-{msg.req.tracking_id}-{status}")
        uow.emit(subject, ev)
