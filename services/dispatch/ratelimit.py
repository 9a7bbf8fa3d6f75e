"""Provider rate limits shared by every dispatch replica: token buckets and throttles in Redis.

A bucket per channel holds up to one second of tokens and refills continuously at its rate
(``KAIROS_DISPATCH_RATE_LIMITS``); a sender takes the tokens for a whole claimed batch in one
round trip and waits as long as the script says for what is missing. A provider that answers
429 throttles its channel for every replica until its ``Retry-After`` has passed.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from redis.asyncio import Redis

from shared.redis import Keys

# KEYS[1] bucket hash {tokens, at}; ARGV rate/s, burst, wanted, now (ms).
# Returns {granted, wait_ms}: tokens taken now (≤ wanted) and, if short, when one more frees.
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1])
local at = tonumber(b[2])
if tokens == nil then tokens = burst; at = now end
tokens = math.min(burst, tokens + (now - at) * rate / 1000.0)
local granted = math.min(want, math.floor(tokens))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], 60000)
local wait = 0
if granted < want then wait = math.ceil((1 - (tokens - math.floor(tokens))) * 1000.0 / rate) end
return {granted, wait}
"""


def parse_limits(text: str) -> dict[str, float]:
    """``{"push": 3000, "sms": 100}`` → per-channel rates; refuses what is not a positive number."""
    raw = orjson.loads(text or "{}")
    if not isinstance(raw, dict):
        raise ValueError("KAIROS_DISPATCH_RATE_LIMITS must be a JSON object")
    out: dict[str, float] = {}
    for k, v in raw.items():
        if not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"KAIROS_DISPATCH_RATE_LIMITS[{k!r}] must be a positive number")
        out[str(k)] = float(v)
    return out


class RateLimiter:
    """Token buckets per channel and provider throttles, in Redis."""

    def __init__(self, redis: Redis, keys: Keys, limits: dict[str, float]) -> None:
        self.redis = redis
        self.keys = keys
        self.limits = limits
        self._take = redis.register_script(_TAKE)

    async def acquire(self, channel: str, n: int) -> None:
        """Wait until ``n`` sends on ``channel`` fit its rate (all replicas together)."""
        rate = self.limits.get(channel)
        if rate is None or n <= 0:
            return
        burst = max(1.0, rate)
        left = n
        while left > 0:
            granted, wait_ms = await self._take(
                keys=[self.keys("dispatch-bucket", channel)],
                args=[rate, burst, min(left, int(burst)), int(time.time() * 1000)],
            )
            left -= int(granted)
            if left > 0:
                await asyncio.sleep(max(int(wait_ms), 1) / 1000)

    async def throttle(self, provider: str, seconds: float) -> None:
        """Hold every replica's sends to ``provider`` for ``seconds`` (a 429)."""
        await self.redis.set(
            self.keys("dispatch-throttle", provider), "1", px=max(1, int(seconds * 1000))
        )

    async def throttled_for(self, providers: list[str]) -> float:
        """How long the most throttled of ``providers`` is still held (0 if none)."""
        if not providers:
            return 0.0
        async with self.redis.pipeline(transaction=False) as pipe:
            for p in providers:
                pipe.pttl(self.keys("dispatch-throttle", p))
            ttls = await pipe.execute()
        return max([int(t) / 1000 for t in ttls if int(t) > 0], default=0.0)
