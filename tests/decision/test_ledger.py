"""The contact ledger on real Redis: first option with room, per-option reasons, idempotent
reservations, two windows on one channel, dry runs; and quiet hours across midnight."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from redis.asyncio import Redis

from services.decision.pipeline.model import Policy
from services.decision.pipeline.steps import address, quiet_until
from services.decision.policy.ledger import Cap, Ledger, Reservation
from shared.redis import Keys
from shared.stack import Stack

H = 3600
DAY = 86_400


def _caps(led: Ledger, cid: str, channel: str, *rules: tuple[int, int]) -> list[Cap]:
    key = led.channel_key(cid, channel)
    out = [Cap(key, 10**9, 90 * DAY, "", "log")]
    out += [Cap(key, m, w, f"{channel} {m}/{w}s", "policy") for m, w in rules]
    return out


async def test_first_option_with_room_idempotent_and_two_windows(stack: Stack) -> None:
    redis = Redis.from_url(stack.env["KAIROS_REDIS_URL"])
    led = Ledger(redis, Keys(f"{stack.env['KAIROS_REDIS_PREFIX']}-ledger-{uuid.uuid4().hex[:6]}"))
    cid = "c-1"
    t0 = 1_700_000_000_000
    try:
        push = _caps(led, cid, "push", (1, DAY), (2, 30 * DAY))  # one key, two windows
        sms = _caps(led, cid, "sms", (1, DAY))
        opts = [push, sms]
        (r,) = await led.reserve_many([Reservation("m1", opts)], t0)
        assert r.option == 0 and r.blocked == [None, None]
        (again,) = await led.reserve_many([Reservation("m1", opts)], t0 + 1000)
        assert again.option == 0  # asked again: the same answer, counted once
        (r2,) = await led.reserve_many([Reservation("m2", opts)], t0 + 2000)
        assert r2.option == 1 and r2.blocked[0] == push[1]  # push full today: SMS
        (r3,) = await led.reserve_many([Reservation("m3", opts)], t0 + 3000)
        assert r3.option is None and r3.blocked == [push[1], sms[1]]
        # two days later the daily push cap has room; the 30-day one still counts m1
        later = t0 + 2 * DAY * 1000
        (r4,) = await led.reserve_many([Reservation("m4", [push])], later)
        assert r4.option == 0
        (r5,) = await led.reserve_many([Reservation("m5", [push])], later + 3 * DAY * 1000)
        assert r5.option is None and r5.blocked == [push[2]]  # 2 per 30 days reached
        dry = await led.room(push, later + 3 * DAY * 1000)
        assert dry == push[2]
        assert await led.frees_at(push[2], later + 3 * DAY * 1000) == t0 + 30 * DAY * 1000 + 1
        # many customers in one call, each against its own caps
        many = [
            Reservation(f"x{i}", [_caps(led, f"c-{i + 10}", "sms", (1, DAY))]) for i in range(50)
        ]
        got = await led.reserve_many(many + many[:1], t0)
        assert [g.option for g in got] == [0] * 51
    finally:
        await redis.aclose()


def test_quiet_hours_in_the_customers_zone_across_midnight() -> None:
    policy = Policy.parse({"quiet_hours": {"start": "21:00", "end": "08:00"}})
    # 22:30 in Berlin (winter, UTC+1) → held until 08:00 Berlin the next morning
    now = datetime(2026, 11, 24, 21, 30, tzinfo=UTC)
    assert quiet_until(policy, "Europe/Berlin", now) == datetime(2026, 11, 25, 7, 0, tzinfo=UTC)
    # 06:00 in Tokyo → held until 08:00 the same morning
    now = datetime(2026, 11, 23, 21, 0, tzinfo=UTC)
    assert quiet_until(policy, "Asia/Tokyo", now) == datetime(2026, 11, 23, 23, 0, tzinfo=UTC)
    # daytime, no quiet hours, or an unknown zone read as UTC
    assert quiet_until(policy, "Europe/Berlin", datetime(2026, 11, 24, 12, tzinfo=UTC)) is None
    assert quiet_until(Policy(), "Europe/Berlin", now) is None
    assert quiet_until(policy, "Nowhere/Else", datetime(2026, 11, 24, 12, tzinfo=UTC)) is None


def test_addresses_per_channel() -> None:
    doc = {
        "customer_id": "c-1",
        "identities": {"email": "a@b.c", "msisdn": "+4915"},
        "devices": [{"platform": "ios", "token": "tok", "app_id": "a"}],
    }
    assert address(doc, "push") == {"devices": doc["devices"]}
    assert address(doc, "email") == {"email": "a@b.c"}
    assert address(doc, "sms") == {"msisdn": "+4915"}
    assert address(doc, "inapp") == {"customer_id": "c-1"}
    assert all(address({"customer_id": "c"}, c) is None for c in ("push", "email", "sms", "inapp"))
