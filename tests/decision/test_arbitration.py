"""Arbitration without servers: stable hashes, weighted splits, Thompson sampling."""

from __future__ import annotations

import asyncio
import os
import random

from redis.asyncio import Redis

from services.decision import arbitration
from services.decision.learning import Learning
from services.decision.pipeline.propensities import Propensities
from shared.contracts.bus import ContactRecorded, ResponseRecorded
from shared.events import CloudEvent
from shared.redis import Keys
from shared.stack import Stack


def test_control_membership_is_stable_and_close_to_its_share() -> None:
    ids = [f"c-{i}" for i in range(20_000)]
    first = [arbitration.in_control(c, "cmp-1", 0.1) for c in ids]
    assert first == [arbitration.in_control(c, "cmp-1", 0.1) for c in ids]
    assert 0.09 < sum(first) / len(ids) < 0.11
    other = [arbitration.in_control(c, "cmp-2", 0.1) for c in ids]
    overlap = sum(a and b for a, b in zip(first, other, strict=True)) / len(ids)
    assert overlap < 0.02  # campaigns draw independent control groups (≈ 0.1 × 0.1)
    assert not any(arbitration.in_control(c, "cmp-1", 0.0) for c in ids[:100])


def test_weighted_treatments_split_by_weight() -> None:
    ts = [{"id": "A", "weight": 3}, {"id": "B", "weight": 1}]
    picks = [arbitration.by_weight(f"c-{i}", "cmp-1", ts)["id"] for i in range(20_000)]
    assert 0.72 < picks.count("A") / len(picks) < 0.78
    assert picks == [arbitration.by_weight(f"c-{i}", "cmp-1", ts)["id"] for i in range(20_000)]


def test_thompson_sampling_tries_new_offers_and_prefers_proven_ones() -> None:
    rng = random.Random(1)
    proven_bad = [arbitration.propensity(2, 98, rng) for _ in range(2000)]
    new = [arbitration.propensity(0, 0, rng) for _ in range(2000)]
    wins = sum(n > b for n, b in zip(new, proven_bad, strict=True))
    assert wins > 1800  # an unknown offer usually beats one known to convert 2 %
    good = [arbitration.propensity(60, 40, rng) for _ in range(2000)]
    assert sum(g > n for g, n in zip(good, new, strict=True)) > 1000  # but not always


def test_score_multiplies_priority_propensity_value_and_tier_fit() -> None:
    assert arbitration.score(50, 0.5, 4.0, False) == 1.0
    assert arbitration.score(50, 0.5, 4.0, True) == 1.2
    assert arbitration.score(100, 0.5, -3.0, False) == 0.0


async def test_unanswered_offers_decay_into_failures_once(stack: Stack) -> None:
    """Two sweepers at once (two replicas) count an unanswered offer as one failure."""
    env = stack.env
    redis = Redis.from_url(env["KAIROS_REDIS_URL"])
    keys = Keys(env["KAIROS_REDIS_PREFIX"] + "-learning-" + str(os.getpid()))
    a = Learning(redis, keys, unanswered_s=0.0)
    b = Learning(redis, keys, unanswered_s=0.0)

    def contact(tracking: str) -> tuple[None, CloudEvent]:
        msg = ContactRecorded(
            tracking_id=tracking, customer_id="c", campaign_id="k", offer_id="o-1", treatment="A"
        )
        return None, msg.to_event(source="t")[1]

    accepted = ResponseRecorded(
        tracking_id="t3",
        customer_id="c",
        campaign_id="k",
        outcome="accepted",
        time="2026-01-01T00:00:00Z",
        offer_id="o-1",
        treatment="A",
    )
    try:
        await a.handle(
            [  # type: ignore[list-item]
                contact("t1"),
                contact("t2"),
                contact("t3"),
                (None, accepted.to_event(source="t")[1]),
            ]
        )
        moved = await asyncio.gather(a.sweep(), b.sweep())
        assert sum(moved) == 2  # t1 and t2, once; t3 was answered
        stats = await redis.hgetall(keys("propensity", "o-1", "A"))
        assert stats == {b"s": b"1", b"f": b"2"}
    finally:
        async for k in redis.scan_iter(match=keys("*")):
            await redis.delete(k)
        await redis.aclose()


async def test_ranking_reads_what_learning_wrote_once_refreshed(stack: Stack) -> None:
    """Ranking's statistics are held in memory: a pair reads its (successes, failures) after
    a refresh, and the uninformed prior until then (a pair just added to the catalog)."""
    env = stack.env
    redis = Redis.from_url(env["KAIROS_REDIS_URL"])
    keys = Keys(env["KAIROS_REDIS_PREFIX"] + "-propensities-" + str(os.getpid()))
    held = Propensities(redis, keys)
    try:
        await redis.hset(keys("propensity", "o-1", "A"), mapping={"s": 7, "f": 3})
        assert held.of("o-1", "A") == (0.0, 0.0)
        await held.refresh([("o-1", "A"), ("o-2", "B")])
        assert held.of("o-1", "A") == (7.0, 3.0)
        assert held.of("o-2", "B") == (0.0, 0.0)  # nothing learnt yet
        await redis.hincrby(keys("propensity", "o-1", "A"), "s", 1)
        task = asyncio.create_task(held.forever(lambda: [("o-1", "A")]))
        try:
            for _ in range(100):
                if held.of("o-1", "A") == (8.0, 3.0):
                    break
                await asyncio.sleep(0.05)
            assert held.of("o-1", "A") == (8.0, 3.0)
        finally:
            task.cancel()
    finally:
        async for k in redis.scan_iter(match=keys("*")):
            await redis.delete(k)
        await redis.aclose()
