"""The contact ledger: rolling-window caps checked and reserved in one atomic Redis step.

One sorted set per (customer, channel) and per (customer, campaign) holds contact times.
A reservation names every cap it must respect (global ``*``, the channel or touchpoint,
the campaign's re-entry); the Lua script drops expired entries, checks every count, and
only if all have room adds the contact to every set. Two replicas deciding for the same
customer at once therefore cannot both pass a cap. Outbound sends (triggers, batch runs)
use the same ledger, with ``on_cap`` telling them whether to defer or drop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from shared.redis import Keys

_RESERVE = """
-- KEYS: one sorted set per cap; ARGV: now_ms, member, ttl_s, then (window_ms, max) per key
local now = tonumber(ARGV[1])
local member = ARGV[2]
local ttl = tonumber(ARGV[3])
for i, key in ipairs(KEYS) do
  local window = tonumber(ARGV[2 + 2 * i])
  local max = tonumber(ARGV[3 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) >= max then
    return i
  end
end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, member)
  redis.call('EXPIRE', key, ttl)
end
return 0
"""


@dataclass(frozen=True)
class Cap:
    """One limit: at most ``max`` contacts per ``window_s`` on ``key``; ``label`` explains it."""

    key: str
    max: int
    window_s: int
    label: str


class Ledger:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._reserve = redis.register_script(_RESERVE)

    def channel_key(self, customer_id: str, channel: str) -> str:
        return self.keys("ledger", customer_id, channel)

    def campaign_key(self, customer_id: str, campaign_id: str) -> str:
        return self.keys("ledger", customer_id, "campaign", campaign_id)

    def history_key(self, customer_id: str, campaign_id: str) -> str:
        """Every contact of a campaign with this customer (90 days): what ``contacted`` reads."""
        return self.keys("contacts", customer_id, campaign_id)

    async def reserve(self, caps: Sequence[Cap], member: str, now_ms: int) -> Cap | None:
        """Count one contact against every cap, or none if any is full; returns the full cap."""
        if not caps:
            return None
        ttl = max(c.window_s for c in caps) + 60
        args: list[int | str] = [now_ms, member, ttl]
        for c in caps:
            args += [c.window_s * 1000, c.max]
        hit = int(await self._reserve(keys=[c.key for c in caps], args=args))
        return caps[hit - 1] if hit else None

    async def room(self, caps: Sequence[Cap], now_ms: int) -> Cap | None:
        """The first full cap without reserving (dry runs and explanations)."""
        if not caps:
            return None
        async with self.redis.pipeline(transaction=False) as pipe:
            for c in caps:
                pipe.zcount(c.key, now_ms - c.window_s * 1000 + 1, "+inf")
            counts = await pipe.execute()
        for c, n in zip(caps, counts, strict=True):
            if int(n) >= c.max:
                return c
        return None
