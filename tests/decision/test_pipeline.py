"""The pipeline's steps, without servers: every step, every reason, and the order they run in.

The expected reasons are written out here from the contract (API.md's run counts and
``explain``), not read back from the implementation."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from services.decision import arbitration
from services.decision.pipeline import counts, steps
from services.decision.pipeline.model import Campaign, Offer, Policy, compile_campaign
from services.decision.pipeline.steps import Candidate, Customer, Outcome
from services.decision.policy.ledger import Cap, Ledger, Reserved
from shared import rules
from shared.redis import Keys

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
OFFERS = {
    "std": Offer("std", value=1.0, content={"default": {"text": "Hi {{ attributes.name }}"}}),
    "gold": Offer("gold", value=3.0, content={"default": {"text": "Gold"}}),
    "old": Offer("old", valid_to=NOW - timedelta(days=1)),
    "soon": Offer("soon", valid_from=NOW + timedelta(days=1)),
    "bad": Offer("bad", content={"default": {"text": "{{ 1 // attributes.zero }}"}}),
}


def _campaign(cid: str = "cmp", **kw: Any) -> Campaign:
    body: dict[str, Any] = {
        "name": cid,
        "type": "batch",
        "channels": ["sms", "email"],
        "treatments": [{"id": "std", "offer": "std"}],
    }
    body.update(kw)
    return compile_campaign(cid, body, {}, lambda sid: lambda s: False)


def _doc(**kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "customer_id": "c-1",
        "attributes": {"name": "Ann", "zero": 0},
        "tags": ["vip"],
        "consents": {"sms": True, "email": True},
        "identities": {"msisdn": "+4915", "email": "a@b.c"},
        "devices": [],
    }
    doc.update(kw)
    return doc


def _who(doc: dict[str, Any] | None, cid: str = "c-1", **kw: Any) -> Customer:
    return Customer.of(cid, doc, NOW, **kw)


def _eligible(
    c: Campaign, who: Customer, *, outbound: bool = True, policy: Policy | None = None, **kw: Any
) -> Candidate | Outcome:
    return steps.eligible(
        c, who, offers=OFFERS, policy=policy or Policy(), now=NOW, outbound=outbound, **kw
    )


def _reason(got: Candidate | Outcome) -> tuple[str, str]:
    assert isinstance(got, Outcome), got
    return got.status, got.reason


# -- the typed model -------------------------------------------------------------------------
def test_a_campaign_is_typed_once_with_its_rules_compiled() -> None:
    c = _campaign(
        type="triggered",
        priority=70,
        audience={"tag": "vip"},
        trigger={
            "event": "cart.abandoned",
            "where": {"prop": "total", "op": "gt", "value": 10},
            "delay": "10m",
            "unless": {"event": "order.placed", "within": "1h"},
            "exclusive": False,
        },
        treatments=[
            {"id": "gold", "offer": "gold", "tier": {"tag": "gold"}},
            {"id": "std", "offer": "std", "weight": 2},
        ],
        reentry={"max": 1, "per": "7d"},
        conversion={"event": "order.placed", "within": "3d"},
        control_group=0.1,
    )
    assert (c.priority, c.event, c.delay_s, c.unless, c.exclusive) == (
        70,
        "cart.abandoned",
        600,
        ("order.placed", 3600),
        False,
    )
    assert c.timed and c.where is not None and c.audience is not None
    assert [t.id for t in c.tiers] == ["gold"] and [t.weight for t in c.plain] == [2.0]
    assert c.reentry is not None and (c.reentry.max, c.reentry.per_s) == (1, 7 * 86400)
    assert c.conversion is not None and c.conversion.within == "3d"
    with pytest.raises(ValidationError):
        _campaign(treatments=[])  # a stored document is validated again, never trusted


def test_a_policy_is_typed_once() -> None:
    p = Policy.parse(
        {
            "rules": [{"channel": "sms", "max": 2, "per": "1d", "on_cap": "defer"}],
            "quiet_hours": {"start": "21:00", "end": "08:00"},
            "global_control": 0.05,
        }
    )
    (rule,) = p.caps
    assert (rule.channel, rule.max, rule.per_s, rule.on_cap) == ("sms", 2, 86400, "defer")
    assert rule.applies("sms") and not rule.applies("email")
    assert p.global_control == 0.05 and p.quiet_hours is not None
    assert Policy.parse(None) == Policy()


# -- every eligibility step and its reason --------------------------------------------------
def test_schedule() -> None:
    later = _campaign(schedule={"start": (NOW + timedelta(hours=1)).isoformat()})
    over = _campaign(schedule={"end": (NOW - timedelta(hours=1)).isoformat()})
    got = _eligible(later, _who(_doc()))
    assert _reason(got) == ("ineligible", "schedule") and "starts" in got.label  # type: ignore[union-attr]
    got = _eligible(over, _who(_doc()))
    assert _reason(got) == ("ineligible", "schedule") and "ended" in got.label  # type: ignore[union-attr]


def test_audience_with_and_without_an_explanation() -> None:
    c = _campaign(audience={"all": [{"tag": "vip"}, {"attr": "name", "op": "eq", "value": "Bob"}]})
    assert _reason(_eligible(c, _who(_doc()))) == ("ineligible", "audience")
    explained = _eligible(c, _who(_doc()), segments={})
    assert isinstance(explained, Outcome)
    assert explained.label == "audience: attribute name is 'Ann', needs eq 'Bob'"
    unknown = _eligible(c, _who(None))
    assert isinstance(unknown, Outcome) and unknown.label == "audience: unknown customer"
    # a run's snapshot already applied the audience: not evaluated again
    assert isinstance(_eligible(c, _who(_doc()), audience_checked=True), Candidate)


def test_where_reads_the_firing_event() -> None:
    c = _campaign(
        type="triggered",
        trigger={"event": "topup", "where": {"prop": "amount", "op": "gte", "value": 20}},
    )
    small = _who(_doc(), event={"type": "topup", "properties": {"amount": 5}})
    big = _who(_doc(), event={"type": "topup", "properties": {"amount": 50}})
    assert _reason(_eligible(c, small)) == ("ineligible", "where")
    assert isinstance(_eligible(c, big), Candidate)


def test_treatment_tiers_first_then_the_weighted_split() -> None:
    tiered = _campaign(treatments=[{"id": "gold", "offer": "gold", "tier": {"tag": "vip"}}])
    got = _eligible(tiered, _who(_doc()))
    assert isinstance(got, Candidate) and got.treatment.id == "gold" and got.tier_fit
    assert _reason(_eligible(tiered, _who(_doc(tags=[])))) == ("ineligible", "treatment")
    split = _campaign(
        treatments=[{"id": "a", "offer": "std", "weight": 1}, {"id": "b", "offer": "std"}]
    )
    picks = {}
    for i in range(200):
        got = _eligible(split, _who(_doc(), cid=f"c-{i}"))
        assert isinstance(got, Candidate) and not got.tier_fit
        picks[f"c-{i}"] = got.treatment.id
    assert set(picks.values()) == {"a", "b"}
    assert all(arbitration.by_weight(c, "cmp", split.plain).id == t for c, t in picks.items())


def test_offer_missing_or_not_valid_now() -> None:
    for offer_id, label in (
        ("nope", "offer: nope missing"),
        ("old", "offer: old not valid now"),
        ("soon", "offer: soon not valid now"),
    ):
        got = _eligible(_campaign(treatments=[{"id": "t", "offer": offer_id}]), _who(_doc()))
        assert _reason(got) == ("ineligible", "offer") and got.label == label  # type: ignore[union-attr]


def test_consent_reachability_and_unknown_customers() -> None:
    c = _campaign()
    assert _reason(_eligible(c, _who(_doc(consents={})))) == ("suppressed", "consent")
    assert _reason(_eligible(c, _who(_doc(identities={})))) == ("suppressed", "unreachable")
    assert _reason(_eligible(c, _who(None))) == ("suppressed", "unknown")
    # channels in the campaign's order, only those with consent and an address
    got = _eligible(c, _who(_doc(consents={"sms": False, "email": True})))
    assert isinstance(got, Candidate) and got.channels == ("email",)
    got = _eligible(
        _campaign(channels=["push", "inapp", "sms"]),
        _who(
            _doc(
                consents={"push": True, "inapp": True, "sms": True},
                devices=[{"platform": "ios", "token": "t"}, {"platform": "fax", "token": "x"}],
            )
        ),
    )
    assert isinstance(got, Candidate) and got.channels == ("push", "inapp", "sms")
    # a touchpoint decision has no consent step: the customer is at the touchpoint
    assert isinstance(_eligible(c, _who(_doc(consents={})), outbound=False), Candidate)


def test_control_global_then_campaign_among_reachable_customers_only() -> None:
    c = _campaign(control_group=0.5)
    ids = [f"c-{i}" for i in range(400)]
    held = {}
    for cid in ids:
        got = _eligible(c, _who(_doc(), cid=cid))
        assert isinstance(got, Candidate)
        held[cid] = got.control
        if got.control is not None:
            assert steps.held_out(got).reason == "control"
    want = {cid: "campaign" if arbitration.in_control(cid, "cmp", 0.5) else None for cid in ids}
    assert held == want and 100 < sum(1 for v in held.values() if v) < 300
    everyone = Policy(global_control=0.5)
    for cid in ids[:100]:
        got = _eligible(c, _who(_doc(), cid=cid), policy=everyone)
        assert isinstance(got, Candidate)
        if arbitration.in_global_control(cid, 0.5):
            assert got.control == "global" and got.control_label == "control: global control group"
        # the unreachable are never drawn into control: they are counted as such
        assert _reason(_eligible(c, _who(_doc(consents={}), cid=cid), policy=everyone)) == (
            "suppressed",
            "consent",
        )


def test_the_steps_run_in_one_order() -> None:
    """A customer who fails several steps gets the first one's reason, in every flow."""
    c = _campaign(
        type="triggered",
        schedule={"end": (NOW - timedelta(hours=1)).isoformat()},
        audience={"tag": "nobody"},
        trigger={"event": "e", "where": {"prop": "x", "op": "eq", "value": 1}},
        treatments=[{"id": "t", "offer": "nope", "tier": {"tag": "nobody"}}],
    )
    who = _who(_doc(consents={}), event={"type": "e", "properties": {}})
    seen = []
    for fix in ("schedule", "audience", "where", "treatment", "offer", "consent"):
        got = _eligible(c, who)
        seen.append(_reason(got)[1])
        assert seen[-1] == fix
        if fix == "schedule":
            c.end = None
        elif fix == "audience":
            c.audience = None
        elif fix == "where":
            c.where = None
        elif fix == "treatment":
            c.tiers, c.plain = (), (c.tiers[0],)
        elif fix == "offer":
            c.plain = (type(c.plain[0])("t", "std"),)
    assert seen == ["schedule", "audience", "where", "treatment", "offer", "consent"]


# -- ranking, the ledger, content ------------------------------------------------------------
def test_ranking_by_score_or_explored_at_random() -> None:
    def cands() -> list[Candidate]:
        return [
            Candidate(_campaign("low", priority=10), _campaign().plain[0], OFFERS["std"], False),
            Candidate(_campaign("high", priority=90), _campaign().plain[0], OFFERS["gold"], True),
        ]

    ranked = cands()
    steps.rank(ranked, [(1000.0, 0.0), (1000.0, 0.0)], random.Random(1), explore=0.0)
    assert [c.campaign.campaign_id for c in ranked] == ["high", "low"]
    assert ranked[0].score == pytest.approx(0.9 * 3.0 * 1.2, rel=0.02)
    orders = set()
    for seed in range(30):
        shuffled = cands()
        steps.rank(shuffled, [(1.0, 1.0)] * 2, random.Random(seed), explore=1.0)
        orders.add(tuple(c.campaign.campaign_id for c in shuffled))
    assert len(orders) == 2
    assert steps.outranked(ranked[1]).reason == "outranked"


def test_caps_of_a_contact_and_the_reasons_of_a_full_one() -> None:
    ledger = Ledger.__new__(Ledger)
    ledger.keys = Keys("t")
    policy = Policy.parse(
        {
            "rules": [
                {"channel": "*", "max": 5, "per": "7d"},
                {"channel": "sms", "max": 1, "per": "1d", "on_cap": "defer"},
                {"channel": "push", "max": 1, "per": "1d"},
            ]
        }
    )
    c = _campaign(reentry={"max": 1, "per": "30d"})
    caps = steps.caps(ledger, "c-1", c, "sms", policy)
    assert [k.kind for k in caps] == ["log", "policy", "policy", "log", "reentry"]
    assert caps[0].key == caps[2].key == "t:ledger:c-1:sms" and caps[1].key == "t:ledger:c-1:*"
    assert caps[3].key == "t:contacts:c-1:cmp" and caps[4].key == "t:ledger:c-1:campaign:cmp"
    cand = _eligible(c, _who(_doc()))
    assert isinstance(cand, Candidate)
    full = Reserved(None, [caps[4], None])
    assert (steps.blocked(full, cand).reason, steps.blocked(full, cand).label) == (
        "reentry",
        "reentry: 1 per 30d reached",
    )
    assert steps.blocked(Reserved(None, [caps[1]]), cand).reason == "policy"
    assert steps.deferrable(Reserved(None, [caps[1], caps[2]])) == caps[2]
    assert steps.deferrable(Reserved(None, [caps[1]])) is None
    assert isinstance(caps[0], Cap)


def test_quiet_hours_wait_in_the_customers_zone() -> None:
    p = Policy.parse({"quiet_hours": {"start": "21:00", "end": "08:00"}})
    late = datetime(2026, 11, 24, 21, 30, tzinfo=UTC)  # 22:30 in Berlin
    assert steps.quiet_until(p, "Europe/Berlin", late) == datetime(2026, 11, 25, 7, tzinfo=UTC)
    assert steps.quiet_until(p, "Europe/Berlin", NOW) is None
    assert steps.quiet_until(Policy(), "Europe/Berlin", late) is None


def test_content_renders_for_the_customer_or_skips_them() -> None:
    who = _who(_doc())
    assert steps.content(OFFERS["std"], "sms", who) == {"text": "Hi Ann"}
    failed = steps.content(OFFERS["bad"], "sms", who)
    assert isinstance(failed, Outcome) and (failed.status, failed.reason) == (
        "suppressed",
        "content",
    )


def test_contacted_clauses_read_the_lookup_given() -> None:
    c = _campaign(audience={"contacted": {"campaign": "welcome", "within": "30d"}})
    assert c.contacted == frozenset({("welcome", "30d")})
    assert _reason(_eligible(c, _who(_doc()))) == ("ineligible", "audience")
    seen = {("welcome", "30d"): True}
    assert isinstance(_eligible(c, _who(_doc(), contacted=seen)), Candidate)


# -- counts, explain and metrics from the same outcome ---------------------------------------
def test_counts_explain_and_metrics_read_the_same_reason() -> None:
    doc = counts.empty()
    outs = [
        Outcome("dispatched", "dispatched", channel="sms", treatment="std"),
        Outcome("deferred", "quiet_hours", channel="sms", treatment="std"),
        Outcome("control", "control", "control: campaign control group (10%)"),
        Outcome("suppressed", "consent", "consent: no consent for any channel"),
        Outcome("suppressed", "content", "content: boom"),
        Outcome("ineligible", "where", "where: trigger condition not met"),
    ]
    for o in outs:
        counts.tally(doc, o)
        counts.observe("simulate", o)
    assert counts.fields(doc) == {
        "processed": 6,
        "control": 1,
        "suppressed": {"consent": 1, "policy": 0, "reentry": 0, "unreachable": 0, "content": 1},
        "ineligible": {"where": 1},
        "dispatched": 1,
        "deferred": 1,
        "by_channel": {"sms": 2},
        "by_treatment": {"std": 2},
    }
    got = counts.OUTCOMES.labels("simulate", "suppressed", "consent")._value.get()
    assert got >= 1
    e = counts.considered("cmp", outs[2])
    assert (e.outcome, e.reason) == ("control", "control: campaign control group (10%)")
    e = counts.considered("cmp", Outcome("offered", "offered", "offered"), 0.123456)
    assert (e.outcome, e.score) == ("offered", 0.1235)


def test_rules_compile_against_segments_given_at_load() -> None:
    seg = rules.compile_rule(rules.parse({"tag": "vip"}))
    body = {
        "name": "x",
        "type": "realtime",
        "touchpoints": ["app"],
        "audience": {"segment": "vips"},
        "treatments": [{"id": "std", "offer": "std"}],
    }
    c = compile_campaign("x", body, {"vips": rules.parse({"tag": "vip"})}, lambda sid: seg)
    assert isinstance(_eligible(c, _who(_doc()), outbound=False), Candidate)
    assert _reason(_eligible(c, _who(_doc(tags=[])), outbound=False)) == ("ineligible", "audience")


def test_a_contact_the_ledger_holds_is_not_asked_again() -> None:
    """A redo (redelivered event, resumed page) rebuilds treatment and offer only."""
    c = _campaign(control_group=0.5, audience={"tag": "nobody"})
    withdrawn = _who(_doc(consents={}))
    assert _reason(_eligible(c, withdrawn)) == ("ineligible", "audience")
    again = steps.redo(c, withdrawn, "sms", offers=OFFERS, now=NOW)
    assert isinstance(again, Candidate)
    assert (again.channels, again.control, again.treatment.id) == (("sms",), None, "std")
    gone = _campaign(treatments=[{"id": "t", "offer": "nope"}])
    assert _reason(steps.redo(gone, withdrawn, "sms", offers=OFFERS, now=NOW)) == (
        "ineligible",
        "offer",
    )
