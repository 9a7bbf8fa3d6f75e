"""Decision figures (issue: decision): ``POST /v1/decisions`` with 100 active realtime
campaigns over 5 touchpoints (audience rules of 5–15 clauses) and the contact policy on,
through the gateway at 300 req/s and at saturation against the bare-endpoint floor; the
same directly against one and two decision processes; catalog change → live everywhere."""

from __future__ import annotations

import asyncio
import random
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx
import orjson

from bench.loadgen import closed_loop, open_loop
from bench.rules_eval import rule_of
from bench.scenarios import Context, _import
from shared.embedded import free_port, wait_port
from shared.migrate import ROOT

TOUCHPOINTS = ["pos", "call_center", "app_home", "web_checkout", "kiosk"]
CAMPAIGNS = 100


async def _setup(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not ({"selection", "profile-import"} & ctx.prepared):
        out["import"] = await _import(ctx)
        ctx.prepared.add("profile-import")
    rng = random.Random(5)
    async with httpx.AsyncClient(
        base_url=ctx.stack.url("gateway"), headers=ctx.headers, timeout=60
    ) as c:
        r = await c.put(
            "/v1/contact-policy",
            json={
                "rules": [{"channel": "*", "max": 10_000, "per": "1d"}]
                + [{"channel": tp, "max": 5_000, "per": "1d"} for tp in TOUCHPOINTS],
                "global_control": 0.02,
            },
        )
        assert r.status_code == 200, r.text
        for i in range(25):
            r = await c.put(
                f"/v1/offers/bench-off-{i}",
                json={
                    "name": f"Offer {i}",
                    "value": round(rng.uniform(1, 20), 2),
                    "content": {
                        "default": {"title": "Hi {{ attributes.first_name }}", "body": f"Offer {i}"}
                    },
                },
            )
            assert r.status_code == 200, r.text
        clauses = []
        for i in range(CAMPAIGNS):
            n = rng.randint(5, 15)
            clauses.append(n)
            body = {
                "name": f"Campaign {i}",
                "type": "realtime",
                "priority": rng.randint(10, 90),
                "audience": rule_of(n),
                "touchpoints": [TOUCHPOINTS[i % len(TOUCHPOINTS)]],
                "treatments": [
                    {"id": "A", "offer": f"bench-off-{i % 25}", "weight": 1},
                    {"id": "B", "offer": f"bench-off-{(i + 7) % 25}", "weight": 1},
                ],
                "control_group": 0.05,
                "reentry": {"max": 50, "per": "1d"},
                "approval_required": False,
            }
            r = await c.put(f"/v1/campaigns/bench-cmp-{i}", json=body)
            assert r.status_code == 200, r.text
            r = await c.post(f"/v1/campaigns/bench-cmp-{i}/activate")
            assert r.status_code == 200, r.text
        out["campaigns"] = CAMPAIGNS
        out["audience_clauses_mean"] = round(statistics.fmean(clauses), 1)
    return out


def _decisions(ctx: Context) -> Any:
    def make(i: int) -> tuple[str, str, bytes]:
        body = {
            "customer_id": f"c-{random.randrange(ctx.customers):07d}",
            "touchpoint": TOUCHPOINTS[i % len(TOUCHPOINTS)],
            "limit": 3,
        }
        return "POST", "/v1/decisions", orjson.dumps(body)

    return make


def _floor(i: int) -> tuple[str, str, bytes]:
    return "GET", f"/floor/c-{i:07d}", b""


async def _live_everywhere(ctx: Context, urls: list[str]) -> list[float]:
    """Pause a campaign and activate it again: time until every replica agrees."""
    lags = []
    body = {"customer_id": "c-0000001", "touchpoint": "pos", "limit": 3}
    async with (
        httpx.AsyncClient(base_url=ctx.stack.url("gateway"), headers=ctx.headers, timeout=30) as gw,
        httpx.AsyncClient(timeout=30) as c,
    ):

        async def listed(url: str) -> bool:
            r = await c.post(f"{url}/v1/decisions?dry_run=true&explain=true", json=body)
            return any(e["campaign_id"] == "bench-cmp-0" for e in r.json()["explain"])

        for action, want in (("pause", False), ("activate", True)) * 3:
            t0 = time.perf_counter()
            r = await gw.post(f"/v1/campaigns/bench-cmp-0/{action}")
            assert r.status_code == 200, r.text
            for url in urls:
                while await listed(url) != want:
                    await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - t0)
    return lags


def _spawn(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A second decision process on the same stack (started before any load runs)."""
    return subprocess.Popen(
        [sys.executable, "-m", "services.decision"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def decision(ctx: Context, run: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "decision" not in ctx.prepared:
        out["setup"] = await _setup(ctx)
        ctx.prepared.add("decision")
        await asyncio.sleep(2)  # every replica reloads the catalog
    secs = ctx.duration
    make = _decisions(ctx)
    at300 = await open_loop(
        "127.0.0.1", ctx.gw_port, ctx.headers, make, rate=300, duration=secs, connections=32
    )
    out["gateway_at_300_rps"] = at300.summary()
    sat = await closed_loop(
        "127.0.0.1", ctx.gw_port, ctx.headers, make, concurrency=32, duration=secs
    )
    floor = await closed_loop(
        "127.0.0.1", ctx.floor_port, ctx.headers, _floor, concurrency=32, duration=secs
    )
    out["gateway_saturated"] = sat.summary()
    out["floor_saturated"] = floor.summary()
    out["saturated_vs_floor"] = round(sat.rate / floor.rate, 3) if floor.rate else None
    # Directly against the decision processes: one, then two replicas sharing the load.
    port1 = ctx.stack.ports["decision"]
    one = await closed_loop("127.0.0.1", port1, ctx.headers, make, concurrency=32, duration=secs)
    out["direct_one_replica_saturated"] = one.summary()
    port2 = free_port()
    env = {**ctx.stack.env, "KAIROS_DECISION_PORT": str(port2), "KAIROS_RUN_CONSUMERS": "false"}
    second = _spawn(env)
    try:
        wait_port(port2, second, "second decision replica")
        await asyncio.sleep(2)
        halves = await asyncio.gather(
            closed_loop("127.0.0.1", port1, ctx.headers, make, concurrency=16, duration=secs),
            closed_loop("127.0.0.1", port2, ctx.headers, make, concurrency=16, duration=secs),
        )
        lat = sorted(x for h in halves for x in h.latencies)
        out["direct_two_replicas_saturated"] = {
            "rate_per_s": round(sum(h.rate for h in halves), 1),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 2),
            "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2),
        }
        lags = await _live_everywhere(
            ctx, [f"http://127.0.0.1:{port1}", f"http://127.0.0.1:{port2}"]
        )
        out["catalog_change_live_on_both_replicas_ms"] = {
            "p50": round(statistics.median(lags) * 1000, 1),
            "max": round(max(lags) * 1000, 1),
            "changes": len(lags),
        }
    finally:
        second.terminate()
        second.wait(20)
    return out
