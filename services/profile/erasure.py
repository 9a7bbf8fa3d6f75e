"""Erasure on the bus and in Redis: what ``profile.erased`` leaves the profile service to do.

The profile's own tables are erased by the ``DELETE`` itself (in the same transaction as the
``profile.erased`` outbox row); every other service erases its own tables when the message
reaches it. This consumer removes what no single service owns:

1. Reads what the streams still say about the customer's Redis entries: the ids of their
   recent events (the ``applied:<event id>`` markers name the customer) and their offered
   contacts (propensity pending sets hold their tracking ids).
2. Purges every stream by the customer tokens (``shared.privacy.CUSTOMER_SUBJECTS``) at once,
   so no consumer reads their messages again; ``PROFILE`` only below the erasure itself,
   which the other services still have to see.
3. Waits until the other consumers have acted on the erasure and acked what they had in
   flight (bounded by ``wait_s``; if they have not, the message comes back later).
4. Purges again (messages published while it waited, and the erasure itself), deletes the
   customer's dead letters and every Redis key naming them: the projection's tombstone,
   ledger and contact-history keys, markers, pending-set members, idempotency entries.

Re-running it is harmless: every step removes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from prometheus_client import Histogram
from pydantic import ValidationError

from shared.bus import Consumer, PoisonMessage
from shared.contracts.bus import ProfileErased
from shared.events import CloudEvent
from shared.privacy import CUSTOMER_SUBJECTS, any_customer, customer_token, purge_subjects
from shared.redis import APPLIED_TTL_S
from shared.service import Runtime

log = logging.getLogger("kairos.profile.erasure")
Batch = Sequence[tuple[Msg, CloudEvent]]

NAME = "profile-erasure"
PATIENCE = 30  # deliveries of one erasure waiting for the other consumers (~90 s)
GRACE_S = 0.5  # how long a consumer may still be handling a message it took in
STREAMS = tuple(dict.fromkeys(s for s, _ in CUSTOMER_SUBJECTS))
ERASURE_SECONDS = Histogram(
    "kairos_erasure_seconds",
    "From profile.erased to nothing of the customer left on the bus or in Redis",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)


class Erasure:
    """The ``profile-erasure`` consumer's work (one erasure at a time)."""

    def __init__(self, rt: Runtime, *, wait_s: float = 1.0) -> None:
        self.rt = rt
        self.bus = rt.bus
        self.redis = rt.redis
        self.keys = rt.keys
        self.wait_s = wait_s

    def consumer(self) -> Consumer:
        return Consumer(
            self.bus,
            NAME,
            [any_customer("profile.erased")],
            "PROFILE",
            self.handle,
            batch=10,
            max_deliver=self.rt.settings.consumer_max_deliver,
            ack_wait_s=60.0,
            nak_delay_s=2.0,
        )

    async def handle(self, batch: Batch) -> list[Msg]:
        later = []
        for msg, ev in batch:
            try:
                erased = ProfileErased.parse(ev)
            except ValidationError as exc:
                raise PoisonMessage(f"not a profile.erased payload: {exc}") from exc
            meta = msg.metadata
            seq = meta.sequence.stream if meta and meta.sequence else None
            # A consumer that stays behind for good (a lagging service under load) does not
            # hold the erasure back forever: after a few rounds it goes ahead without it.
            patient = (meta.num_delivered or 1) < PATIENCE if meta else True
            if not await self.erase(erased, seq, patient=patient):
                later.append(msg)
        return later

    async def erase(self, erased: ProfileErased, seq: int | None, *, patient: bool = True) -> bool:
        """Erase one customer from the bus and Redis; False if other consumers have not
        caught up within ``wait_s`` (nothing is lost: the message comes back and the steps
        run again); not ``patient``: go ahead anyway."""
        t0 = time.perf_counter()
        ids = list(dict.fromkeys([erased.customer_id, *erased.ids]))
        tokens = [customer_token(i) for i in ids]
        traces = await self._traces(tokens)
        # Unknown position of the erasure (never on JetStream): keep every PROFILE message.
        marks = await self._purge(tokens, profile_below=seq or 1)
        settled = await self._settled(marks) or not patient
        traces = traces.merge(await self._traces(tokens))  # what came in while waiting
        if settled:
            await self._purge(tokens, profile_below=None)
        await self._dead_letters(ids, tokens)
        await self._redis(ids, tokens, traces, tombstones=settled)
        if not settled:
            log.warning("erasure of %d ids waits for consumers to catch up", len(ids))
            return False
        took = time.perf_counter() - t0
        ERASURE_SECONDS.observe(took)
        log.info("erased %d ids from the bus and Redis in %.3f s", len(ids), took)
        return True

    # -- the bus ----------------------------------------------------------------------
    async def _read(
        self, stream: str, subject: str, *, since: datetime | None = None
    ) -> list[tuple[int, bytes, dict[str, str]]]:
        """(sequence, data, headers) of every message of a stream on ``subject`` (a short-
        lived consumer that acks nothing)."""
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_TIME if since else DeliverPolicy.ALL,
            opt_start_time=since,
            inactive_threshold=30.0,
            mem_storage=True,
        )
        try:
            sub = await self.bus.js.pull_subscribe(
                self.bus.subject(subject), stream=self.bus.stream(stream), config=config
            )
        except NotFoundError:
            return []
        out = []
        try:
            while True:
                try:
                    msgs = await sub.fetch(1000, timeout=0.2)
                except TimeoutError:
                    break
                for m in msgs:
                    seq = m.metadata.sequence.stream if m.metadata.sequence else 0
                    out.append((seq, m.data, dict(m.headers or {})))
                if not msgs or (msgs[-1].metadata.num_pending or 0) == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                name = (await sub.consumer_info()).name
                await sub.unsubscribe()
                await self.bus.js.delete_consumer(self.bus.stream(stream), name)
        return out

    async def _traces(self, tokens: Sequence[str]) -> Traces:
        """Event ids of the last ``APPLIED_TTL_S`` (their markers) and offered contacts."""
        out = Traces()
        since = datetime.now(UTC) - timedelta(seconds=APPLIED_TTL_S + 60)
        for t in tokens:
            for _, data, headers in await self._read("EVENTS", f"events.{t}.>", since=since):
                if headers.get("Nats-Msg-Id"):
                    out.event_ids.add(headers["Nats-Msg-Id"])
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    out.event_ids.add(str(orjson.loads(data)["id"]))
            for _, data, _ in await self._read("CONTACT", f"contact.recorded.{t}"):
                with contextlib.suppress(ValueError, TypeError, KeyError, AttributeError):
                    d = orjson.loads(data)["data"]
                    if d.get("offer_id") and d.get("treatment"):
                        out.offered.add((d["offer_id"], d["treatment"], d["tracking_id"]))
        return out

    async def _purge(self, tokens: Sequence[str], *, profile_below: int | None) -> dict[str, int]:
        """Purge every stream by these tokens (``PROFILE`` only below ``profile_below`` when
        given: the erasure itself stays); returns, per stream, the sequence of the customer's
        last message there (and of the erasure), which every consumer that may read the
        customer's messages must have acked before the second purge."""
        marks: dict[str, int] = {}
        if profile_below:
            marks["PROFILE"] = profile_below  # the erasure itself
        for t in tokens:  # where the customer's last message of each stream is
            for stream, subject in purge_subjects(t):
                with contextlib.suppress(NotFoundError):
                    last = await self.bus.js.get_last_msg(
                        self.bus.stream(stream), self.bus.subject(subject)
                    )
                    marks[stream] = max(marks.get(stream, 0), int(last.seq or 0))
        for t in tokens:
            for stream, subject in purge_subjects(t):
                seq = profile_below if stream == "PROFILE" else None
                with contextlib.suppress(NotFoundError):
                    await self.bus.js.purge_stream(
                        self.bus.stream(stream), subject=self.bus.subject(subject), seq=seq
                    )
        return marks

    async def _settled(self, marks: dict[str, int]) -> bool:
        """True once every other consumer that may read the customer's messages has acked past
        its stream's mark, or has nothing left to do, or nobody reads it (two looks in a row);
        False after ``wait_s``."""
        deadline = time.monotonic() + self.wait_s
        own = self.bus.durable(NAME)
        idle_once: set[tuple[str, str]] = set()
        while True:
            behind = []
            grace = False
            for name, mark in marks.items():
                try:
                    infos = await self.bus.js.consumers_info(self.bus.stream(name))
                except NotFoundError:
                    continue
                for c in infos:
                    if c.name == own or not self._reads_customers(name, c.config):
                        continue
                    floor = c.ack_floor.stream_seq if c.ack_floor else 0
                    if floor >= mark or (not c.num_pending and not c.num_ack_pending):
                        continue
                    if (c.delivered.stream_seq if c.delivered else 0) >= mark:
                        # It has taken in everything up to the mark; what it holds unacked is
                        # in its hands now (GRACE_S covers that) or waits for a redelivery
                        # that the second purge cancels. A consumer that keeps naking one
                        # message (feedback waiting for a contact) must not hold us back.
                        grace = True
                        continue
                    key = (name, c.name)
                    if not c.num_waiting and not c.num_ack_pending:  # nobody is reading it
                        if key in idle_once:
                            continue
                        idle_once.add(key)
                    else:
                        idle_once.discard(key)
                    behind.append(c.name)
            if not behind:
                if grace:
                    await asyncio.sleep(GRACE_S)
                return True
            if time.monotonic() >= deadline:
                log.warning("erasure: consumers still behind: %s", behind[:10])
                return False
            await asyncio.sleep(0.05)

    def _reads_customers(self, stream: str, config: Any) -> bool:
        """Whether a consumer's filter can match a customer's subjects on this stream (a
        consumer of provider receipts never sees one: it is not waited for)."""
        filters = config.filter_subjects or [config.filter_subject or ">"]
        mine = [self.bus.subject(p.format(t="*")) for s, p in CUSTOMER_SUBJECTS if s == stream]
        return any(_overlap(f, m) for f in filters for m in mine)

    async def _dead_letters(self, ids: Sequence[str], tokens: Sequence[str]) -> int:
        """Delete every dead letter that names the customer (the DLQ is small: scanned)."""
        needles = [i.encode() for i in ids]
        suffixes = tuple("." + t for t in tokens)
        gone = 0
        stream = self.bus.stream("DLQ")
        for seq, data, headers in await self._read("DLQ", "dlq.>"):
            original = headers.get("Kairos-Original-Subject", "")
            if original.endswith(suffixes) or any(n in data for n in needles):
                with contextlib.suppress(Exception):
                    await self.bus.js.delete_msg(stream, seq)
                    gone += 1
        if gone:
            log.info("erasure: %d dead letters deleted", gone)
        return gone

    # -- Redis ------------------------------------------------------------------------
    async def _redis(
        self, ids: Sequence[str], tokens: Sequence[str], traces: Traces, *, tombstones: bool
    ) -> None:
        """Every key that names the customer (projection tombstone last, when ``tombstones``),
        the markers of their events, their members of the pending sets, their idempotent
        answers."""
        doomed: list[Any] = []
        for cid in ids:
            if tombstones:
                doomed.append(self.keys.profile(cid))
            families = tuple(p.encode() for p in self.keys.of_customer(cid))
            pattern = f"{self.keys.prefix}*:{_glob_escape(cid)}:*"
            async for key in self.redis.scan_iter(match=pattern, count=5000):
                if key.startswith(families):
                    doomed.append(key)
        doomed += [self.keys.applied(e) for e in traces.event_ids]
        for t in tokens:
            index = self.keys.idempotency_index(t)
            doomed += list(await self.redis.smembers(index))
            doomed.append(index)
        async with self.redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(doomed), 500):
                pipe.delete(*doomed[start : start + 500])
            for offer, treatment, tracking in traces.offered:
                pipe.zrem(self.keys.propensity_pending(offer, treatment), tracking)
            await pipe.execute()


class Traces:
    """What the streams said about a customer's entries in Redis."""

    def __init__(self) -> None:
        self.event_ids: set[str] = set()
        self.offered: set[tuple[str, str, str]] = set()

    def merge(self, other: Traces) -> Traces:
        self.event_ids |= other.event_ids
        self.offered |= other.offered
        return self


def _overlap(a: str, b: str) -> bool:
    """Whether two NATS subject filters can match a common subject."""
    x, y = a.split("."), b.split(".")
    for i in range(max(len(x), len(y))):
        p = x[i] if i < len(x) else None
        q = y[i] if i < len(y) else None
        if p == ">" or q == ">":
            return p is not None and q is not None
        if p is None or q is None:
            return False
        if p != q and "*" not in (p, q):
            return False
    return True


def _glob_escape(text: str) -> str:
    """A customer id as a literal inside a Redis MATCH pattern."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
