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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from redis.asyncio import Redis

from shared.redis import APPLIED_TTL_S, Keys, merge_parts

_WRITE = """
-- KEYS: n profile keys, then the applied markers of their events (in profile order)
-- ARGV: mode, marker ttl, n, then per profile: version, created_at ms, p, c, customer id,
--       number of its markers
-- mode 'full' writes p and c when newer; mode 'counters' writes c only on top of v-1.
-- A profile's markers are set when Redis holds its version (or a newer one) afterwards,
-- so whoever sees a marker reads a projection with that event in it.
-- Returns {1-based indexes of keys a 'counters' write could not apply,
--          1-based indexes of profiles whose markers were not set}.
local mode, ttl, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local stale, unmarked = {}, {}
local m = n
for i = 1, n do
  local key = KEYS[i]
  local base = 4 + 6 * (i - 1)
  local v, created, p, c = ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local cid, marks = ARGV[base + 4], tonumber(ARGV[base + 5])
  local ok, holds = true, true
  local held = redis.call('HMGET', key, 'e', 'v')
  local erased, cur = held[1], held[2]
  if erased then
    if tonumber(created) <= tonumber(erased) then ok = false; holds = false
    elseif mode == 'full' then redis.call('DEL', key)
    else ok = false; holds = false; table.insert(stale, i) end
  elseif mode == 'full' then
    if cur and tonumber(cur) >= tonumber(v) then ok = false end
  else
    if not cur then ok = false; holds = false; table.insert(stale, i)
    elseif tonumber(cur) >= tonumber(v) then ok = false
    elseif tonumber(cur) ~= tonumber(v) - 1 then
      ok = false; holds = false; table.insert(stale, i)
    end
  end
  if ok then
    if mode == 'full' then
      redis.call('HSET', key, 'v', v, 'p', p, 'c', c)
    else
      redis.call('HSET', key, 'v', v, 'c', c)
    end
  end
  if holds then
    for j = 1, marks do redis.call('SET', KEYS[m + j], cid, 'EX', ttl) end
  elseif marks > 0 then
    table.insert(unmarked, i)
  end
  m = m + marks
end
return {stale, unmarked}
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


def _s(v: Any) -> str:
    return orjson.dumps(v).decode()


def profile_part(
    customer_id: str,
    attributes: str,
    tags: Sequence[str],
    consents: str,
    identities: str,
    devices: str,
    timezone: str | None,
    locale: str | None,
    created_at: datetime,
    updated_at: datetime,
) -> bytes:
    """The profile part of a projection document: the one place its shape is written down.
    The JSON values come as text (Postgres' output, or what an import staged), so they are
    put in as they are rather than parsed and printed again."""
    return (
        f'{{"customer_id":{_s(customer_id)},"attributes":{attributes},"tags":{_s(tags)},'
        f'"consents":{consents},"identities":{identities},"devices":{devices},'
        f'"timezone":{_s(timezone)},"locale":{_s(locale)},'
        f'"created_at":{_s(created_at)},"updated_at":{_s(updated_at)}}}'
    ).encode()


def counters_part(counters: str, last: str, updated_at: datetime) -> bytes:
    """The behaviour part of a projection document (counters and last event values)."""
    return f'{{"counters":{counters},"last":{last},"updated_at":{_s(updated_at)}}}'.encode()


def doc_from_row(row: Sequence[Any]) -> Doc:
    """A projection document from a row of ``projection_columns`` (the profile service's
    repository): the profile part is left out (a counters-only write) when the row did not
    read it."""
    cid, version, created_ms, attrs, tags, consents, idents, devices, tz, lc, cat, uat = row[:12]
    counters = counters_part(row[12] or "{}", row[13] or "{}", uat)
    if attrs is None:
        return Doc(cid, int(version), int(created_ms), counters)
    profile = profile_part(cid, attrs, tags, consents, idents, devices, tz, lc, cat, uat)
    return Doc(cid, int(version), int(created_ms), counters, profile)


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
        stale, _ = await self.write_applied(docs, {})
        return stale

    async def write_applied(
        self, docs: Sequence[Doc], owners: Mapping[str, str]
    ) -> tuple[list[str], dict[str, str]]:
        """Write documents and, in the same script, the ``applied`` markers of the events
        they hold (``owners``: event id → the customer it landed on): a marker is never seen
        before the projection that has its event. Returns the stale customers (as
        ``write_many``) and the markers left to set (their customer's document was stale,
        refused or not among ``docs``) for :meth:`mark_applied` once those are rewritten."""
        by_customer: dict[str, list[str]] = {}
        for event_id, cid in owners.items():
            by_customer.setdefault(cid, []).append(event_id)
        stale: list[str] = []
        written: set[str] = set()
        full = [d for d in docs if d.profile is not None]
        partial = [d for d in docs if d.profile is None]
        for mode, items in (("full", full), ("counters", partial)):
            for start in range(0, len(items), CHUNK):
                chunk = items[start : start + CHUNK]
                args: list[Any] = [mode, APPLIED_TTL_S, len(chunk)]
                markers: list[str] = []
                for d in chunk:
                    marks = by_customer.get(d.customer_id, ())
                    args += [
                        d.version,
                        d.created_ms,
                        d.profile or b"",
                        d.counters,
                        d.customer_id,
                        len(marks),
                    ]
                    markers += [self.keys.applied(e) for e in marks]
                missed, unmarked = await self._write(
                    keys=[*(self.keys.profile(d.customer_id) for d in chunk), *markers],
                    args=args,
                )
                stale += [chunk[int(i) - 1].customer_id for i in missed]
                left = {chunk[int(i) - 1].customer_id for i in unmarked}
                written.update(d.customer_id for d in chunk if d.customer_id not in left)
        rest = {e: c for e, c in owners.items() if c not in written}
        return stale, rest

    async def mark_applied(self, owners: dict[str, str]) -> None:
        """After the projections are written: ``applied:{event id}`` names the customer each
        event landed on (after identity resolution), for ``APPLIED_TTL_S``. A trigger that
        sees it knows the projection has the event; without it, the event is not in the
        projection yet (``write_applied`` sets both at once) and the trigger adds it itself."""
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
