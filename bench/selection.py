"""Selection figures (issue: rules and selection), through the gateway, on a generated
population with a 1,500-tag vocabulary: preview latency by rule size, breakdowns, a
~500,000-member snapshot and paging it, index freshness under 2,000 profile changes/s,
index memory, restart (saved index) and cold rebuild (profile export) times."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from typing import Any

import httpx
import nats
import orjson
import psutil

from bench.loadgen import closed_loop, open_loop
from bench.rules_eval import rule_of
from bench.scenarios import Context, _drain
from shared import demo

VOCAB = 1500


def _client(ctx: Context) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=ctx.stack.url("gateway"), headers=ctx.headers, timeout=600)


async def _status(c: httpx.AsyncClient) -> dict[str, Any]:
    r = await c.get("/v1/segments:status")
    return r.json() if r.status_code == 200 else {"state": f"http {r.status_code}", "customers": 0}


async def _setup(ctx: Context) -> dict[str, Any]:
    """Import the population, let the index take it in, give a share of it behaviour."""
    path = ctx.tmp / "selection-customers.ndjson"
    demo.write_customers(path, ctx.customers, tags_min=20, tags_max=ctx.tags_max, vocab=VOCAB)
    out: dict[str, Any] = {"customers": ctx.customers, "tag_vocabulary": VOCAB}
    t0 = time.perf_counter()
    async with _client(ctx) as c:

        async def chunks() -> Any:
            with path.open("rb") as fh:
                while block := fh.read(1 << 20):
                    yield block

        r = await c.post(
            "/v1/customers:import",
            content=chunks(),
            headers={"content-type": "application/x-ndjson"},
        )
        assert r.status_code == 200, r.text
        out["import_s"] = round(time.perf_counter() - t0, 1)
        while (await _status(c))["customers"] < ctx.customers:
            if time.perf_counter() - t0 > 3600:
                raise RuntimeError(f"index holds {(await _status(c))['customers']} customers")
            await asyncio.sleep(0.5)
        out["index_caught_up_after_import_s"] = round(time.perf_counter() - t0, 1)
        # Behaviour for the event-count clauses: top-ups for a fifth of the population.
        n_events = ctx.customers // 5
        for _ in range(0, n_events, 1000):
            evs = [
                {
                    "type": "topup",
                    "customer_id": f"c-{random.randrange(ctx.customers):07d}",
                    "properties": {"amount": random.choice([5, 10, 20])},
                }
                for _ in range(1000)
            ]
            r = await c.post("/v1/events", content=orjson.dumps({"events": evs}))
            assert r.status_code == 202, r.text
        await _drain(ctx, timeout=900)
        await _index_caught_up(ctx, c)
        out["topup_events"] = n_events
    return out


async def _index_caught_up(ctx: Context, c: httpx.AsyncClient, timeout: float = 900) -> None:
    """Wait until the index has applied everything on the PROFILE stream (so that measured
    previews do not compete with a backlog being applied)."""
    prefix = ctx.stack.env["KAIROS_BUS_PREFIX"]
    nc = await nats.connect(ctx.stack.env["KAIROS_NATS_URL"])
    try:
        info = await nc.jetstream().stream_info(f"{prefix.upper()}_PROFILE")
        last = int(info.state.last_seq)
    finally:
        await nc.close()
    t0 = time.perf_counter()
    while (await _status(c)).get("profile_seq", 0) < last and time.perf_counter() - t0 < timeout:
        await asyncio.sleep(0.5)


def _preview(rule: dict[str, Any], **kw: Any) -> Any:
    body = orjson.dumps({"rule": rule, "sample": 10, **kw})

    def make(i: int) -> tuple[str, str, bytes]:
        return "POST", "/v1/segments:preview", body

    return make


async def _latency(ctx: Context, make: Any, seconds: float) -> dict[str, Any]:
    res = await closed_loop(
        "127.0.0.1", ctx.gw_port, ctx.headers, make, concurrency=1, duration=seconds
    )
    return res.summary()


async def _freshness(ctx: Context, c: httpx.AsyncClient, seconds: float) -> dict[str, Any]:
    """2,000 profile changes/s (events in batches of 50), while probes PATCH a tag onto one
    customer and poll a preview for it: change accepted → preview shows it."""
    probe_lags: list[float] = []
    stop = asyncio.Event()

    def batch(i: int) -> tuple[str, str, bytes]:
        evs = [
            {"type": "app.opened", "customer_id": f"c-{random.randrange(ctx.customers):07d}"}
            for _ in range(50)
        ]
        return "POST", "/v1/events", orjson.dumps({"events": evs})

    async def probes() -> None:
        while not stop.is_set():
            tag = f"probe:{uuid.uuid4().hex[:8]}"
            cid = f"c-{random.randrange(ctx.customers):07d}"
            t0 = time.perf_counter()
            r = await c.patch(f"/v1/customers/{cid}", json={"tags_add": [tag]})
            assert r.status_code == 200, r.text
            body = {"rule": {"tag": tag}, "sample": 0}
            while True:
                p = await c.post("/v1/segments:preview", json=body)
                if p.status_code == 200 and p.json()["count"] == 1:
                    break
                await asyncio.sleep(0.01)
            probe_lags.append(time.perf_counter() - t0)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(probes())
    load = await open_loop(
        "127.0.0.1", ctx.gw_port, ctx.headers, batch, rate=40, duration=seconds, connections=8
    )
    stop.set()
    await task
    xs = sorted(probe_lags)
    return {
        "changes_per_s_offered": 2000,
        "changes_per_s_accepted": round(load.rate * 50, 1),
        "probes": len(xs),
        "p50_ms": round(statistics.median(xs) * 1000, 1) if xs else None,
        "p99_ms": round(xs[min(len(xs) - 1, int(0.99 * len(xs)))] * 1000, 1) if xs else None,
        "max_ms": round(xs[-1] * 1000, 1) if xs else None,
    }


async def selection(ctx: Context, run: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "selection" not in ctx.prepared:
        out["setup"] = await _setup(ctx)
        ctx.prepared.add("selection")
    secs = max(3.0, ctx.duration)
    async with _client(ctx) as c:
        for n in (3, 10, 30):
            make = _preview(rule_of(n))
            first = (await c.post("/v1/segments:preview", content=make(0)[2])).json()
            out[f"preview_{n}_clauses"] = {
                **(await _latency(ctx, make, secs)),
                "count": first["count"],
            }
        brk = _preview(
            rule_of(10), breakdown=["attributes.region", "attributes.value_tier", "tags:value"]
        )
        out["preview_10_clauses_with_breakdowns"] = await _latency(ctx, brk, secs)
        half = {"attr": "age", "op": "lt", "value": 51}  # ages 16..85: about half
        seg = f"seg-half-{run}"
        r = await c.put(f"/v1/segments/{seg}", json={"name": "Half", "rule": half})
        assert r.status_code == 200, r.text
        t0 = time.perf_counter()
        r = await c.post(f"/v1/segments/{seg}/snapshots")
        assert r.status_code == 201, r.text
        snap = r.json()
        snap_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cursor, seen, pages = None, 0, 0
        while True:
            params: dict[str, Any] = {"limit": 10_000, **({"cursor": cursor} if cursor else {})}
            page = (
                await c.get(f"/v1/segments/{seg}/snapshots/{snap['snapshot_id']}", params=params)
            ).json()
            seen += len(page["members"])
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        page_s = time.perf_counter() - t0
        assert seen == snap["count"]
        out["snapshot"] = {
            "members": snap["count"],
            "create_s": round(snap_s, 2),
            "paging_s": round(page_s, 2),
            "pages_of_10000": pages,
            "members_per_s_paged": round(seen / page_s),
        }
        out["freshness_under_2000_changes_per_s"] = await _freshness(ctx, c, secs * 2)
        status = await _status(c)
        out["index"] = {
            "customers": status["customers"],
            "tags": status["tags"],
            "rss_mb": round(status["rss_bytes"] / 1e6, 1),
        }
        # Restart with the saved index (SIGTERM saves it), then a cold rebuild from profile.
        t0 = time.perf_counter()
        ctx.stack.stop("selection")
        stop_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ctx.stack.start("selection")
        ctx.stack.wait_ready(["selection"], timeout=600)
        while (await _status(c))["state"] != "ready":
            await asyncio.sleep(0.2)
        out["restart"] = {
            "stop_and_save_s": round(stop_s, 2),
            "start_to_ready_s": round(time.perf_counter() - t0, 2),
            "loaded_from": (await _status(c))["loaded_from"],
            "index_file_mb": round(_index_file(ctx) / 1e6, 1),
        }
        if run == 0:
            ctx.stack.stop("selection", kill=True)
            (ctx.stack.run_dir / "selection" / "index.pickle").unlink(missing_ok=True)
            t0 = time.perf_counter()
            ctx.stack.start("selection")
            ctx.stack.wait_ready(["selection"], timeout=600)
            while (await _status(c))["state"] != "ready":
                await asyncio.sleep(0.5)
            out["cold_rebuild_from_profile_s"] = round(time.perf_counter() - t0, 1)
            rss = psutil.Process(ctx.stack.procs["selection"].pid).memory_info().rss
            out["rss_after_cold_rebuild_mb"] = round(rss / 1e6, 1)
    return out


def _index_file(ctx: Context) -> int:
    p = ctx.stack.run_dir / "selection" / "index.pickle"
    return p.stat().st_size if p.exists() else 0
