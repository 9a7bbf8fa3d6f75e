"""``python -m bench ingest``: event ingestion (issue 14).

Per run, against the same run's floor (a bare FastAPI app answering the same requests):
- single-event requests/s through the gateway (closed loop, 32 connections);
- batched ingestion: requests of 100 events for ``duration`` seconds (closed loop, 8
  connections), then until the profile has applied every one of them and the outbox is empty.
  ``accepted_events_per_s`` is what the gateway stored per second; ``applied_events_per_s``
  is events over the time until the profile had applied them all (the end-to-end rate);
- lag from ``202`` to the ``profile.counted`` naming the customer (published after the
  commit, so an upper bound of when a read shows the event) at 1,000, 2,500 and 5,000
  events/s (open loop, requests of 50 events, known customers).
The machine's load average is recorded before and after each run (2 cores, shared), and
the CPU each process spent per event of the batched phase (what contention distorts least).
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import orjson

from bench.loadgen import closed_loop
from bench.profile_import import stack_cpu
from bench.scenarios import Context, _drain, _event, _lag_at
from shared import demo

N_CUSTOMERS = 10_000
BATCH = 100


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu(ctx: Context) -> dict[str, float]:
    """CPU seconds (user + system) each process of the stack, Postgres, Redis and NATS
    included, has used so far."""
    return stack_cpu(ctx.stack)


async def ingest(ctx: Context, run: int) -> dict[str, Any]:
    load_before = _load()
    body1 = orjson.dumps(_event("c-floor"))
    floor = await closed_loop(
        "127.0.0.1",
        ctx.floor_port,
        ctx.headers,
        lambda i: ("POST", "/floor", body1),
        concurrency=32,
        duration=ctx.duration,
    )
    tag = f"{run}-{random.getrandbits(24):06x}"

    def single(i: int) -> tuple[str, str, bytes]:
        return "POST", "/v1/events", orjson.dumps(_event(f"c-{tag}-{i % N_CUSTOMERS}"))

    one = await closed_loop(
        "127.0.0.1", ctx.gw_port, ctx.headers, single, concurrency=32, duration=ctx.duration
    )
    await _drain(ctx)

    def batch(i: int) -> tuple[str, str, bytes]:
        evs = [
            _event(f"c-{tag}-{(i * BATCH + j) % N_CUSTOMERS}", random.choice(demo.BASE_EVENTS))
            for j in range(BATCH)
        ]
        return "POST", "/v1/events", orjson.dumps({"events": evs})

    cpu0 = _cpu(ctx)
    t0 = time.perf_counter()
    batched = await closed_loop(
        "127.0.0.1", ctx.gw_port, ctx.headers, batch, concurrency=8, duration=ctx.duration
    )
    drain_s = await _drain(ctx)
    total_s = time.perf_counter() - t0
    accepted = batched.statuses.get(202, 0) * BATCH
    cpu1 = _cpu(ctx)
    # CPU per event is what a busy, shared machine cannot distort much (wall-clock rates are
    # bounded by what the other tenants leave): microseconds per event, by process.
    cpu_us = {
        n: round((cpu1[n] - cpu0[n]) / accepted * 1e6, 1) for n in cpu1 if accepted and n in cpu0
    }
    lags = {}
    for rate in (1000, 2500, 5000):
        lags[f"at_{rate}_per_s"] = await _lag_at(ctx, rate, 50, run, known=True)
        await _drain(ctx)
    return {
        "load_avg_before": load_before,
        "load_avg_after": _load(),
        "floor_bare_fastapi": floor.summary(),
        "single_event_requests": one.summary(),
        "single_vs_floor_ratio": round(one.rate / floor.rate, 3) if floor.rate else None,
        "batch100_requests": batched.summary(),
        "accepted_events_per_s": round(accepted / batched.elapsed, 1),
        "applied_events_per_s": round(accepted / total_s, 1),
        "drain_after_batches_s": round(drain_s, 2),
        "cpu_us_per_event": cpu_us,
        "lag_202_to_profile": lags,
    }
