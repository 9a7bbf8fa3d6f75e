"""NATS, Redis and Postgres restarted under load: every process recovers by itself (the same
process ids before and after), a client that retries what was not answered 202 loses
nothing, nobody answers a 500 (a dependency that is down is a 503 with Retry-After), and
the whole flow (import, index, run, dispatch, provider, contact history) works again."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from shared.stack import Stack
from tests.faults.conftest import N_EVENTS, Figures
from tests.faults.flows import (
    EventLoad,
    batch_campaign,
    final_run,
    settle_delivery,
    start_run,
)

pytestmark = pytest.mark.slow

PROBE = 50  # members of the batch run that proves the whole flow works after the restart


@pytest.mark.parametrize("server", ["nats", "redis", "postgres"])
async def test_server_restart_under_load_every_process_recovers(
    fstack: Stack,
    fgw: httpx.AsyncClient,
    peers: dict[str, Any],
    figures: Figures,
    server: str,
) -> None:
    assert fstack.embedded is not None
    pids = {n: p.pid for n, p in fstack.procs.items()}
    load = EventLoad(fgw, N_EVENTS)
    down: list[float] = []

    async def fault() -> None:
        t0 = time.monotonic()
        await asyncio.to_thread(fstack.embedded.restart, server)  # type: ignore[union-attr]
        down.append(round(time.monotonic() - t0, 2))

    stalled = await load.run(fault)
    counts = await load.settle()
    t0 = time.monotonic()
    await asyncio.to_thread(fstack.wait_ready, None, 180)
    ready = round(time.monotonic() - t0, 2)
    alive = {n: p.pid for n, p in fstack.procs.items() if p.poll() is None}
    # The whole flow, end to end, after the restart.
    b = await batch_campaign(fgw, PROBE)
    run = await final_run(fgw, b.campaign, await start_run(fgw, b.campaign))
    d = await settle_delivery(fstack, peers["sms"], b)
    figures.add(
        f"restart {server} under load",
        load=f"{N_EVENTS:,} events, then a {PROBE}-member run",
        accepted=sum(load.accepted.values()),
        lost=load.lost(counts),
        duplicates=load.doubled(counts),
        restarted_processes=sorted(n for n in pids if alive.get(n) != pids[n]),
        server_down_s=down[0] if down else None,
        stalled_s=stalled,
        ready_after_s=ready,
        answers=dict(load.statuses),
        probe_reached=d.reached,
    )
    assert alive == pids, "a process died or was restarted"
    assert load.lost(counts) == 0 and load.doubled(counts) == 0
    assert load.server_errors() == {}, load.statuses
    assert run["dispatched"] == PROBE and d.reached == PROBE and d.contacts == PROBE, d
