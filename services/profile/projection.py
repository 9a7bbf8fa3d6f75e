"""The profile projection in Redis: what decisions read on their hot path.

``profile:{id}`` is a hash ``{v: version, d: orjson document}``. A Lua step writes
only if the version is newer, so a slow writer can never overwrite a newer view.
Erasure leaves a short-lived tombstone (with the erasure time) so that an in-flight write
of the erased profile cannot bring it back; a profile created after the erasure can.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson
from redis.asyncio import Redis

from shared.redis import Keys

_WRITE_IF_NEWER = """
-- KEYS: profile keys; ARGV: version, document, created_at ms for each key in turn
local written = 0
for i, key in ipairs(KEYS) do
  local v, doc, created = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  local ok = true
  local erased = redis.call('HGET', key, 'e')
  if erased then
    -- only a profile created after the erasure may replace the tombstone
    if tonumber(created) <= tonumber(erased) then ok = false else redis.call('HDEL', key, 'e') end
  else
    local cur = redis.call('HGET', key, 'v')
    if cur and tonumber(cur) >= tonumber(v) then ok = false end
  end
  if ok then
    redis.call('HSET', key, 'v', v, 'd', doc)
    redis.call('PERSIST', key)
    written = written + 1
  end
end
return written
"""
_ERASE = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'e', ARGV[1], 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
TOMBSTONE_TTL_S = 3600


class Projection:
    """Writes and reads projected profiles."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._script = redis.register_script(_WRITE_IF_NEWER)
        self._erase = redis.register_script(_ERASE)

    async def write_many(self, docs: Sequence[tuple[str, int, int, bytes]]) -> int:
        """Write (customer id, version, created_at ms, JSON) documents, 200 per script call;
        returns how many were newer than what Redis held."""
        written = 0
        for start in range(0, len(docs), 200):
            chunk = docs[start : start + 200]
            args: list[Any] = []
            for _, version, created_ms, raw in chunk:
                args += [version, raw, created_ms]
            written += int(
                await self._script(keys=[self.keys.profile(d[0]) for d in chunk], args=args)
            )
        return written

    async def erase(self, customer_id: str) -> None:
        """Replace the projection with a tombstone: writes of the erased profile are refused,
        a profile created again afterwards is accepted."""
        now_ms = int(time.time() * 1000)
        tomb = orjson.dumps({"customer_id": customer_id, "erased": True})
        await self._erase(
            keys=[self.keys.profile(customer_id)], args=[now_ms, tomb, TOMBSTONE_TTL_S]
        )

    async def read(self, customer_id: str) -> dict[str, Any] | None:
        raw = await self.redis.hget(self.keys.profile(customer_id), "d")
        if raw is None:
            return None
        doc: dict[str, Any] = orjson.loads(raw)
        return None if doc.get("erased") else doc
