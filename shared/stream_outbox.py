"""A Redis stream as an outbox for JetStream: what a Lua script writes atomically with its
other effects (a contact recorded in the same step as its cap reservation) is relayed to
the bus afterwards, so a request does not wait for a JetStream ack and nothing is lost.

Each entry holds the logical subject (``s``), the event id (``i``, the ``Nats-Msg-Id``),
the serialised CloudEvent (``d``) and the trace context of the request that wrote it
(``t``, a ``traceparent``, may be empty). Every replica runs a relay in one consumer group:

- it reads new entries (``XREADGROUP``), publishes them with their acks pipelined, and
  only then acknowledges and deletes them (``XACK`` + ``XDEL``);
- entries a killed replica had read but not acknowledged are claimed by another after
  ``claim_idle_ms`` (``XAUTOCLAIM``) and published again: the stream's duplicate window
  drops the second copy (same ``Nats-Msg-Id``);
- when NATS is down, entries stay in Redis and go out once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.bus import PUBLISHED, Bus

log = logging.getLogger("kairos.stream_outbox")
GROUP = "relay"
CONTENT_TYPE = "application/cloudevents+json"


class StreamOutbox:
    """Relays one Redis stream to JetStream (``run`` as a background task per replica)."""

    def __init__(
        self,
        redis: Redis,
        bus: Bus,
        stream: str,
        consumer: str,
        *,
        batch: int = 500,
        block_ms: int = 250,
        claim_idle_ms: int = 5_000,
    ) -> None:
        self.redis = redis
        self.bus = bus
        self.stream = stream
        self.consumer = consumer
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.relayed = 0

    async def ensure_group(self) -> None:
        """Create the consumer group from the stream's start (idempotent)."""
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def relay_once(self) -> int:
        """Publish what is waiting (a dead replica's claimed entries first); returns how many."""
        claimed: Any = await self.redis.xautoclaim(
            self.stream, GROUP, self.consumer, self.claim_idle_ms, "0-0", count=self.batch
        )
        entries: list[tuple[bytes, dict[bytes, bytes]]] = list(claimed[1]) if claimed else []
        if not entries:
            got: Any = await self.redis.xreadgroup(
                GROUP, self.consumer, {self.stream: ">"}, count=self.batch, block=self.block_ms
            )
            for _, items in got or ():
                entries += items
        entries = [(eid, fields) for eid, fields in entries if fields]  # deleted meanwhile
        if not entries:
            return 0
        await self._publish(entries)
        ids = [eid for eid, _ in entries]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xack(self.stream, GROUP, *ids)
            pipe.xdel(self.stream, *ids)
            await pipe.execute()
        self.relayed += len(entries)
        return len(entries)

    async def _publish(self, entries: Sequence[tuple[bytes, dict[bytes, bytes]]]) -> None:
        futures = []
        counts: dict[str, int] = {}
        for _, f in entries:
            logical = f[b"s"].decode()
            headers = {"Nats-Msg-Id": f[b"i"].decode(), "Content-Type": CONTENT_TYPE}
            if f.get(b"t"):
                headers["traceparent"] = f[b"t"].decode()
            futures.append(
                await self.bus.js.publish_async(self.bus.subject(logical), f[b"d"], headers=headers)
            )
            head = logical.split(".", 1)[0]
            counts[head] = counts.get(head, 0) + 1
        await asyncio.wait_for(asyncio.gather(*futures), 30)
        for head, n in counts.items():
            PUBLISHED.labels(head).inc(n)

    async def run(self) -> None:
        """Relay until cancelled; failures (NATS or Redis down) are retried shortly."""
        while True:
            try:
                await self.ensure_group()
                break
            except Exception as exc:
                log.warning("outbox stream %s: group not created yet: %s", self.stream, exc)
                await asyncio.sleep(1.0)
        while True:
            try:
                await self.relay_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox stream %s: relay failed, retrying: %r", self.stream, exc)
                await asyncio.sleep(0.5)
                with contextlib.suppress(Exception):
                    await self.ensure_group()  # the stream was flushed away (a Redis restart)

    async def backlog(self) -> int:
        """Entries not yet relayed (for readiness and tests)."""
        n: Any = await self.redis.xlen(self.stream)
        return int(n)
