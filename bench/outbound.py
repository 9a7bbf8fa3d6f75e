"""Triggered and batch figures (issue: triggered and batch campaigns).

- 50 triggered campaigns listening to 50 of 120 event types (the other 70 are noise that
  no campaign hears): event accepted at the gateway → ``dispatch.requested`` seen on NATS,
  at 500 and 2,000 events/s (open loop), and the sustained maximum (closed loop, batches);
- a batch run over the whole imported population with tiers, a control group and the
  contact ledger: start → every dispatch request published (the run completes only after
  JetStream acknowledged each page), and the decision process's peak RSS;
- timers: 100,000 pending ``unless`` timers, the lateness of 2,000 delayed triggers firing
  among them, and recovery after a SIGKILL of the decision process while timers fall due.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from datetime import datetime
from typing import Any

import httpx
import nats
import orjson

from bench.loadgen import closed_loop, open_loop
from bench.scenarios import Context, _drain, _import

LISTENED = 50
TYPES = 120
ADULT = {"attr": "age", "op": "gte", "value": 18}


def _rss_peak_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status").read().splitlines():  # noqa: SIM115
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status").read().splitlines():  # noqa: SIM115
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


async def _campaign(c: httpx.AsyncClient, cid: str, body: dict[str, Any]) -> None:
    body = {"name": cid, "approval_required": False, **body}
    r = await c.put(f"/v1/campaigns/{cid}", json=body)
    assert r.status_code == 200, r.text
    r = await c.post(f"/v1/campaigns/{cid}/activate")
    assert r.status_code == 200, r.text


async def _setup(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not ({"selection", "profile-import"} & ctx.prepared):
        out["import"] = await _import(ctx)
        ctx.prepared.add("profile-import")
        out["import_drained_s"] = round(await _drain(ctx, timeout=1800), 1)
    async with httpx.AsyncClient(
        base_url=ctx.stack.url("gateway"), headers=ctx.headers, timeout=60
    ) as c:
        r = await c.put(
            "/v1/contact-policy",
            json={
                "rules": [
                    {"channel": "*", "max": 10_000, "per": "1d"},
                    {"channel": "sms", "max": 5_000, "per": "1d"},
                    {"channel": "email", "max": 5_000, "per": "7d", "on_cap": "defer"},
                ],
                "global_control": 0.02,
            },
        )
        assert r.status_code == 200, r.text
        for i in range(10):
            r = await c.put(
                f"/v1/offers/ob-off-{i}",
                json={
                    "name": f"Offer {i}",
                    "value": 1 + i,
                    "link": f"https://example.com/o/{i}",
                    "content": {
                        "default": {
                            "title": "Hi {{ attributes.first_name }}",
                            "body": "Offer {{ event.properties.n }} for you",
                        },
                        "sms": {"text": "{{ attributes.first_name }}: offer " + str(i)},
                        "email": {
                            "subject": "For you",
                            "text": "Hello {{ attributes.first_name }}",
                        },
                    },
                },
            )
            assert r.status_code == 200, r.text
        for k in range(LISTENED):
            await _campaign(
                c,
                f"ob-trig-{k}",
                {
                    "type": "triggered",
                    "priority": 10 + k,
                    "audience": ADULT,
                    "trigger": {
                        "event": f"ob.t{k}",
                        "where": {"prop": "n", "op": "gte", "value": 0},
                    },
                    "channels": ["push", "sms", "email"],
                    "treatments": [
                        {"id": "A", "offer": f"ob-off-{k % 10}", "weight": 1},
                        {"id": "B", "offer": f"ob-off-{(k + 3) % 10}", "weight": 1},
                    ],
                    "control_group": 0.05,
                    "reentry": {"max": 1000, "per": "1d"},
                },
            )
        await _campaign(
            c,
            "ob-unless",
            {
                "type": "triggered",
                "trigger": {"event": "ob.cart", "unless": {"event": "ob.order", "within": "1h"}},
                "channels": ["sms", "email"],
                "treatments": [{"id": "A", "offer": "ob-off-0", "weight": 1}],
            },
        )
        await _campaign(
            c,
            "ob-soon",
            {
                "type": "triggered",
                "trigger": {"event": "ob.soon", "delay": "4s"},
                "channels": ["sms", "email"],
                "treatments": [{"id": "A", "offer": "ob-off-1", "weight": 1}],
            },
        )
    out["triggered_campaigns"] = LISTENED + 2
    out["event_types_sent"] = TYPES
    await asyncio.sleep(2)
    return out


class Seen:
    """``dispatch.requested`` as it is published: time seen per event id / timer due."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.by_event: dict[str, float] = {}
        self.lateness: list[float] = []
        self.fired_at: list[float] = []  # perf_counter of each timer-born request
        self.count = 0
        self.campaigns: dict[str, int] = {}

    async def __aenter__(self) -> Seen:
        prefix = self.ctx.stack.env["KAIROS_BUS_PREFIX"]
        self.nc = await nats.connect(self.ctx.stack.env["KAIROS_NATS_URL"])

        async def on(msg: Any) -> None:
            now = time.perf_counter()
            wall = time.time()
            d = orjson.loads(msg.data)["data"]
            self.count += 1
            cmp = d.get("campaign_id", "")
            self.campaigns[cmp] = self.campaigns.get(cmp, 0) + 1
            if d.get("event_id"):
                self.by_event.setdefault(d["event_id"], now)
            if d.get("due"):
                due = datetime.fromisoformat(d["due"]).timestamp()
                self.lateness.append(wall - due)
                self.fired_at.append(now)

        self.sub = await self.nc.subscribe(f"{prefix}.dispatch.requested.>", cb=on)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.unsubscribe()
        await self.nc.close()


def _pcts(xs: list[float]) -> dict[str, float | int | None]:
    xs = sorted(xs)
    n = len(xs)
    if not n:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "n": n,
        "p50_ms": round(xs[n // 2] * 1000, 1),
        "p99_ms": round(xs[min(n - 1, int(0.99 * n))] * 1000, 1),
        "max_ms": round(xs[-1] * 1000, 1),
    }


async def _events_at(ctx: Context, rate: float, run: int) -> dict[str, Any]:
    sent: dict[str, float] = {}
    rng = random.Random(run * 7919 + int(rate))

    def make(i: int) -> tuple[str, str, bytes]:
        eid = str(uuid.uuid4())
        k = rng.randrange(TYPES)
        etype = f"ob.t{k}" if k < LISTENED else f"ob.noise{k}"
        if k < LISTENED:
            sent[eid] = time.perf_counter()
        ev = {
            "id": eid,
            "type": etype,
            "customer_id": f"c-{rng.randrange(ctx.customers):07d}",
            "properties": {"n": i},
        }
        return "POST", "/v1/events", orjson.dumps(ev)

    async with Seen(ctx) as seen:
        res = await open_loop(
            "127.0.0.1",
            ctx.gw_port,
            ctx.headers,
            make,
            rate=rate,
            duration=ctx.duration,
            connections=64,
        )
        await asyncio.sleep(5)
    lat = [seen.by_event[e] - t for e, t in sent.items() if e in seen.by_event]
    return {
        "offered_events_per_s": rate,
        "achieved_events_per_s": round(res.rate, 1),
        "http_p99_ms": round(res.pct(99) * 1000, 1),
        "listened_events": len(sent),
        "dispatched": len(lat),
        "event_to_dispatch": _pcts(lat),
    }


async def _sustained(ctx: Context, run: int) -> dict[str, Any]:
    rng = random.Random(run)
    per = 100

    def make(i: int) -> tuple[str, str, bytes]:
        evs = [
            {
                "type": f"ob.t{rng.randrange(LISTENED)}",
                "customer_id": f"c-{rng.randrange(ctx.customers):07d}",
                "properties": {"n": i},
            }
            for _ in range(per)
        ]
        return "POST", "/v1/events", orjson.dumps({"events": evs})

    async with Seen(ctx) as seen:
        t0 = time.perf_counter()
        res = await closed_loop(
            "127.0.0.1", ctx.gw_port, ctx.headers, make, concurrency=8, duration=ctx.duration
        )
        accepted = len(res.latencies) * per
        last, stable = seen.count, 0
        while stable < 20:  # until nothing more arrives for 2 s
            await asyncio.sleep(0.1)
            stable = stable + 1 if seen.count == last else 0
            last = seen.count
        elapsed = time.perf_counter() - t0 - 2.0
    return {
        "accepted_events_per_s": round(accepted / res.elapsed, 1),
        "dispatched": seen.count,
        "dispatched_per_s": round(seen.count / elapsed, 1),
    }


async def _timers(ctx: Context, run: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pid = ctx.stack.procs["decision"].pid
    tag = uuid.uuid4().hex[:6]
    async with httpx.AsyncClient(
        base_url=ctx.stack.url("gateway"), headers=ctx.headers, timeout=120
    ) as c:
        if "ob-timers" not in ctx.prepared:  # 100,000 pending `unless` timers (1 h windows)
            t0 = time.perf_counter()
            for start in range(0, 100_000, 500):
                evs = [
                    {
                        "type": "ob.cart",
                        "customer_id": f"c-{(start + j) % ctx.customers:07d}",
                        "properties": {"n": start + j},
                    }
                    for j in range(500)
                ]
                r = await c.post("/v1/events", json={"events": evs})
                assert r.status_code == 202, r.text
            await _drain(ctx)
            out["pending_timers_created_s"] = round(time.perf_counter() - t0, 1)
            ctx.prepared.add("ob-timers")
        out["pending_timers"] = await _count_timers(ctx)
        async with Seen(ctx) as seen:
            # 2,000 delayed triggers (4 s) firing among the pending ones
            for start in range(0, 2000, 500):
                evs = [
                    {
                        "type": "ob.soon",
                        "customer_id": f"c-{(start + j) * 37 % ctx.customers:07d}",
                        "properties": {"n": j, "tag": tag},
                    }
                    for j in range(500)
                ]
                r = await c.post("/v1/events", json={"events": evs})
                assert r.status_code == 202, r.text
                await asyncio.sleep(0.25)
            await asyncio.sleep(8)
            out["delayed_fired"] = len(seen.lateness)
            out["lateness"] = _pcts(seen.lateness)
            # restart recovery: 1,000 timers fall due while the process is dead
            seen.lateness.clear()
            seen.fired_at.clear()
            evs = [
                {
                    "type": "ob.soon",
                    "customer_id": f"c-{(j * 53 + run) % ctx.customers:07d}",
                    "properties": {"n": j, "tag": tag + "r"},
                }
                for j in range(1000)
            ]
            r = await c.post("/v1/events", json={"events": evs})
            assert r.status_code == 202, r.text
            await asyncio.sleep(2.5)  # the timers exist (due in 4 s)
            ctx.stack.stop("decision", kill=True)
            await asyncio.sleep(3)  # they fall due while nothing runs
            before = len(seen.fired_at)
            t0 = time.perf_counter()
            ctx.stack.start("decision")
            ctx.stack.wait_ready(["decision"], timeout=300)
            ready = time.perf_counter() - t0
            last, quiet = len(seen.fired_at), 0
            while quiet < 40 or len(seen.fired_at) == before:  # until 2 s without a new one
                await asyncio.sleep(0.05)
                quiet = quiet + 1 if len(seen.fired_at) == last else 0
                last = len(seen.fired_at)
                if time.perf_counter() - t0 > 120:
                    break
            after = seen.fired_at[before:]
            out["restart"] = {
                "ready_s": round(ready, 2),
                "timers_due_while_down_all_fired_s": round(max(after) - t0, 2) if after else None,
                "first_fired_s": round(min(after) - t0, 2) if after else None,
                "fired_after_restart": len(after),
                "fired_before_kill": before,
            }
    out["decision_rss_mb"] = _rss_mb(ctx.stack.procs["decision"].pid)
    del pid
    return out


async def _count_timers(ctx: Context) -> int:
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    eng = create_async_engine(ctx.stack.env["KAIROS_DATABASE_URL"])
    try:
        async with eng.begin() as conn:
            return int(
                (await conn.execute(sa.text("SELECT count(*) FROM decision.timer"))).scalar() or 0
            )
    finally:
        await eng.dispose()


async def _batch(ctx: Context, run: int) -> dict[str, Any]:
    cid = f"ob-batch-{run}-{uuid.uuid4().hex[:4]}"
    async with httpx.AsyncClient(
        base_url=ctx.stack.url("gateway"), headers=ctx.headers, timeout=600
    ) as c:
        await _campaign(
            c,
            cid,
            {
                "type": "batch",
                "audience": {"attr": "age", "op": "gte", "value": 16},
                "channels": ["push", "sms", "email"],
                "treatments": [
                    {"id": "std", "offer": "ob-off-2", "weight": 2},
                    {"id": "alt", "offer": "ob-off-3", "weight": 1},
                    {
                        "id": "vip",
                        "offer": "ob-off-9",
                        "tier": {"attr": "value_tier", "op": "in", "value": ["gold", "platinum"]},
                    },
                ],
                "control_group": 0.1,
                "reentry": {"max": 1, "per": "30d"},
            },
        )
        await asyncio.sleep(1)
        async with Seen(ctx) as seen:
            t0 = time.perf_counter()
            r = await c.post(f"/v1/campaigns/{cid}/runs")
            assert r.status_code == 202, r.text
            run_id = r.json()["run_id"]
            while True:
                info = (await c.get(f"/v1/campaigns/{cid}/runs/{run_id}")).json()
                if info["status"] != "running":
                    break
                await asyncio.sleep(0.25)
            total = time.perf_counter() - t0
            await asyncio.sleep(2)
            seen_n = seen.campaigns.get(cid, 0)
    pid = ctx.stack.procs["decision"].pid
    return {
        "status": info["status"],
        "selected": info["selected"],
        "control": info["control"],
        "dispatched": info["dispatched"],
        "deferred": info["deferred"],
        "suppressed": info["suppressed"],
        "by_treatment": info["by_treatment"],
        "by_channel": info["by_channel"],
        "dispatch_requests_seen": seen_n,
        "seconds_until_all_published": round(total, 1),
        "members_per_s": round(info["selected"] / total, 1),
        "decision_rss_mb": _rss_mb(pid),
        "decision_rss_peak_mb": _rss_peak_mb(pid),
    }


async def outbound(ctx: Context, run: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "outbound" not in ctx.prepared:
        out["setup"] = await _setup(ctx)
        ctx.prepared.add("outbound")
    out["at_500_eps"] = await _events_at(ctx, 500, run)
    out["at_2000_eps"] = await _events_at(ctx, 2000, run)
    out["sustained"] = await _sustained(ctx, run)
    await _drain(ctx)
    out["batch_run"] = await _batch(ctx, run)
    out["timers"] = await _timers(ctx, run)
    return out
