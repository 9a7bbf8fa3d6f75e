"""The touchpoint decision's one Redis step (every cap of the ranked candidates and their
contact records, atomically) and the relay of the outbox stream to JetStream, on the
suite's real Redis and NATS: a record exists exactly when its reservation does, and a
relay that dies between reading and acknowledging loses nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from redis.asyncio import Redis

from services.decision.policy.ledger import Cap, Ledger, Ranked, Record
from shared.bus import Bus
from shared.redis import Keys
from shared.stack import Stack
from shared.stream_outbox import GROUP, StreamOutbox
from tests.helpers import eventually

NOW = 1_800_000_000_000


@pytest.fixture
async def redis(stack: Stack) -> AsyncIterator[Redis]:
    r = Redis.from_url(stack.env["KAIROS_REDIS_URL"])
    yield r
    await r.aclose()


@pytest.fixture
def keys(stack: Stack) -> Keys:
    """Under the run's Redis prefix (removed with it), a namespace of the test's own."""
    return Keys(f"{stack.env['KAIROS_REDIS_PREFIX']}:ob{uuid.uuid4().hex[:8]}")


@pytest.fixture
def bus(scratch_bus: Bus) -> Bus:
    return scratch_bus


def _record(name: str) -> Record:
    eid = f"ev-{name}-{uuid.uuid4().hex[:6]}"
    return Record(
        "contact.recorded", eid, b'{"id": "%s"}' % eid.encode(), f"00-{'a' * 32}-{'b' * 16}-01"
    )


def _cap(ledger: Ledger, customer: str, channel: str, most: int) -> Cap:
    return Cap(ledger.channel_key(customer, channel), most, 86_400, f"{channel} full")


async def _entries(redis: Redis, ledger: Ledger) -> list[dict[bytes, bytes]]:
    return [f for _, f in await redis.xrange(ledger.outbox_key())]


async def test_candidates_are_reserved_in_order_with_their_records_in_one_step(
    redis: Redis, keys: Keys
) -> None:
    ledger = Ledger(redis, keys)
    customer = "c-1"
    shared = _cap(ledger, customer, "pos", 10)
    full = _cap(ledger, customer, "campaign-a", 1)
    assert await ledger.reserve([full], "earlier", NOW - 1000) is None  # its one slot taken
    ranked = [
        Ranked(f"t-{name}", [shared, cap], _record(name))
        for name, cap in (
            ("a", full),
            ("b", _cap(ledger, customer, "campaign-b", 1)),
            ("c", _cap(ledger, customer, "campaign-c", 1)),
            ("d", _cap(ledger, customer, "campaign-d", 1)),
        )
    ]
    control = _record("control")
    got = await ledger.reserve_ranked(ranked, 2, NOW, controls=[control])
    assert got == [full, None, None, False]
    records = await _entries(redis, ledger)
    assert [r[b"i"].decode() for r in records] == [
        ranked[1].record.event_id,
        ranked[2].record.event_id,
        control.event_id,
    ]
    assert records[0][b"d"] == ranked[1].record.data
    assert records[0][b"t"].decode() == ranked[1].record.traceparent
    assert records[0][b"s"] == b"contact.recorded"
    # the shared cap counts exactly the two reserved contacts, next to the earlier one
    members = {m.decode() for m in await redis.zrange(shared.key, 0, -1)}
    assert members == {"t-b", "t-c"}
    assert await redis.zrange(ranked[3].caps[1].key, 0, -1) == []
    # a full cap: nothing reserved, nothing recorded
    again = await ledger.reserve_ranked(ranked[1:2], 1, NOW + 1)
    assert again == [ranked[1].caps[1]]
    assert len(await _entries(redis, ledger)) == 3


async def _listen(bus: Bus) -> tuple[Any, list[Any]]:
    nc = await nats.connect(bus.url)
    got: list[Any] = []

    async def on(msg: Any) -> None:
        got.append(msg)

    await nc.jetstream().subscribe(bus.subject("contact.recorded"), cb=on, ordered_consumer=True)
    return nc, got


async def test_the_relay_publishes_every_record_once_and_empties_the_stream(
    redis: Redis, bus: Bus, keys: Keys
) -> None:
    ledger = Ledger(redis, keys)
    records = [_record(str(i)) for i in range(30)]
    await ledger.reserve_ranked([], 0, NOW, controls=records)
    relay = StreamOutbox(redis, bus, ledger.outbox_key(), "replica-1")
    await relay.ensure_group()
    nc, got = await _listen(bus)
    try:
        while await relay.relay_once():
            pass
        await eventually(lambda: _now(len(got)), lambda n: n >= 30)
        assert [m.headers["Nats-Msg-Id"] for m in got] == [r.event_id for r in records]
        assert got[0].headers["traceparent"] == records[0].traceparent
        assert got[0].data == records[0].data
        assert await relay.backlog() == 0
    finally:
        await nc.close()


async def test_records_a_dead_relay_had_read_are_claimed_and_published(
    redis: Redis, bus: Bus, keys: Keys
) -> None:
    ledger = Ledger(redis, keys)
    records = [_record(str(i)) for i in range(5)]
    await ledger.reserve_ranked([], 0, NOW, controls=records)
    dead = StreamOutbox(redis, bus, ledger.outbox_key(), "replica-dead")
    await dead.ensure_group()
    # the dead replica read them, then was killed before publishing and acknowledging
    taken = await redis.xreadgroup(GROUP, "replica-dead", {ledger.outbox_key(): ">"}, count=10)
    assert len(taken[0][1]) == 5
    alive = StreamOutbox(redis, bus, ledger.outbox_key(), "replica-alive", claim_idle_ms=50)
    nc, got = await _listen(bus)
    try:

        async def relayed() -> int:
            await alive.relay_once()
            return len(got)

        await eventually(relayed, lambda n: n >= 5)
        assert sorted(m.headers["Nats-Msg-Id"] for m in got) == sorted(r.event_id for r in records)
        assert await alive.backlog() == 0
    finally:
        await nc.close()


async def test_with_nats_down_records_wait_in_redis(redis: Redis, bus: Bus, keys: Keys) -> None:
    ledger = Ledger(redis, keys)
    await ledger.reserve_ranked([], 0, NOW, controls=[_record("x"), _record("y")])
    down = Bus(bus.url, prefix=bus.prefix)  # never connected: every publish fails
    relay = StreamOutbox(redis, down, ledger.outbox_key(), "replica-1", claim_idle_ms=50)
    await relay.ensure_group()
    with pytest.raises(RuntimeError):
        await relay.relay_once()
    assert await relay.backlog() == 2
    back = StreamOutbox(redis, bus, ledger.outbox_key(), "replica-1", claim_idle_ms=50)
    nc, got = await _listen(bus)
    try:

        async def relayed() -> int:
            await back.relay_once()
            return len(got)

        await eventually(relayed, lambda n: n >= 2)
        assert await back.backlog() == 0
    finally:
        await nc.close()


async def _now(value: Any) -> Any:
    await asyncio.sleep(0)
    return value
