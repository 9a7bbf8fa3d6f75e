"""The RULE language: parse errors name the place; evaluation means what a person expects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import counters, rules

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def _counter(*ages: timedelta) -> dict:
    b = counters.empty()
    for a in ages:
        counters.add(b, NOW - a, NOW)
    return {**b, "total": len(ages)}


PROFILE = {
    "customer_id": "c-1",
    "attributes": {
        "age": 34,
        "region": "north",
        "arpu": 41.5,
        "vip": True,
        "contract_end": "2027-03-01",
        "langs": ["de", "en"],
    },
    "tags": ["value:gold", "device:ios"],
    "consents": {"push": True, "sms": False},
    "counters": {"topup": _counter(timedelta(days=1), timedelta(days=10), timedelta(days=40))},
    "last": {"roaming.started": {"country": "FR"}},
}


def ev(rule: dict, profile: dict = PROFILE, **kw: object) -> bool:
    return rules.evaluate(rules.parse(rule), profile, now=NOW, **kw)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"attr": "age", "op": "between", "value": [18, 35]}, True),
        ({"attr": "age", "op": "gt", "value": 34}, False),
        ({"attr": "age", "op": "eq", "value": "34"}, False),  # a string is not a number
        ({"attr": "vip", "op": "eq", "value": True}, True),
        ({"attr": "vip", "op": "eq", "value": 1}, False),  # a boolean is not a number
        ({"attr": "region", "op": "in", "value": ["north", "east"]}, True),
        ({"attr": "region", "op": "not_in", "value": ["north"]}, False),
        ({"attr": "region", "op": "starts_with", "value": "no"}, True),
        ({"attr": "langs", "op": "contains", "value": "en"}, True),
        ({"attr": "contract_end", "op": "lt", "value": "2027-06-01T00:00:00Z"}, True),
        ({"attr": "contract_end", "op": "gte", "value": "2027-03-01"}, True),
        ({"attr": "missing", "op": "ne", "value": 1}, False),  # missing never matches ...
        ({"not": {"attr": "missing", "op": "eq", "value": 1}}, True),  # ... but matches not
        ({"attr": "missing", "op": "exists"}, False),
        ({"attr": "age", "op": "exists"}, True),
        ({"tag": "value:gold"}, True),
        ({"not": {"tag": "churn:risk"}}, True),
        ({"consent": "push"}, True),
        ({"consent": "sms"}, False),
        ({"consent": "email"}, False),  # unknown consent is no consent
        ({"event": "topup", "count": {"gte": 2}, "within": "30d"}, True),
        ({"event": "topup", "count": {"gte": 3}, "within": "30d"}, False),
        ({"event": "topup", "count": {"eq": 3}}, True),
        ({"event": "never", "count": {"eq": 0}, "within": "7d"}, True),
        ({"event": "roaming.started", "last": "country", "op": "ne", "value": "DE"}, True),
        ({"all": [{"tag": "value:gold"}, {"any": [{"tag": "x"}, {"consent": "push"}]}]}, True),
    ],
)
def test_evaluation(rule: dict, expected: bool) -> None:
    assert ev(rule) is expected


def test_prop_reads_the_firing_event() -> None:
    rule = {"prop": "country", "op": "ne", "value": "DE"}
    assert ev(rule, event={"properties": {"country": "FR"}})
    assert not ev(rule, event={"properties": {"country": "DE"}})
    assert not ev(rule)  # no event: missing


def test_segment_and_contacted() -> None:
    assert ev({"segment": "seg-a"}, segments=frozenset({"seg-a"}))
    assert not ev({"segment": "seg-b"}, segments=frozenset({"seg-a"}))
    seen = {("cmp-7", "14d")}
    assert ev(
        {"contacted": {"campaign": "cmp-7", "within": "14d"}}, contacted=lambda c, w: (c, w) in seen
    )


@pytest.mark.parametrize(
    ("rule", "loc"),
    [
        (
            {
                "all": [
                    {"tag": "a"},
                    {"tag": "b"},
                    {"any": [{"attr": "x", "op": "equals", "value": 1}]},
                ]
            },
            "rule.all[2].any[0].op",
        ),
        ({"attr": "x", "op": "between", "value": [1]}, "rule.value"),
        ({"attr": "x", "op": "in", "value": []}, "rule.value"),
        ({"tag": 5}, "rule.tag"),
        ({"consent": "fax"}, "rule.consent"),
        ({"event": "topup", "count": {"most": 3}}, "rule.count.most"),
        ({"event": "topup", "count": {"gte": 3}, "within": "2w"}, "rule.within"),
        ({"frobnicate": 1}, "rule.frobnicate"),
        ({"any": []}, "rule.any"),
        ({"all": {"tag": "a"}}, "rule.all"),
        ({"not": {"tag": "a"}, "extra": 1}, "rule.extra"),
        ([], "rule"),
    ],
)
def test_errors_name_the_place(rule: object, loc: str) -> None:
    with pytest.raises(rules.RuleError) as err:
        rules.parse(rule)
    assert err.value.loc == loc


def test_empty_all_is_everyone() -> None:
    # A campaign without an audience is frozen as {"all": []}: every customer.
    rule = rules.parse({"all": []})
    assert rules.evaluate(rule, {"customer_id": "c-1", "tags": [], "attributes": {}})
    assert rules.evaluate(rules.parse({"not": {"all": []}}), {"customer_id": "c-1"}) is False


def test_depth_is_bounded() -> None:
    deep: dict = {"tag": "a"}
    for _ in range(40):
        deep = {"not": deep}
    with pytest.raises(rules.RuleError, match="nests at most"):
        rules.parse(deep)


def test_segments_of() -> None:
    node = rules.parse(
        {"all": [{"segment": "a"}, {"not": {"any": [{"segment": "b"}, {"tag": "x"}]}}]}
    )
    assert rules.segments_of(node) == {"a", "b"}


leaf = st.one_of(
    st.builds(lambda t: {"tag": t}, st.sampled_from(["a", "b", "c"])),
    st.builds(
        lambda n, op: {"attr": "n", "op": op, "value": n},
        st.integers(-3, 3),
        st.sampled_from(["eq", "ne", "lt", "lte", "gt", "gte"]),
    ),
)
rule_st = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.builds(lambda xs: {"all": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda xs: {"any": xs}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda x: {"not": x}, inner),
    ),
    max_leaves=8,
)


@given(rule_st, st.sets(st.sampled_from(["a", "b", "c"])), st.one_of(st.none(), st.integers(-3, 3)))
def test_not_is_complement_and_de_morgan_holds(rule: dict, tags: set, n: int | None) -> None:
    profile = {"tags": sorted(tags), "attributes": {} if n is None else {"n": n}}
    a = ev(rule, profile)
    assert ev({"not": rule}, profile) is (not a)
    assert ev({"not": {"all": [rule, {"tag": "a"}]}}, profile) == ev(
        {"any": [{"not": rule}, {"not": {"tag": "a"}}]}, profile
    )
