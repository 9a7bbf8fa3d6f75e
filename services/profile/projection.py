"""The profile projection in Redis: what decisions read on their hot path.

``profile:{id}`` is a hash ``{v: version, d: orjson document}``. A Lua step writes
only if the version is newer, so a slow writer can never overwrite a newer view.
Erasure leaves a short-lived tombstone with the erasing version for the same reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson
from redis.asyncio import Redis

from shared.redis import Keys

_WRITE_IF_NEWER = """
local cur = redis.call('HGET', KEYS[1], 'v')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2])
if ARGV[3] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[3]) else redis.call('PERSIST', KEYS[1]) end
return 1
"""
TOMBSTONE_TTL_S = 3600


class Projection:
    """Writes and reads projected profiles."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._script = redis.register_script(_WRITE_IF_NEWER)

    async def write_many(self, docs: Iterable[dict[str, Any]]) -> None:
        """Write documents (each with ``customer_id`` and ``version``) in one pipeline."""
        pipe = self.redis.pipeline(transaction=False)
        n = 0
        for doc in docs:
            await self._script(
                keys=[self.keys.profile(doc["customer_id"])],
                args=[doc["version"], orjson.dumps(doc), 0],
                client=pipe,
            )
            n += 1
        if n:
            await pipe.execute()

    async def erase(self, customer_id: str, version: int) -> None:
        """Replace the projection with a tombstone that older writes cannot overwrite."""
        await self._script(
            keys=[self.keys.profile(customer_id)],
            args=[
                version,
                orjson.dumps({"customer_id": customer_id, "erased": True}),
                TOMBSTONE_TTL_S,
            ],
        )

    async def read(self, customer_id: str) -> dict[str, Any] | None:
        raw = await self.redis.hget(self.keys.profile(customer_id), "d")
        if raw is None:
            return None
        doc: dict[str, Any] = orjson.loads(raw)
        return None if doc.get("erased") else doc
