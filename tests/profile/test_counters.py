"""Rolling counters over time buckets (pure logic)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from shared import counters

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def test_windows_count_by_age() -> None:
    b = counters.empty()
    for age in (
        timedelta(minutes=5),
        timedelta(hours=3),
        timedelta(days=3),
        timedelta(days=20),
        timedelta(days=60),
        timedelta(days=120),
    ):
        counters.add(b, NOW - age, NOW)
    w = counters.windows(b, NOW)
    assert w == {"1h": 1, "1d": 2, "7d": 3, "30d": 4, "90d": 5}


def test_windows_slide_with_time() -> None:
    b = counters.empty()
    counters.add(b, NOW, NOW)
    assert counters.windows(b, NOW + timedelta(minutes=30))["1h"] == 1
    assert counters.windows(b, NOW + timedelta(hours=2))["1h"] == 0
    assert counters.windows(b, NOW + timedelta(hours=2))["1d"] == 1
    assert counters.windows(b, NOW + timedelta(days=8))["7d"] == 0
    assert counters.windows(b, NOW + timedelta(days=8))["30d"] == 1


def test_buckets_stay_bounded() -> None:
    b = counters.empty()
    for i in range(0, 200 * 24):
        t = NOW - timedelta(hours=i)
        counters.add(b, t, NOW)
    assert len(b["m"]) <= 25 * 6 + 1
    assert len(b["d"]) <= 90


def test_merge_adds_up() -> None:
    a, b = counters.empty(), counters.empty()
    counters.add(a, NOW, NOW)
    counters.add(b, NOW, NOW)
    counters.add(b, NOW - timedelta(days=2), NOW)
    counters.merge(a, b, NOW)
    assert counters.windows(a, NOW) == {"1h": 2, "1d": 2, "7d": 3, "30d": 3, "90d": 3}


@given(st.lists(st.integers(min_value=0, max_value=100 * 86400), max_size=50))
def test_windows_are_monotonic(ages: list[int]) -> None:
    b = counters.empty()
    for a in ages:
        counters.add(b, NOW - timedelta(seconds=a), NOW)
    w = counters.windows(b, NOW)
    assert w["1h"] <= w["1d"] <= w["7d"] <= w["30d"] <= w["90d"] <= len(ages)
    assert w["90d"] == sum(
        1 for a in ages if (NOW - timedelta(seconds=a)).date() > (NOW - timedelta(days=90)).date()
    )
