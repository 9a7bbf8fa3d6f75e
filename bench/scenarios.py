"""The measured scenarios (each returns one run's figures)."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import psutil
from nats.js.errors import NotFoundError
from redis.asyncio import Redis

from bench.loadgen import open_loop
from shared import demo
from shared.contracts.bus import ImportBatch, ProfileCounted
from shared.events import CloudEvent
from shared.stack import Stack


@dataclass
class Context:
    stack: Stack
    key: str
    floor_port: int
    tmp: Path
    duration: float
    customers: int
    tags_max: int
    imported: bool = False
    prepared: set[str] = field(default_factory=set)

    @property
    def gw_port(self) -> int:
        return self.stack.ports["gateway"]

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}", "content-type": "application/json"}


def _event(cid: str, etype: str = "app.opened") -> dict[str, Any]:
    return {"type": etype, "customer_id": cid, "properties": {"screen": "home"}}


async def import_known(ctx: Context, prefix: str, requests: int, per_request: int) -> None:
    """Import the customers ``<prefix>-<i>-<j>`` a phase's requests will name (request i,
    event j), then wait until the import's own announcements are out of the way."""
    lines = b"".join(
        orjson.dumps({"customer_id": f"{prefix}-{i}-{j}", "attributes": {"i": i}}) + b"\n"
        for i in range(requests)
        for j in range(per_request)
    )
    async with httpx.AsyncClient(timeout=None) as c:
        r = await c.post(
            f"{ctx.stack.url('gateway')}/v1/customers:import",
            content=lines,
            headers={**ctx.headers, "content-type": "application/x-ndjson"},
        )
        assert r.status_code == 200, r.text
    await _drain(ctx)


async def _lag_at(
    ctx: Context, rate_events: int, per_request: int, run: int, *, known: bool = True
) -> dict[str, Any]:
    """Events/s at a fixed rate; lag = 202 → the ``profile.counted`` of the batch that applied
    the customer's event (an upper bound of when the view shows it: the announcement is
    published after its commit).

    ``known``: the customers exist already (imported first), as for most live traffic;
    otherwise every event creates its customer (first sight, the worst case)."""
    prefix = ctx.stack.env["KAIROS_BUS_PREFIX"]
    nc = await nats.connect(ctx.stack.env["KAIROS_NATS_URL"])
    accepted_at: dict[str, float] = {}
    lags: list[float] = []
    tag = uuid.uuid4().hex[:6]

    # A change can be seen before the load generator has read the 202 of its request (the
    # profile was quicker than the answer's way back): kept, and counted when the 202 comes.
    early: dict[str, float] = {}

    http = httpx.AsyncClient(base_url=ctx.stack.url("profile"), timeout=30)

    def seen(cid: str, at: float) -> None:
        t = accepted_at.pop(cid, None)
        if t is not None:
            lags.append(at - t)
        elif cid.startswith(f"lag-{tag}-{run}-"):
            early[cid] = at

    async def on_counted(msg: Any) -> None:
        # One announcement per applied event batch; its customers are read from the profile
        # service, as selection reads them (the time is the announcement's arrival).
        at = time.perf_counter()
        counted = ProfileCounted.parse(CloudEvent.from_bytes(msg.data))
        r = await http.get(f"/internal/import-batches/{counted.batch_id}")
        if r.status_code == 200:
            for cid in ImportBatch.model_validate_json(r.content).customers:
                seen(cid, at)

    sub = await nc.subscribe(f"{prefix}.{ProfileCounted.TYPE}", cb=on_counted)

    def make(i: int) -> tuple[str, str, bytes]:
        evs = [_event(f"lag-{tag}-{run}-{i}-{j}") for j in range(per_request)]
        return "POST", "/v1/events", orjson.dumps({"events": evs})

    def done(i: int, at: float, _: bytes) -> None:
        for j in range(per_request):
            cid = f"lag-{tag}-{run}-{i}-{j}"
            seen = early.pop(cid, None)
            if seen is not None:
                lags.append(seen - at)  # applied before its 202 was read: a negative lag
            else:
                accepted_at[cid] = at

    req_rate = rate_events / per_request
    if known:
        await import_known(ctx, f"lag-{tag}-{run}", int(req_rate * ctx.duration), per_request)
    res = await open_loop(
        "127.0.0.1",
        ctx.gw_port,
        ctx.headers,
        make,
        rate=req_rate,
        duration=ctx.duration,
        connections=32,
        on_done=done,
    )
    deadline = time.perf_counter() + 30
    while accepted_at and time.perf_counter() < deadline:
        await asyncio.sleep(0.1)
    await sub.unsubscribe()
    await nc.close()
    await http.aclose()
    lags.sort()
    n = len(lags)
    return {
        "offered_events_per_s": rate_events,
        "achieved_events_per_s": round(res.rate * per_request, 1),
        "http_p99_ms": round(res.pct(99) * 1000, 2),
        "lag_p50_ms": round(lags[n // 2] * 1000, 1) if n else None,
        "lag_p99_ms": round(lags[min(n - 1, int(0.99 * n))] * 1000, 1) if n else None,
        "lag_max_ms": round(lags[-1] * 1000, 1) if n else None,
        "events_not_seen": len(accepted_at),
        "outbox_backlog_after": await _outbox(ctx),
    }


async def _pending(ctx: Context, consumer: str = "profile-events") -> int:
    nc = await nats.connect(ctx.stack.env["KAIROS_NATS_URL"])
    try:
        js = nc.jetstream()
        prefix = ctx.stack.env["KAIROS_BUS_PREFIX"]
        try:
            info = await js.consumer_info(f"{prefix.upper()}_EVENTS", f"{prefix}_{consumer}")
        except NotFoundError:
            return 0
        return int(info.num_pending + info.num_ack_pending)
    finally:
        await nc.close()


async def _outbox(ctx: Context) -> int:
    import asyncpg

    url = ctx.stack.env["KAIROS_DATABASE_URL"].replace("+asyncpg", "")
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM profile.outbox"))
    finally:
        await conn.close()


async def _drain(ctx: Context, timeout: float = 300) -> float:
    """Wait until the profile consumer has nothing pending and its outbox is empty (so one
    phase's backlog does not leak into the next); returns the seconds it took."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if (
            await _pending(ctx) == 0
            and await _outbox(ctx) == 0
            and await _pending(ctx, "decision-triggers") == 0
        ):
            break
        await asyncio.sleep(0.1)
    return time.perf_counter() - t0


async def _import(ctx: Context) -> dict[str, Any]:
    path = ctx.tmp / "customers.ndjson"
    demo.write_customers(path, ctx.customers, tags_min=20, tags_max=ctx.tags_max)
    size = path.stat().st_size
    redis = Redis.from_url(ctx.stack.env["KAIROS_REDIS_URL"])
    before = int((await redis.info("memory"))["used_memory"])
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=None) as c:

        async def chunks() -> Any:
            with path.open("rb") as fh:
                while block := fh.read(1 << 20):
                    yield block

        r = await c.post(
            f"{ctx.stack.url('gateway')}/v1/customers:import",
            content=chunks(),
            headers={**ctx.headers, "content-type": "application/x-ndjson"},
        )
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    doc = r.json()
    after = int((await redis.info("memory"))["used_memory"])
    await redis.aclose()
    return {
        "customers": doc["imported"],
        "failed": doc["failed"],
        "file_mb": round(size / 1e6, 1),
        "seconds": round(elapsed, 2),
        "customers_per_s": round(doc["imported"] / elapsed, 1),
        "redis_bytes_per_profile": round((after - before) / max(1, doc["imported"])),
    }


async def profile(ctx: Context, run: int) -> dict[str, Any]:
    """Import rate, GET latency at 500 req/s, event application rate, memory."""
    out: dict[str, Any] = {}
    if not ctx.imported:
        out["import"] = await _import(ctx)
        ctx.imported = True
    ids = [f"c-{random.randrange(ctx.customers):07d}" for _ in range(5000)]

    def get(i: int) -> tuple[str, str, bytes]:
        return "GET", f"/v1/customers/{ids[i % len(ids)]}", b""

    def get_floor(i: int) -> tuple[str, str, bytes]:
        return "GET", f"/floor/{ids[i % len(ids)]}", b""

    floor = await open_loop(
        "127.0.0.1",
        ctx.floor_port,
        ctx.headers,
        get_floor,
        rate=500,
        duration=ctx.duration,
        connections=32,
    )
    view = await open_loop(
        "127.0.0.1", ctx.gw_port, ctx.headers, get, rate=500, duration=ctx.duration, connections=32
    )
    out["get_view_at_500_rps"] = view.summary()
    out["floor_get_at_500_rps"] = floor.summary()
    out["get_p99_vs_floor_p99"] = round(view.pct(99) / floor.pct(99), 2)
    # Event application: hold the consumer, queue events, release it and time the drain.
    n_events = 50_000
    ctx.stack.stop("profile")
    async with httpx.AsyncClient(
        base_url=ctx.stack.url("gateway"), headers=ctx.headers, timeout=60
    ) as c:
        for start in range(0, n_events, 1000):
            evs = [
                {
                    "type": random.choice(demo.EVENT_TYPES),
                    "customer_id": f"c-{random.randrange(ctx.customers):07d}",
                    "properties": {"n": start},
                }
                for _ in range(1000)
            ]
            r = await c.post("/v1/events", content=orjson.dumps({"events": evs}))
            assert r.status_code == 202, r.text
    ctx.stack.start("profile")
    t0 = time.perf_counter()
    ctx.stack.wait_ready(["profile"])
    drained = await _drain(ctx)
    total = time.perf_counter() - t0
    out["event_application"] = {
        "events": n_events,
        "seconds": round(total, 2),
        "events_per_s": round(n_events / total, 1),
        "drain_after_ready_s": round(drained, 2),
    }
    rss = psutil.Process(ctx.stack.procs["profile"].pid).memory_info().rss
    out["profile_rss_mb"] = round(rss / 1e6, 1)
    return out
