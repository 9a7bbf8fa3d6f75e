"""The profile projection in Redis: what decisions read on their hot path.

``profile:{id}`` is a hash: ``v`` the version, ``p`` the profile part (attributes, tags,
consents, identities, devices, time zone …) and ``c`` the behaviour part (counters and last
event values). A Lua step writes only if the version is newer, so a slow writer can never
overwrite a newer view. Event batches change only counters: they rewrite ``c`` alone, and
only when Redis holds exactly the previous version (otherwise the caller writes it whole).
Erasure leaves a short-lived tombstone (with the erasure time) so that an in-flight write
of the erased profile cannot bring it back; a profile created after the erasure can.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from shared.redis import APPLIED_TTL_S, Keys, merge_parts

_WRITE = """
-- KEYS: profile keys; ARGV: mode, then version, created_at ms, p, c for each key
-- mode 'full' writes p and c when newer; mode 'counters' writes c only on top of v-1.
-- Returns the 1-based indexes of keys a 'counters' write could not apply.
local mode = ARGV[1]
local stale = {}
for i, key in ipairs(KEYS) do
  local base = 1 + 4 * (i - 1)
  local v, created, p, c = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4]
  local ok = true
  local erased = redis.call('HGET', key, 'e')
  local cur = redis.call('HGET', key, 'v')
  if erased then
    if tonumber(created) <= tonumber(erased) then ok = false
    elseif mode == 'full' then redis.call('DEL', key)
    else ok = false; table.insert(stale, i) end
  elseif mode == 'full' then
    if cur and tonumber(cur) >= tonumber(v) then ok = false end
  else
    if not cur then ok = false; table.insert(stale, i)
    elseif tonumber(cur) >= tonumber(v) then ok = false
    elseif tonumber(cur) ~= tonumber(v) - 1 then ok = false; table.insert(stale, i) end
  end
  if ok then
    if mode == 'full' then
      redis.call('HSET', key, 'v', v, 'p', p, 'c', c)
    else
      redis.call('HSET', key, 'v', v, 'c', c)
    end
  end
end
return stale
"""
_ERASE = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'e', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
_MARK = """
-- KEYS: applied markers; ARGV[1]: ttl, then the customer of each marker
local ttl = ARGV[1]
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'EX', ttl)
end
return #KEYS
"""
TOMBSTONE_TTL_S = 3600
CHUNK = 200
MARK_CHUNK = 2000


@dataclass(frozen=True)
class Doc:
    """One projection write: the profile part is None for a counters-only write."""

    customer_id: str
    version: int
    created_ms: int
    counters: bytes
    profile: bytes | None = None


class Projection:
    """Writes and reads projected profiles."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._write = redis.register_script(_WRITE)
        self._erase = redis.register_script(_ERASE)
        self._mark = redis.register_script(_MARK)

    async def write_many(self, docs: Sequence[Doc]) -> list[str]:
        """Write documents in chunks; returns customers whose counters-only write could not
        apply (Redis did not hold the previous version): write those whole."""
        stale: list[str] = []
        full = [d for d in docs if d.profile is not None]
        partial = [d for d in docs if d.profile is None]
        for mode, items in (("full", full), ("counters", partial)):
            for start in range(0, len(items), CHUNK):
                chunk = items[start : start + CHUNK]
                args: list[Any] = [mode]
                for d in chunk:
                    args += [d.version, d.created_ms, d.profile or b"", d.counters]
                missed = await self._write(
                    keys=[self.keys.profile(d.customer_id) for d in chunk], args=args
                )
                stale += [chunk[int(i) - 1].customer_id for i in missed]
        return stale

    async def mark_applied(self, owners: dict[str, str]) -> None:
        """After the projections are written: ``applied:{event id}`` names the customer each
        event landed on (after identity resolution), for ``APPLIED_TTL_S``. Triggers wait for
        it, so the rules they evaluate see the counters with the event in them."""
        items = list(owners.items())
        for start in range(0, len(items), MARK_CHUNK):  # one script call per chunk
            chunk = items[start : start + MARK_CHUNK]
            await self._mark(
                keys=[self.keys.applied(event_id) for event_id, _ in chunk],
                args=[APPLIED_TTL_S, *(cid for _, cid in chunk)],
            )

    async def erase(self, customer_id: str) -> None:
        """Replace the projection with a tombstone: writes of the erased profile are refused,
        a profile created again afterwards is accepted."""
        now_ms = int(time.time() * 1000)
        await self._erase(keys=[self.keys.profile(customer_id)], args=[now_ms, TOMBSTONE_TTL_S])

    async def read(self, customer_id: str) -> dict[str, Any] | None:
        """The projected profile (both parts merged), or None if absent or erased."""
        raw = await self.redis.hmget(self.keys.profile(customer_id), ["v", "p", "c"])
        return merge_parts(raw)
