"""Propensity learning: Beta posteriors per (offer, treatment) in Redis.

- ``response.recorded``: accepted / clicked / converted count as successes, declined /
  dismissed as failures (by the response's ``offer_id`` and ``treatment``); any response
  answers the offer, so it leaves the pending set.
- ``contact.recorded`` (offered, not control): the offer joins the pending set of its
  (offer, treatment) with its time. An offer still pending after
  ``KAIROS_DECISION_UNANSWERED_S`` (default 3 days) decays into a failure: one Lua step per
  key moves the expired entries into the failure count, so several replicas sweeping at
  once count each offer once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from nats.aio.msg import Msg
from redis.asyncio import Redis

from services.decision.messages import parse
from shared.bus import PoisonMessage
from shared.contracts.bus import ContactRecorded, ResponseRecorded
from shared.events import CloudEvent
from shared.redis import Keys

log = logging.getLogger("kairos.decision.learning")
SUCCESS = frozenset({"accepted", "clicked", "converted"})
FAILURE = frozenset({"declined", "dismissed"})
_DECAY = """
local n = redis.call('ZCOUNT', KEYS[1], '-inf', ARGV[1])
if n > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
  redis.call('HINCRBY', KEYS[2], 'f', n)
end
return n
"""


def _payload(ev: CloudEvent) -> ContactRecorded | ResponseRecorded:
    if ev.type == ContactRecorded.TYPE:
        return parse(ev, ContactRecorded)
    if ev.type == ResponseRecorded.TYPE:
        return parse(ev, ResponseRecorded)
    raise PoisonMessage(f"unexpected event type {ev.type!r}")


class Learning:
    def __init__(self, redis: Redis, keys: Keys, *, unanswered_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.unanswered_s = unanswered_s
        self._decay = redis.register_script(_DECAY)

    def stats_key(self, offer: str, treatment: str) -> str:
        return self.keys("propensity", offer, treatment)

    def pending_key(self, offer: str, treatment: str) -> str:
        return self.keys.propensity_pending(offer, treatment)

    async def handle(self, batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
        """Offered contacts join the pending set; responses leave it and count. One write per
        (offer, treatment) and kind per batch: a run's page offers thousands of contacts
        over a few pairs (a write each cost this consumer most of its time)."""
        parsed = [_payload(ev) for _, ev in batch]
        now = time.time()
        offered: dict[tuple[str, str], dict[str, float]] = {}
        answered: dict[tuple[str, str], list[str]] = {}
        counted: dict[tuple[str, str, str], int] = {}
        for m in parsed:
            if not m.offer_id or not m.treatment or m.control:
                continue  # a control contact, or one without an offer: nothing to learn
            pair = (m.offer_id, m.treatment)
            if isinstance(m, ContactRecorded):
                if m.status == "offered":
                    offered.setdefault(pair, {})[m.tracking_id] = now
                continue
            answered.setdefault(pair, []).append(m.tracking_id)
            field = "s" if m.outcome in SUCCESS else "f" if m.outcome in FAILURE else None
            if field:
                counted[(*pair, field)] = counted.get((*pair, field), 0) + 1
        if not (offered or answered):
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            # Offers join before answers leave: an answer handled in the same batch as its
            # offer still takes it out of the pending set.
            for (offer, treatment), members in offered.items():
                pipe.zadd(self.pending_key(offer, treatment), members)
            if offered:
                pipe.sadd(
                    self.keys("propensity-pending-keys"), *(f"{o}\x00{t}" for o, t in offered)
                )
            for (offer, treatment), ids in answered.items():
                pipe.zrem(self.pending_key(offer, treatment), *ids)
            for (offer, treatment, field), n in counted.items():
                pipe.hincrby(self.stats_key(offer, treatment), field, n)
            await pipe.execute()

    async def sweep(self) -> int:
        """Unanswered offers older than the window become failures; returns how many."""
        cutoff = time.time() - self.unanswered_s
        moved = 0
        for member in await self.redis.smembers(self.keys("propensity-pending-keys")):
            text = member.decode() if isinstance(member, bytes) else str(member)
            offer, treatment = text.split("\x00", 1)
            moved += int(
                await self._decay(
                    keys=[self.pending_key(offer, treatment), self.stats_key(offer, treatment)],
                    args=[cutoff],
                )
            )
        return moved

    async def sweep_forever(self, every_s: float = 60.0) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                n = await self.sweep()
                if n:
                    log.info("%d unanswered offers counted as failures", n)
            except Exception as exc:  # Redis blips: the next sweep catches up
                log.warning("propensity sweep failed: %s", exc)
