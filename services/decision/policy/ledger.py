"""The contact ledger: rolling-window caps checked and reserved in one atomic Redis step.

One sorted set per (customer, channel or touchpoint) and per (customer, campaign) holds
contact times. A reservation names every cap it must respect (global ``*``, the channel
or touchpoint, the campaign's re-entry); the Lua script checks every count and only if
all have room adds the contact to every set. Two replicas deciding for the same customer
at once therefore cannot both pass a cap.

Outbound sends offer several *options* (channels in order of preference): the script
reserves the first option whose caps all have room and reports, per option, which cap
was full. Many customers go in one call (batch runs, trigger batches). A reservation is
idempotent by its member (the tracking id): asked again, it answers the option it took
the first time without counting twice, so a redelivered event or a resumed run never
contacts anyone twice.

Each set is trimmed to the longest window of the call (at least the 90-day history),
never to one cap's window, so two rules on one channel with different windows (push
1/24h and 5/30d) both see their whole window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from redis.asyncio import Redis

from shared.redis import Keys

_RESERVE = """
-- ARGV: now_ms, ttl_ms, dry (0|1), n; per reservation: member, n_options; per option:
--   n_caps; per cap: window_ms, max. KEYS: every cap's key, in the same order.
-- Returns per reservation {chosen, blocked_1, ..., blocked_n}: chosen is the 1-based
-- option reserved (0: none); blocked_i the 1-based cap of option i that was full (0: none).
local now = tonumber(ARGV[1])
local ttl_ms = tonumber(ARGV[2])
local dry = ARGV[3] == '1'
local n = tonumber(ARGV[4])
local a, k = 5, 1
local out = {}
local trimmed = {}
for r = 1, n do
  local member = ARGV[a]
  local nopt = tonumber(ARGV[a + 1])
  a = a + 2
  local opts = {}
  for o = 1, nopt do
    local ncap = tonumber(ARGV[a])
    a = a + 1
    local caps = {}
    for j = 1, ncap do
      caps[j] = {KEYS[k], tonumber(ARGV[a]), tonumber(ARGV[a + 1])}
      k = k + 1
      a = a + 2
    end
    opts[o] = caps
  end
  local res = {0}
  for o = 1, nopt do
    res[o + 1] = 0
    if #opts[o] > 0 and redis.call('ZSCORE', opts[o][1][1], member) then
      res[1] = o
    end
  end
  if res[1] == 0 then
    for o = 1, nopt do
      local full = 0
      for j, cap in ipairs(opts[o]) do
        if not trimmed[cap[1]] then
          redis.call('ZREMRANGEBYSCORE', cap[1], '-inf', now - ttl_ms)
          trimmed[cap[1]] = true
        end
        if redis.call('ZCOUNT', cap[1], '(' .. (now - cap[2]), '+inf') >= cap[3] then
          full = j
          break
        end
      end
      res[o + 1] = full
      if full == 0 then
        res[1] = o
        if not dry then
          for _, cap in ipairs(opts[o]) do
            redis.call('ZADD', cap[1], now, member)
            redis.call('PEXPIRE', cap[1], ttl_ms)
          end
        end
        break
      end
    end
  end
  out[r] = res
end
return out
"""
HISTORY_S = 90 * 86_400


@dataclass(frozen=True)
class Cap:
    """At most ``max`` contacts per ``window_s`` on ``key``.

    ``kind`` says what it is (``policy``, ``reentry``, or ``log`` for sets that only
    record), ``label`` explains a full cap to a person, ``on_cap`` is the policy's
    ``drop`` or ``defer``.
    """

    key: str
    max: int
    window_s: int
    label: str
    kind: str = "policy"
    on_cap: str = "drop"


@dataclass(frozen=True)
class Reservation:
    """One contact to count: ``member`` (its tracking id) under the first option with room."""

    member: str
    options: Sequence[Sequence[Cap]]


@dataclass
class Reserved:
    option: int | None  # the 0-based option taken, None when every option was full
    blocked: list[Cap | None] = field(default_factory=list)  # per option, its full cap


class Ledger:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._reserve = redis.register_script(_RESERVE)
        self._ranked = redis.register_script(_RESERVE_RANKED)

    def channel_key(self, customer_id: str, channel: str) -> str:
        return self.keys("ledger", customer_id, channel)

    def campaign_key(self, customer_id: str, campaign_id: str) -> str:
        return self.keys("ledger", customer_id, "campaign", campaign_id)

    def history_key(self, customer_id: str, campaign_id: str) -> str:
        """Every contact of a campaign with this customer (90 days): what ``contacted`` reads."""
        return self.keys("contacts", customer_id, campaign_id)

    async def reserve_many(
        self, items: Sequence[Reservation], now_ms: int, *, dry: bool = False
    ) -> list[Reserved]:
        """Reserve each item under its first option with room (``dry``: only look)."""
        if not items:
            return []
        keys: list[str] = []
        args: list[int | str] = [now_ms, 0, 1 if dry else 0, len(items)]
        longest = HISTORY_S
        for it in items:
            args += [it.member, len(it.options)]
            for opt in it.options:
                args.append(len(opt))
                for c in opt:
                    keys.append(c.key)
                    args += [c.window_s * 1000, c.max]
                    longest = max(longest, c.window_s)
        args[1] = (longest + 60) * 1000
        raw = await self._reserve(keys=keys, args=args)
        out = []
        for it, res in zip(items, raw, strict=True):
            chosen = int(res[0])
            blocked = [
                it.options[i][int(b) - 1] if int(b) else None
                for i, b in enumerate(res[1 : 1 + len(it.options)])
            ]
            out.append(Reserved(chosen - 1 if chosen else None, blocked))
        return out

    async def reserve(self, caps: Sequence[Cap], member: str, now_ms: int) -> Cap | None:
        """Count one contact against every cap, or none if any is full; returns the full cap."""
        if not caps:
            return None
        (res,) = await self.reserve_many([Reservation(member, [caps])], now_ms)
        return None if res.option is not None else res.blocked[0]

    async def room(self, caps: Sequence[Cap], now_ms: int) -> Cap | None:
        """The first full cap without reserving (dry runs and explanations)."""
        if not caps:
            return None
        (res,) = await self.reserve_many([Reservation("", [caps])], now_ms, dry=True)
        return None if res.option is not None else res.blocked[0]

    async def holding(self, asks: Sequence[tuple[str, str]]) -> list[bool]:
        """Whether each (key, member) is recorded: a contact reserved before."""
        if not asks:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, member in asks:
                pipe.zscore(key, member)
            raw = await pipe.execute()
        return [v is not None for v in raw]

    async def frees_at(self, cap: Cap, now_ms: int) -> int:
        """When a full cap gets room again (ms): its oldest contact in the window leaves it."""
        first = await self.redis.zrangebyscore(
            cap.key, f"({now_ms - cap.window_s * 1000}", "+inf", start=0, num=1, withscores=True
        )
        if not first:
            return now_ms
        return int(first[0][1]) + cap.window_s * 1000 + 1

    def outbox_key(self) -> str:
        """The stream of contact records waiting for the relay to JetStream."""
        return self.keys("outbox", "contact")

    async def reserve_ranked(
        self, ranked: Sequence[Ranked], limit: int, now_ms: int, controls: Sequence[Record] = ()
    ) -> list[Cap | None | bool]:
        """Reserve candidates in order until ``limit`` are; per candidate: None reserved (its
        record is in the outbox), the full Cap, or False when the limit was reached first.
        Control records are written whatever happens to the candidates."""
        if not ranked and not controls:
            return []
        keys = [self.outbox_key()]
        args: list[int | str | bytes] = [now_ms, 0, limit, len(ranked), len(controls)]
        longest = HISTORY_S
        for r in ranked:
            args += [r.member, len(r.caps)]
            for c in r.caps:
                keys.append(c.key)
                args += [c.window_s * 1000, c.max]
                longest = max(longest, c.window_s)
            args += [r.record.subject, r.record.event_id, r.record.data, r.record.traceparent]
        for rec in controls:
            args += [rec.subject, rec.event_id, rec.data, rec.traceparent]
        args[1] = (longest + 60) * 1000
        raw = await self._ranked(keys=keys, args=args)
        out: list[Cap | None | bool] = []
        for r, res in zip(ranked, raw, strict=True):
            v = int(res)
            out.append(None if v == 0 else False if v < 0 else r.caps[v - 1])
        return out


_RESERVE_RANKED = """
-- A touchpoint decision's contacts in one atomic step: reserve the ranked candidates in
-- order until LIMIT are reserved, appending the contact record of each reserved one, and
-- of every control-group hold-out, to the outbox stream (relayed to JetStream later).
-- KEYS[1]: the outbox stream; KEYS[2..]: every candidate's caps, in candidate order.
-- ARGV: now_ms, ttl_ms, limit, n_candidates, n_controls;
--   per candidate: member, n_caps, window_ms and max per cap, then its record;
--   per control: its record. A record is subject, event id, bytes, traceparent.
-- Returns per candidate: 0 reserved, j > 0 its cap j was full, -1 not tried (limit reached).
local now = tonumber(ARGV[1])
local ttl_ms = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local nctl = tonumber(ARGV[5])
local stream = KEYS[1]
local a, k, got = 6, 2, 0
local out = {}
local trimmed = {}
local function record(i)
  redis.call('XADD', stream, '*', 's', ARGV[i], 'i', ARGV[i + 1], 'd', ARGV[i + 2],
    't', ARGV[i + 3])
end
for r = 1, n do
  local member = ARGV[a]
  local ncap = tonumber(ARGV[a + 1])
  a = a + 2
  local caps = {}
  for j = 1, ncap do
    caps[j] = {KEYS[k], tonumber(ARGV[a]), tonumber(ARGV[a + 1])}
    k = k + 1
    a = a + 2
  end
  if got >= limit then
    out[r] = -1
  else
    local full = 0
    for j, cap in ipairs(caps) do
      if not trimmed[cap[1]] then
        redis.call('ZREMRANGEBYSCORE', cap[1], '-inf', now - ttl_ms)
        trimmed[cap[1]] = true
      end
      if redis.call('ZCOUNT', cap[1], '(' .. (now - cap[2]), '+inf') >= cap[3] then
        full = j
        break
      end
    end
    out[r] = full
    if full == 0 then
      for _, cap in ipairs(caps) do
        redis.call('ZADD', cap[1], now, member)
        redis.call('PEXPIRE', cap[1], ttl_ms)
      end
      record(a)
      got = got + 1
    end
  end
  a = a + 4
end
for c = 1, nctl do
  record(a)
  a = a + 4
end
return out
"""


@dataclass(frozen=True)
class Record:
    """A bus message written to the outbox stream: logical subject, event id, bytes, and the
    writer's trace context (``traceparent``, empty without tracing)."""

    subject: str
    event_id: str
    data: bytes
    traceparent: str = ""


@dataclass(frozen=True)
class Ranked:
    """One ranked candidate: its tracking id, every cap it must respect, its contact record."""

    member: str
    caps: Sequence[Cap]
    record: Record
