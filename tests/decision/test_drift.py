"""No drift between the flows, on real servers: one population through a trigger, a simulation
of that trigger, a batch run and its simulation is counted the same way by every one of them
(the same steps in the same order), and the counts are the ones the contract predicts."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.decision import arbitration
from shared.stack import Stack
from tests.conftest import auth
from tests.decision.test_triggers import Listener
from tests.helpers import eventually

N = 160
SHARE = 0.25
Counted = dict[str, Any]


@pytest.fixture
async def listen(stack: Stack) -> AsyncIterator[Listener]:
    async with Listener(stack) as lst:
        yield lst


def _people(u: str) -> dict[str, dict[str, Any]]:
    """Every 3rd not keen (fails ``where``), every 5th gold (a tier), every 7th without SMS
    consent, every 11th without a number."""
    people = {}
    for i in range(N):
        tags = [f"drift:{u}"] + (["keen"] if i % 3 else []) + (["gold"] if i % 5 == 0 else [])
        people[f"d{i}-{u}"] = {
            "customer_id": f"d{i}-{u}",
            "attributes": {"first_name": f"N{i}"},
            "tags": tags,
            "consents": {"sms": i % 7 != 0},
            "identities": {} if i % 11 == 0 else {"msisdn": f"+3{int(u, 16) % 10**6:06d}{i:05d}"},
        }
    return people


def _expected(people: dict[str, dict[str, Any]], cid: str) -> Counted:
    """The contract, counted here: ``where`` first, then consent, reachability, and control
    drawn among the customers the campaign could reach."""
    keen = {c: p for c, p in people.items() if "keen" in p["tags"]}
    reach = {c: p for c, p in keen.items() if p["consents"]["sms"] and p["identities"]}
    control = {c for c in reach if arbitration.in_control(c, cid, SHARE)}
    sent = [p for c, p in reach.items() if c not in control]
    gold = sum(1 for p in sent if "gold" in p["tags"])
    return {
        "where": len(people) - len(keen),
        "consent": sum(1 for p in keen.values() if not p["consents"]["sms"]),
        "unreachable": sum(
            1 for p in keen.values() if p["consents"]["sms"] and not p["identities"]
        ),
        "control": len(control),
        "dispatched": len(sent),
        "by_treatment": {k: v for k, v in (("gold", gold), ("std", len(sent) - gold)) if v},
    }


def _of(counts: Counted) -> Counted:
    """The comparable part of a run's or a simulation's counts."""
    return {
        "processed": counts["processed"],
        "control": counts["control"],
        "dispatched": counts["dispatched"],
        "deferred": counts["deferred"],
        "suppressed": {k: v for k, v in counts["suppressed"].items() if v},
        "ineligible": {k: v for k, v in counts["ineligible"].items() if v},
        "by_treatment": counts["by_treatment"],
    }


async def _trigger_outcomes(stack: Stack) -> dict[tuple[str, str], float]:
    async with httpx.AsyncClient(base_url=stack.url("decision")) as c:
        text = (await c.get("/metrics")).text
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "kairos_decision_outcomes":
            continue
        for s in fam.samples:
            if s.name.endswith("_total") and s.labels.get("flow") == "trigger":
                out[(s.labels["status"], s.labels["reason"])] = s.value
    return out


def _diff(after: dict[tuple[str, str], float], before: dict[tuple[str, str], float]) -> Counted:
    """The trigger flow's outcomes between two metric readings, as run counts."""
    n = {k: int(v - before.get(k, 0)) for k, v in after.items() if v - before.get(k, 0)}
    return {
        "processed": sum(n.values()),
        "control": n.get(("control", "control"), 0),
        "dispatched": n.get(("dispatched", "dispatched"), 0),
        "deferred": sum(v for (s, _), v in n.items() if s == "deferred"),
        "suppressed": {r: v for (s, r), v in n.items() if s == "suppressed"},
        "ineligible": {r: v for (s, r), v in n.items() if s == "ineligible"},
    }


async def test_a_trigger_its_simulation_a_run_and_its_simulation_count_alike(
    gw: httpx.AsyncClient, stack: Stack, listen: Listener
) -> None:
    u = uuid.uuid4().hex[:8]
    cid, tp, etype = f"drift-{u}", f"drift_{u}", f"drift.{u}"
    people = _people(u)
    r = await gw.post(
        "/v1/customers:import",
        content=b"\n".join(orjson.dumps(p) for p in people.values()),
        headers={"content-type": "application/x-ndjson"},
    )
    assert r.status_code in (200, 202), r.text
    r = await gw.put("/v1/contact-policy", json={"rules": []})  # no caps, no global control
    assert r.status_code == 200, r.text
    for oid in (f"std-{u}", f"gold-{u}"):
        body = {"name": oid, "content": {"default": {"text": "Hi {{ attributes.first_name }}"}}}
        assert (await gw.put(f"/v1/offers/{oid}", json=body)).status_code == 200
    common: dict[str, Any] = {
        "name": cid,
        "channels": ["sms"],
        "treatments": [
            {"id": "std", "offer": f"std-{u}"},
            {"id": "gold", "offer": f"gold-{u}", "tier": {"tag": "gold"}},
        ],
        "control_group": SHARE,
        "approval_required": False,
    }
    triggered = {
        **common,
        "type": "triggered",
        "touchpoints": [tp],  # lets the test see when the catalog is live
        "audience": {"tag": f"drift:{u}"},
        "trigger": {"event": etype, "where": {"tag": "keen"}},
    }
    assert (await gw.put(f"/v1/campaigns/{cid}", json=triggered)).status_code == 200
    assert (await gw.post(f"/v1/campaigns/{cid}/activate")).status_code == 200
    first = next(iter(people))

    async def considered() -> list[str]:
        async with httpx.AsyncClient(base_url=stack.url("gateway"), headers=auth("pos")) as pos:
            r = await pos.post(
                "/v1/decisions?explain=true&dry_run=true",
                json={"customer_id": first, "touchpoint": tp},
            )
        return [e["campaign_id"] for e in r.json().get("explain") or ()]

    await eventually(considered, lambda ids: cid in ids)
    want = _expected(people, cid)

    # 1. the trigger: one event per customer
    before = await _trigger_outcomes(stack)
    async with httpx.AsyncClient(base_url=stack.url("gateway"), headers=auth("events")) as app:
        events = [{"type": etype, "customer_id": c, "properties": {}} for c in people]
        r = await app.post("/v1/events", json={"events": events})
        assert r.status_code == 202, r.text
    after = await eventually(
        lambda: _trigger_outcomes(stack),
        lambda a: _diff(a, before)["processed"] >= N,
        timeout=60,
    )
    fired = _diff(after, before)
    sent = await eventually(
        lambda: _sent(listen, cid), lambda s: len(s) >= want["dispatched"], timeout=30
    )
    treatments: dict[str, int] = {}
    for d in sent:
        treatments[d["treatment"]] = treatments.get(d["treatment"], 0) + 1
    fired["by_treatment"] = treatments
    held = [c for c in listen.recorded(cid) if c.get("control")]
    assert len(held) == fired["control"]
    assert fired == {
        "processed": N,
        "control": want["control"],
        "dispatched": want["dispatched"],
        "deferred": 0,
        "suppressed": {k: want[k] for k in ("consent", "unreachable") if want[k]},
        "ineligible": {"where": want["where"]},
        "by_treatment": want["by_treatment"],
    }

    # 2. its simulation replays the same events through the same steps
    r = await gw.post(f"/v1/campaigns/{cid}/simulate")
    assert r.status_code == 200, r.text
    assert r.json()["kind"] == "triggers" and _of(r.json()) == fired

    # 3. the same campaign as a batch over the keen part of the audience: simulate, then run
    assert (await gw.post(f"/v1/campaigns/{cid}/pause")).status_code == 200
    batch = {
        **common,
        "type": "batch",
        "audience": {"all": [{"tag": f"drift:{u}"}, {"tag": "keen"}]},
    }
    assert (await gw.put(f"/v1/campaigns/{cid}", json=batch)).status_code == 200
    assert (await gw.post(f"/v1/campaigns/{cid}/activate")).status_code == 200
    keen = N - want["where"]
    await eventually(
        lambda: gw.post("/v1/segments:preview", json={"rule": batch["audience"]}),
        lambda r: r.status_code == 200 and r.json()["count"] == keen,
    )
    r = await gw.post(f"/v1/campaigns/{cid}/simulate")
    assert r.status_code == 200, r.text
    simulated = _of(r.json())
    r = await gw.post(f"/v1/campaigns/{cid}/runs")
    assert r.status_code == 202, r.text
    run_id = r.json()["run_id"]
    run = await eventually(
        lambda: gw.get(f"/v1/campaigns/{cid}/runs/{run_id}"),
        lambda r: r.json()["status"] != "running",
        timeout=60,
    )
    assert run.json()["status"] == "completed"
    ran = _of(run.json())
    without_where = {**fired, "processed": keen, "ineligible": {}}
    assert simulated == ran == without_where


async def _sent(listen: Listener, cid: str) -> list[dict[str, Any]]:
    return listen.sent(cid)
