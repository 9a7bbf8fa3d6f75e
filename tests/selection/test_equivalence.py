"""Two engines, one meaning: the population index selects exactly the customers the
hot-path evaluator (shared.rules) accepts, for random rules over random profiles,
including profiles that were updated (full and partial) or erased after indexing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.selection import index
from services.selection.index import Change, Population
from shared import counters, rules

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
ATTRS = ["age", "region", "arpu", "vip", "since", "langs"]
TAGS = ["value:gold", "value:silver", "device:ios", "churn:risk", "interest:travel"]
EVENTS = ["topup", "app.opened"]
CAMPAIGNS = ["cmp-1", "cmp-2"]
STRINGS = ["north", "south", "North", "no", "", "2026-11-01", "2026-11-01T00:00:00Z", "2027-01-15"]

# Values as profiles really hold them: ints and floats (below 2**53, where float64 is
# exact), strings that may or may not be ISO dates, booleans, lists, nulls. Drawn from
# fixed pools so that Hypothesis spends its examples on combinations, not on generation.
NUMBERS = [-3, 0, 1, 3, 18, 34, 0.5, -2.25, 34.0, 41.5, 1e9]
SCALARS = [*NUMBERS, *STRINGS, True, False]
VALUES = [*SCALARS, None, ["north", 3], [True], []]
scalar = st.sampled_from(SCALARS)
value = st.sampled_from(VALUES)


def _counter(*minutes_ago: int, extra: int = 0) -> dict[str, Any]:
    b = counters.empty()
    for m in minutes_ago:
        counters.add(b, NOW - timedelta(minutes=m), NOW)
    return {**b, "total": len(minutes_ago) + extra}


# Ages straddle every window edge: 1h and 1d (10-minute slots), and the day boundaries
# of 7, 30 and 90 days (NOW is 12:00 UTC, so day N back starts 12h + (N-1) days ago).
def _day_edge(days: int) -> tuple[int, int]:
    start = 12 * 60 + (days - 1) * 1440
    return start - 10, start + 10


COUNTERS = [
    _counter(),
    _counter(5),
    _counter(55, 65),
    _counter(59, 61, 1439, 1441),
    _counter(*_day_edge(7)),
    _counter(*_day_edge(30), extra=2),
    _counter(*_day_edge(90), *_day_edge(91)),
    _counter(1, 2, 3, *_day_edge(8)),
]


# Strategies are built once: Hypothesis spends most of its time on fresh strategy objects.
profile_st = st.fixed_dictionaries(
    {
        "attributes": st.dictionaries(st.sampled_from(ATTRS), value, max_size=4),
        "tags": st.lists(st.sampled_from(TAGS), unique=True, max_size=3),
        "consents": st.dictionaries(st.sampled_from(rules.CHANNELS), st.booleans(), max_size=3),
        "counters": st.dictionaries(st.sampled_from(EVENTS), st.sampled_from(COUNTERS), max_size=2),
        "last": st.dictionaries(
            st.sampled_from(EVENTS),
            st.dictionaries(st.sampled_from(["country", "amount"]), scalar, max_size=2),
            max_size=1,
        ),
    }
)


def _value_for(op: str) -> Any:
    if op == "between":
        return st.tuples(scalar, scalar).map(list)
    if op in ("in", "not_in"):
        return st.lists(scalar, min_size=1, max_size=3)
    if op == "starts_with":
        return st.sampled_from(STRINGS)
    if op == "exists":
        return st.none()
    return scalar


op_value = st.sampled_from(rules.OPS).flatmap(lambda op: st.tuples(st.just(op), _value_for(op)))


def _attr(name: str, ov: tuple[str, Any]) -> dict[str, Any]:
    op, v = ov
    return {"attr": name, "op": op} if op == "exists" else {"attr": name, "op": op, "value": v}


def _last(ev: str, prop: str, ov: tuple[str, Any]) -> dict[str, Any]:
    op, v = ov
    doc = {"event": ev, "last": prop, "op": op}
    return doc if op == "exists" else {**doc, "value": v}


leaf = st.one_of(
    st.builds(lambda t: {"tag": t}, st.sampled_from([*TAGS, "unknown:tag"])),
    st.builds(lambda c: {"consent": c}, st.sampled_from(rules.CHANNELS)),
    st.builds(_attr, st.sampled_from([*ATTRS, "missing"]), op_value),
    st.builds(
        lambda e, op, n, w: {"event": e, "count": {op: n}, "within": w},
        st.sampled_from([*EVENTS, "never.seen"]),
        st.sampled_from(rules.COUNT_OPS),
        st.integers(0, 4),
        st.sampled_from(rules.WINDOWS),
    ),
    st.builds(_last, st.sampled_from(EVENTS), st.sampled_from(["country", "amount"]), op_value),
    st.builds(
        lambda c, w: {"contacted": {"campaign": c, "within": w}},
        st.sampled_from([*CAMPAIGNS, "cmp-none"]),
        st.sampled_from(["1h", "2d", "30d"]),
    ),
    st.builds(lambda s: {"segment": s}, st.sampled_from(["seg-a", "seg-b"])),
)
rule_st = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.builds(lambda xs: {"all": xs}, st.lists(inner, min_size=1, max_size=4)),
        st.builds(lambda xs: {"any": xs}, st.lists(inner, min_size=1, max_size=4)),
        st.builds(lambda x: {"not": x}, inner),
    ),
    max_leaves=12,
)
SEGMENTS = {
    "seg-a": rules.parse(
        {"all": [{"tag": "value:gold"}, {"attr": "age", "op": "gte", "value": 18}]}
    ),
    "seg-b": rules.parse({"any": [{"segment": "seg-a"}, {"consent": "push"}]}),
}


@st.composite
def population(draw: Any) -> tuple[list[dict[str, Any]], list[str], list[tuple[str, str, float]]]:
    n = draw(st.integers(1, 8))
    ids = [f"c-{i}" for i in range(n)]
    first = [{**draw(profile_st), "customer_id": cid} for cid in ids]
    changed = [
        {**draw(profile_st), "customer_id": cid}
        for cid in draw(st.lists(st.sampled_from(ids), max_size=4))
    ]
    erased = draw(st.lists(st.sampled_from(ids), max_size=2, unique=True))
    contacts = draw(
        st.lists(
            st.tuples(st.sampled_from(ids), st.sampled_from(CAMPAIGNS), st.integers(0, 40 * 24)),
            max_size=4,
        )
    )
    return [*first, *changed], erased, [(c, k, NOW.timestamp() - h * 3600) for c, k, h in contacts]


def _engines_agree(docs: list[dict[str, Any]], erased: list[str], contacts: Any, rule: Any) -> None:
    pop = Population()
    final: dict[str, dict[str, Any]] = {}
    versions: dict[str, int] = {}
    # Later documents are newer versions of the same customer. Documents go in together
    # until a customer repeats: customers new to the index are added in bulk, the others
    # one by one.
    together: list[dict[str, Any]] = []
    for doc in docs:
        cid = doc["customer_id"]
        if any(d["customer_id"] == cid for d in together):
            pop.upsert_many(together)
            together = []
        versions[cid] = versions.get(cid, 0) + 1
        together.append({**doc, "version": versions[cid]})
        final[cid] = doc
    pop.upsert_many(together)
    for cid in erased:
        pop.remove(cid)
        final.pop(cid)
    for cid, camp, at in contacts:
        pop.contacted(cid, camp, at)

    node = rules.parse(rule)
    got = set(pop.members(pop.select(node, NOW, SEGMENTS.__getitem__)))
    # Column scans restricted to the candidates left, and never restricted: same answer.
    for factor in (0, 10**9):
        index.RESTRICT_FACTOR = factor
        try:
            other = set(pop.members(pop.select(node, NOW, SEGMENTS.__getitem__)))
        finally:
            index.RESTRICT_FACTOR = 8
        assert other == got, (
            f"rule {rule}: restricted={factor == 0} {sorted(other)} vs {sorted(got)}"
        )

    compiled: dict[str, rules.Predicate] = {}

    def resolve(sid: str) -> rules.Predicate:
        if sid not in compiled:
            compiled[sid] = rules.compile_rule(SEGMENTS[sid], resolve_segment=resolve)
        return compiled[sid]

    pred = rules.compile_rule(node, resolve_segment=resolve)
    want = set()
    for cid, doc in final.items():

        def was_contacted(camp: str, within: str, cid: str = cid) -> bool:
            cutoff = NOW.timestamp() - rules.parse_duration(within)
            return any(c == cid and k == camp and at >= cutoff for c, k, at in contacts)

        if pred(rules.Subject(doc, now=NOW, contacted=was_contacted)):
            want.add(cid)
    assert got == want, f"rule {rule}: index {sorted(got)} vs evaluator {sorted(want)}"


value_leaf = st.one_of(
    st.builds(_attr, st.sampled_from(ATTRS), op_value),
    st.builds(_last, st.sampled_from(EVENTS), st.sampled_from(["country", "amount"]), op_value),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(population(), value_leaf, st.booleans())
def test_every_comparison_selects_what_the_evaluator_accepts(
    pop: Any, rule: Any, neg: bool
) -> None:
    docs, erased, contacts = pop
    _engines_agree(docs, erased, contacts, {"not": rule} if neg else rule)


behaviour_leaf = st.one_of(
    st.builds(
        lambda e, op, n, w: {"event": e, "count": {op: n}, "within": w},
        st.sampled_from(EVENTS),
        st.sampled_from(rules.COUNT_OPS),
        st.integers(0, 3),
        st.sampled_from(rules.WINDOWS),
    ),
    st.builds(
        lambda c, w: {"contacted": {"campaign": c, "within": w}},
        st.sampled_from(CAMPAIGNS),
        st.sampled_from(["1h", "2d", "30d"]),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(population(), behaviour_leaf, st.booleans())
def test_every_behaviour_clause_selects_what_the_evaluator_accepts(
    pop: Any, rule: Any, neg: bool
) -> None:
    docs, erased, contacts = pop
    _engines_agree(docs, erased, contacts, {"not": rule} if neg else rule)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(population(), leaf, st.booleans())
def test_every_clause_selects_what_the_evaluator_accepts(pop: Any, rule: Any, neg: bool) -> None:
    docs, erased, contacts = pop
    _engines_agree(docs, erased, contacts, {"not": rule} if neg else rule)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(population(), rule_st)
def test_population_index_and_evaluator_select_the_same_customers(pop: Any, rule: Any) -> None:
    docs, erased, contacts = pop
    _engines_agree(docs, erased, contacts, rule)


def test_partial_updates_with_hints_match_full_documents() -> None:
    """A counters-only change applied with its hint leaves tags and attributes intact."""
    pop = Population()
    doc = {
        "customer_id": "c-1",
        "version": 1,
        "attributes": {"age": 30},
        "tags": ["value:gold"],
        "consents": {"push": True},
        "counters": {},
    }
    pop.upsert_many([doc])
    b = counters.empty()
    counters.add(b, NOW - timedelta(days=1), NOW)
    pop.upsert_many(
        [{**doc, "version": 2, "counters": {"topup": {**b, "total": 1}}}],
        parts={"c-1": Change(2, {"counters", "event:topup"}, 2)},
    )
    rule = rules.parse(
        {"all": [{"tag": "value:gold"}, {"event": "topup", "count": {"gte": 1}, "within": "7d"}]}
    )
    assert pop.members(pop.select(rule, NOW)) == ["c-1"]
    # An older version arriving late changes nothing.
    assert pop.upsert_many([{**doc, "version": 1, "tags": []}]) == 0
    assert pop.members(pop.select(rules.parse({"tag": "value:gold"}), NOW)) == ["c-1"]


def test_several_counter_changes_apply_from_the_behaviour_part_alone() -> None:
    """Changes 2..4 of a customer that only moved counters, folded into one, apply from a
    document without the profile part; a gap in the versions needs the whole document."""
    pop = Population()
    base = {"customer_id": "c-1", "version": 1, "tags": ["value:gold"], "counters": {}}
    pop.upsert_many([base])
    b = counters.empty()
    counters.add(b, NOW - timedelta(days=1), NOW)
    change = Change(2, {"counters", "event:topup"}, 2)
    change.add(4, {"counters", "event:topup"})
    change.add(3, {"counters"})
    assert (change.version, change.since) == (4, 2)
    light = {"customer_id": "c-1", "version": 4, "counters": {"topup": {**b, "total": 3}}}
    assert pop.upsert_many([light], parts={"c-1": change}) == 1
    gold_topup = {"all": [{"tag": "value:gold"}, {"event": "topup", "count": {"gte": 3}}]}
    assert pop.members(pop.select(rules.parse(gold_topup), NOW)) == ["c-1"]
    # The index holds 4; changes 6..6 leave version 5 unseen: the whole document applies.
    whole = {**light, "version": 6, "tags": []}
    assert pop.upsert_many([whole], parts={"c-1": Change(6, {"counters"}, 6)}) == 1
    assert pop.members(pop.select(rules.parse({"tag": "value:gold"}), NOW)) == []


def _one_population(column: list[Any], key: str) -> list[dict[str, Any]]:
    docs = []
    for i, v in enumerate(column):
        doc: dict[str, Any] = {"customer_id": f"c-{i}", "attributes": {}, "counters": {}}
        if key == "attr":
            doc["attributes"] = {"x": v}
        else:
            doc["counters"] = {"topup": v}
        docs.append(doc)
    return docs


def test_every_op_and_value_exhaustively() -> None:
    """Each op against every kind of value a profile holds, one customer per value."""
    docs = _one_population(VALUES, "attr")
    for op in rules.OPS:
        if op == "exists":
            candidates: list[Any] = [None]
        elif op == "between":
            candidates = [[a, b] for a in SCALARS for b in SCALARS]
        elif op in ("in", "not_in"):
            candidates = [[a] for a in SCALARS] + [
                [a, b] for a, b in zip(SCALARS, SCALARS[3:], strict=False)
            ]
        elif op == "starts_with":
            candidates = STRINGS
        else:
            candidates = SCALARS
        for v in candidates:
            rule = (
                {"attr": "x", "op": op} if op == "exists" else {"attr": "x", "op": op, "value": v}
            )
            _engines_agree(docs, [], [], rule)
            _engines_agree(docs, [], [], {"not": rule})


def test_every_window_edge_exhaustively() -> None:
    """Counts in every window at its edges, with every comparison, one customer per counter."""
    docs = _one_population(COUNTERS, "counters")
    for within in rules.WINDOWS:
        for op in rules.COUNT_OPS:
            for n in range(6):
                _engines_agree(docs, [], [], {"event": "topup", "count": {op: n}, "within": within})
