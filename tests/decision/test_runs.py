"""Batch runs over a frozen audience, on real servers: counts that add up, tiers, control,
consent, reachability, re-entry on a second run, simulation equal to the run, cancelling,
resuming after the decision process is killed mid-run, and cron ticks run once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

from services.decision import arbitration
from shared.stack import Stack
from tests.conftest import auth
from tests.decision.test_triggers import Listener


def _u() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
async def listen(stack: Stack) -> AsyncIterator[Listener]:
    async with Listener(stack) as lst:
        yield lst


async def _population(gw: httpx.AsyncClient, u: str, n: int) -> dict[str, dict[str, Any]]:
    """n customers tagged run:u: every 5th gold, every 7th without SMS consent, every 11th
    without a number."""
    people = {}
    lines = []
    for i in range(n):
        cid = f"p{i}-{u}"
        doc: dict[str, Any] = {
            "customer_id": cid,
            "attributes": {"first_name": f"N{i}"},
            "tags": [f"run:{u}"] + (["value:gold"] if i % 5 == 0 else []),
            "consents": {"sms": i % 7 != 0},
            "identities": {} if i % 11 == 0 else {"msisdn": f"+3{int(u, 16) % 10**6:06d}{i:05d}"},
        }
        people[cid] = doc
        lines.append(orjson.dumps(doc))
    r = await gw.post(
        "/v1/customers:import",
        content=b"\n".join(lines),
        headers={"content-type": "application/x-ndjson"},
    )
    assert r.status_code in (200, 202), r.text
    return people


async def _ready(gw: httpx.AsyncClient, u: str, n: int) -> None:
    for _ in range(300):
        r = await gw.post("/v1/segments:preview", json={"rule": {"tag": f"run:{u}"}})
        if r.status_code == 200 and r.json()["count"] >= n:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the audience index never saw the population")


async def _batch(gw: httpx.AsyncClient, cid: str, u: str, **kw: Any) -> None:
    for oid in (f"std-{u}", f"gold-{u}"):
        r = await gw.put(
            f"/v1/offers/{oid}",
            json={"name": oid, "content": {"default": {"text": "Hi {{ attributes.first_name }}"}}},
        )
        assert r.status_code == 200, r.text
    body = {
        "name": cid,
        "type": "batch",
        "audience": {"tag": f"run:{u}"},
        "channels": ["sms"],
        "treatments": [
            {"id": "std", "offer": f"std-{u}", "weight": 1},
            {"id": "gold", "offer": f"gold-{u}", "weight": 1, "tier": {"tag": "value:gold"}},
        ],
        "control_group": 0.2,
        "reentry": {"max": 1, "per": "30d"},
        "approval_required": False,
        **kw,
    }
    r = await gw.put(f"/v1/campaigns/{cid}", json=body)
    assert r.status_code == 200, r.text
    r = await gw.post(f"/v1/campaigns/{cid}/activate")
    assert r.status_code == 200, r.text


async def _finished(gw: httpx.AsyncClient, cid: str, run_id: str, timeout: float = 60) -> Any:
    for _ in range(int(timeout / 0.1)):
        r = await gw.get(f"/v1/campaigns/{cid}/runs/{run_id}")
        assert r.status_code == 200, r.text
        if r.json()["status"] != "running":
            return r.json()
        await asyncio.sleep(0.1)
    raise AssertionError(f"run {run_id} still running: {r.json()}")


def _expected(people: dict[str, dict[str, Any]], cid: str, share: float = 0.2) -> dict[str, Any]:
    # Control is drawn among the customers the campaign could reach (consent and address).
    consent = sum(1 for p in people.values() if not p["consents"]["sms"])
    unreachable = sum(1 for p in people.values() if p["consents"]["sms"] and not p["identities"])
    reach = {c: p for c, p in people.items() if p["consents"]["sms"] and p["identities"]}
    control = sum(1 for c in reach if arbitration.in_control(c, cid, share))
    sent = [p for c, p in reach.items() if not arbitration.in_control(c, cid, share)]
    gold = sum(1 for p in sent if "value:gold" in p["tags"])
    return {
        "control": control,
        "consent": consent,
        "unreachable": unreachable,
        "dispatched": len(sent),
        "gold": gold,
    }


async def test_batch_run_counts_tiers_control_reentry_and_simulation(
    gw: httpx.AsyncClient, listen: Listener
) -> None:
    u = _u()
    people = await _population(gw, u, 300)
    await _ready(gw, u, 300)
    cid = f"batch-{u}"
    await _batch(gw, cid, u)
    want = _expected(people, cid)

    sim = await gw.post(f"/v1/campaigns/{cid}/simulate")
    assert sim.status_code == 200, sim.text
    s = sim.json()
    assert s["kind"] == "run" and s["selected"] == 300 and s["control"] == want["control"]
    assert s["dispatched"] == want["dispatched"] and s["by_treatment"]["gold"] == want["gold"]
    assert listen.sent(cid) == []  # a simulation sends nothing

    r = await gw.post(f"/v1/campaigns/{cid}/runs")
    assert r.status_code == 202, r.text
    run = await _finished(gw, cid, r.json()["run_id"])
    assert run["status"] == "completed" and run["trigger"] == "manual"
    assert run["selected"] == run["processed"] == 300
    assert run["control"] == want["control"]
    assert run["suppressed"]["consent"] == want["consent"]
    assert run["suppressed"]["unreachable"] == want["unreachable"]
    assert run["dispatched"] == want["dispatched"] == s["dispatched"]
    assert run["by_treatment"]["gold"] == want["gold"] and run["by_channel"] == {
        "sms": want["dispatched"]
    }
    sent = await listen.wait(cid, want["dispatched"])
    await asyncio.sleep(0.5)
    sent = listen.sent(cid)
    assert len(sent) == want["dispatched"] == len({d["customer_id"] for d in sent})
    golds = [d for d in sent if d["treatment"] == "gold"]
    assert all("value:gold" in people[d["customer_id"]]["tags"] for d in golds)
    assert {d["run_id"] for d in sent} == {run["run_id"]}
    recorded = listen.recorded(cid)
    assert sum(1 for d in recorded if d["control"]) == want["control"]

    # A second run: everybody reached already had their one contact this month.
    r = await gw.post(f"/v1/campaigns/{cid}/runs")
    again = await _finished(gw, cid, r.json()["run_id"])
    assert again["dispatched"] == 0 and again["suppressed"]["reentry"] == want["dispatched"]
    listing = (await gw.get(f"/v1/campaigns/{cid}/runs")).json()
    assert [x["run_id"] for x in listing["runs"]] == [again["run_id"], run["run_id"]]


async def test_runs_are_refused_for_the_wrong_campaigns_and_can_be_cancelled(
    gw: httpx.AsyncClient, stack: Stack, listen: Listener
) -> None:
    u = _u()
    await _population(gw, u, 1200)
    await _ready(gw, u, 1200)
    cid = f"cancel-{u}"
    await _batch(gw, cid, u, control_group=0.0)
    r = await gw.post(f"/v1/campaigns/{cid}/runs/run-0000000000000000/cancel")
    assert r.status_code == 404
    r = await gw.post(f"/v1/campaigns/{cid}/runs")
    run_id = r.json()["run_id"]
    busy = await gw.post(f"/v1/campaigns/{cid}/runs")
    assert busy.status_code == 409 and run_id in busy.json()["detail"]
    c = await gw.post(f"/v1/campaigns/{cid}/runs/{run_id}/cancel")
    assert c.status_code == 200, c.text
    await asyncio.sleep(1.5)
    info = (await gw.get(f"/v1/campaigns/{cid}/runs/{run_id}")).json()
    assert info["status"] == "cancelled" and info["processed"] < 1200
    await asyncio.sleep(0.5)
    assert len(listen.sent(cid)) == info["dispatched"]  # the counts are what went out
    again = await gw.post(f"/v1/campaigns/{cid}/runs/{run_id}/cancel")
    assert again.status_code == 409

    r = await gw.post(f"/v1/campaigns/{cid}/pause")
    assert r.status_code == 200
    paused = await gw.post(f"/v1/campaigns/{cid}/runs")
    assert paused.status_code == 409 and "paused" in paused.json()["detail"]
    async with httpx.AsyncClient(base_url=stack.url("gateway"), headers=auth("pos")) as pos:
        assert (await pos.post(f"/v1/campaigns/{cid}/runs")).status_code == 403


async def test_a_run_resumes_after_the_decision_process_dies_and_sends_nobody_twice(
    gw: httpx.AsyncClient, stack: Stack, listen: Listener
) -> None:
    u = _u()
    people = await _population(gw, u, 1500)
    await _ready(gw, u, 1500)
    cid = f"resume-{u}"
    await _batch(gw, cid, u, control_group=0.0)
    r = await gw.post(f"/v1/campaigns/{cid}/runs")
    run_id = r.json()["run_id"]
    for _ in range(200):
        info = (await gw.get(f"/v1/campaigns/{cid}/runs/{run_id}")).json()
        if info["processed"] >= 100:
            break
        await asyncio.sleep(0.02)
    stack.stop("decision", kill=True)
    stack.start("decision")
    stack.wait_ready(["decision"])
    run = await _finished(gw, cid, run_id, timeout=120)  # after the lease (30 s) lapses
    assert run["status"] == "completed" and run["processed"] == 1500
    want = _expected(people, cid, 0.0)
    assert run["dispatched"] == want["dispatched"]
    await listen.wait(cid, want["dispatched"], timeout=30)  # a bounded poll
    sent = listen.sent(cid)
    assert len({d["customer_id"] for d in sent}) == want["dispatched"]
    # a page redone after the crash asks for the same contacts again (same ids): dispatch
    # de-duplicates by idempotency key; the ledger counted each customer once
    assert len({d["tracking_id"] for d in sent}) == len({d["customer_id"] for d in sent})


async def test_cron_ticks_start_one_run_each(gw: httpx.AsyncClient, stack: Stack) -> None:
    u = _u()
    await _population(gw, u, 20)
    await _ready(gw, u, 20)
    cid = f"cron-{u}"
    # croniter's sixth field is seconds: a tick every 3 s keeps the test short
    await _batch(gw, cid, u, schedule={"cron": "* * * * * */3", "timezone": "Europe/Berlin"})
    bad = await gw.put(
        f"/v1/campaigns/bad-{u}",
        json={
            "name": "x",
            "type": "batch",
            "channels": ["sms"],
            "treatments": [{"id": "a", "offer": f"std-{u}"}],
            "schedule": {"cron": "every monday", "timezone": "Mars/Olympus"},
        },
    )
    assert bad.status_code == 422
    places = {tuple(e["loc"]) for e in bad.json()["errors"]}
    assert ("schedule", "cron") in places and ("schedule", "timezone") in places
    # every replica's cron loop sees each tick; a run is unique per (campaign, tick)
    runs: list[dict[str, Any]] = []
    for _ in range(300):
        runs = (await gw.get(f"/v1/campaigns/{cid}/runs")).json()["runs"]
        if len(runs) >= 2:
            break
        await asyncio.sleep(0.1)
    assert len(runs) >= 2, runs
    assert {r["trigger"] for r in runs} == {"cron"}
    ticks = [datetime.fromisoformat(r["tick"]) for r in runs]
    assert len(set(ticks)) == len(ticks)  # one run per tick
    assert all(t.second % 3 == 0 and t.microsecond == 0 for t in ticks)
    assert all(datetime.now(UTC) - t < timedelta(minutes=1) for t in ticks)
    r = await gw.post(f"/v1/campaigns/{cid}/pause")
    assert r.status_code == 200
