"""The batch planner of identity resolution, with no servers: whatever a batch holds (and
whatever the database held before it), applying its plan ends where handling its events one
at a time, with a pause between each, would end."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from services.profile.customers.service import ANON_PREFIX, EventData, _plan

T0 = datetime(2026, 11, 1, tzinfo=UTC)
ANONS = ["a1", "a2", "a3", "a4"]
CUSTOMERS = ["c1", "c2", "c3"]
ANON_PROFILES = [ANON_PREFIX + a for a in ANONS] + [ANON_PREFIX + "x"]


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[EventData], set[str], dict[str, str], dict[str, str]]:
    n = draw(st.integers(1, 14))
    events = []
    for i in range(n):
        anon = draw(st.none() | st.sampled_from(ANONS))
        cid = (
            draw(st.sampled_from(CUSTOMERS))
            if anon is None
            else draw(st.none() | st.sampled_from(CUSTOMERS))
        )
        events.append(
            EventData(
                id=f"e{i}",
                type=draw(st.sampled_from(["view", "open"])),
                customer_id=cid,
                anonymous_id=anon,
                time=T0,
                properties={},
            )
        )
    fresh = {e.id for e in events if draw(st.booleans()) or draw(st.booleans())}
    # What the database held: some customers merged into others, some anonymous ids owned
    # (by their own anonymous profile, a shared one, or a customer).
    resolved = {c: c for c in CUSTOMERS if draw(st.booleans())}
    if "c3" in resolved and draw(st.booleans()):
        resolved["c3"] = draw(st.sampled_from(["c1", "c2"]))
        resolved.setdefault(resolved["c3"], resolved["c3"])
    survivors = [c for c in CUSTOMERS if resolved.get(c) == c]
    anon_owner = {}
    for a in ANONS:
        choice = draw(st.sampled_from(["none", "own", "shared", "customer"]))
        if choice == "own":
            anon_owner[a] = ANON_PREFIX + a
        elif choice == "shared":
            anon_owner[a] = ANON_PREFIX + "x"
        elif choice == "customer" and survivors:
            anon_owner[a] = draw(st.sampled_from(survivors))
    return events, fresh, resolved, anon_owner


def _initial_counts(draw_counts: dict[str, int], anon_owner: dict[str, str]) -> dict[str, Counter]:
    """Every existing anonymous profile starts with some history (so folds must move it)."""
    return {p: Counter({"past": draw_counts.get(p, 1)}) for p in set(anon_owner.values())}


def _one_at_a_time(
    events: list[EventData],
    fresh: set[str],
    resolved: dict[str, str],
    anon_owner: dict[str, str],
    counts: dict[str, Counter],
) -> tuple[dict[str, Counter], dict[str, str]]:
    """The reference: each fresh event in order, as if each were a batch of its own."""
    merged: dict[str, str] = {c: s for c, s in resolved.items() if c != s}
    owner = dict(anon_owner)

    def survive(p: str) -> str:
        while p in merged:
            p = merged[p]
        return p

    for e in events:
        if e.id not in fresh:
            continue
        if e.customer_id:
            cid = survive(e.customer_id)
            if e.anonymous_id:
                cur = survive(owner[e.anonymous_id]) if e.anonymous_id in owner else None
                if cur is None:
                    owner[e.anonymous_id] = cid
                elif cur != cid and cur.startswith(ANON_PREFIX):
                    counts.setdefault(cid, Counter()).update(counts.pop(cur, Counter()))
                    merged[cur] = cid
        else:
            assert e.anonymous_id is not None
            if e.anonymous_id not in owner:
                owner[e.anonymous_id] = ANON_PREFIX + e.anonymous_id
            cid = survive(owner[e.anonymous_id])
        counts.setdefault(cid, Counter())[e.type] += 1
    return (
        {p: c for p, c in counts.items() if +c},
        {a: survive(p) for a, p in owner.items()},
    )


def _by_plan(
    events: list[EventData],
    fresh: set[str],
    resolved: dict[str, str],
    anon_owner: dict[str, str],
    counts: dict[str, Counter],
) -> tuple[dict[str, Counter], dict[str, str]]:
    """Apply the plan as apply_events does: folds, links, then every counted event."""
    plan = _plan(events, fresh, resolved, anon_owner)
    owner = dict(anon_owner)
    for target, source in plan.folds:
        assert source.startswith(ANON_PREFIX)
        assert not target.startswith(ANON_PREFIX)
        counts.setdefault(target, Counter()).update(counts.pop(source, Counter()))
        owner = {a: target if p == source else p for a, p in owner.items()}
    for a, p in plan.links.items():
        assert a not in anon_owner  # an owned identity never moves by a link
        owner[a] = p
    folded = {s for _, s in plan.folds}
    for cid, evs in plan.counted.items():
        assert cid not in folded  # nothing counts on a profile the batch folds away
        for e in evs:
            counts.setdefault(cid, Counter())[e.type] += 1
    assert sorted(e.id for evs in plan.counted.values() for e in evs) == sorted(
        e.id for e in events if e.id in fresh
    )
    assert set(plan.owner) == {e.id for e in events}
    return {p: c for p, c in counts.items() if +c}, owner


@settings(max_examples=300, deadline=None)
@given(cases(), st.dictionaries(st.sampled_from(ANON_PROFILES), st.integers(1, 5)))
def test_plan_equals_one_event_at_a_time(
    case: tuple[list[EventData], set[str], dict[str, str], dict[str, str]],
    history: dict[str, int],
) -> None:
    events, fresh, resolved, anon_owner = case
    ref = _one_at_a_time(events, fresh, resolved, anon_owner, _initial_counts(history, anon_owner))
    got = _by_plan(events, fresh, resolved, anon_owner, _initial_counts(history, anon_owner))
    assert got == ref


def test_burst_then_identify_counts_on_the_customer() -> None:
    """The reported case: three anonymous views, then the identifying event, one batch."""
    evs = [EventData(f"v{i}", "view", None, "a", T0, {}) for i in range(3)]
    evs.append(EventData("login", "login", "c", "a", T0, {}))
    plan = _plan(evs, {e.id for e in evs}, {}, {})
    assert plan.links == {"a": "c"}
    assert plan.folds == []
    assert {c: len(v) for c, v in plan.counted.items()} == {"c": 4}


def test_identify_folds_history_and_later_events_follow() -> None:
    evs = [
        EventData("login", "login", "c", "a", T0, {}),
        EventData("v", "view", None, "a", T0, {}),
    ]
    plan = _plan(evs, {"login", "v"}, {"c": "c"}, {"a": ANON_PREFIX + "a"})
    assert plan.folds == [("c", ANON_PREFIX + "a")]
    assert plan.owner == {"login": "c", "v": "c"}


def test_a_customers_anonymous_id_is_not_taken_by_another() -> None:
    evs = [EventData("x", "login", "d", "a", T0, {}), EventData("v", "view", None, "a", T0, {})]
    plan = _plan(evs, {"x", "v"}, {"c": "c"}, {"a": "c"})
    assert plan.folds == []
    assert plan.links == {}
    assert plan.owner == {"x": "d", "v": "c"}
