"""``kill -9`` of each process in the middle of its own load: nothing accepted is lost,
no contact is lost, and the provider sees a message twice only when dispatch marked it in
doubt (it was on the wire when dispatch died)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from shared.stack import Stack
from tests.faults.conftest import N_BATCH, N_EVENTS, N_MESSAGES, Figures
from tests.faults.flows import (
    EventLoad,
    batch_campaign,
    contacts,
    final_run,
    import_customers,
    numbers_for,
    run_state,
    settle_delivery,
    sms_counts,
    start_run,
    u8,
)
from tests.helpers import eventually

pytestmark = pytest.mark.slow


async def _kill_and_restart(stack: Stack, name: str) -> float:
    """SIGKILL, start again at once; the seconds until it answers /readyz again."""
    stack.stop(name, kill=True)
    t0 = time.monotonic()
    stack.start(name)
    await asyncio.to_thread(stack.wait_ready, [name], 120)
    return round(time.monotonic() - t0, 2)


@pytest.mark.parametrize("process", ["gateway", "profile"])
async def test_kill_mid_event_stream_loses_no_accepted_event(
    fstack: Stack, fgw: httpx.AsyncClient, figures: Figures, process: str
) -> None:
    load = EventLoad(fgw, N_EVENTS)
    ready: list[float] = []

    async def fault() -> None:
        ready.append(await _kill_and_restart(fstack, process))

    stalled = await load.run(fault)
    counts = await load.settle()
    lost, doubled = load.lost(counts), load.doubled(counts)
    figures.add(
        f"kill -9 {process}",
        load=f"{N_EVENTS:,} events",
        accepted=sum(load.accepted.values()),
        lost=lost,
        duplicates=doubled,
        in_doubt="n/a",
        ready_s=ready[0],
        stalled_s=stalled,
        answers=dict(load.statuses),
    )
    assert lost == 0 and doubled == 0, (lost, doubled)
    assert load.server_errors() == {}, load.statuses


async def test_kill_selection_mid_index_loses_no_customer(
    fstack: Stack, fgw: httpx.AsyncClient, figures: Figures
) -> None:
    n = N_EVENTS
    u = u8()
    ids = [f"s{u}-{i}" for i in range(n)]
    numbers = numbers_for(ids)
    rule = {"rule": {"tag": f"sel:{u}"}}

    async def count() -> int:
        try:
            r = await fgw.post("/v1/segments:preview", json=rule)
        except httpx.HTTPError:
            return -1
        return int(r.json()["count"]) if r.status_code == 200 else -1

    imported = asyncio.create_task(import_customers(fgw, ids, f"sel:{u}", numbers))
    # Mid-stream: once the index has taken in some of them (or the import is through).
    await eventually(count, lambda c: c > 0 or imported.done(), timeout=300)
    ready = await _kill_and_restart(fstack, "selection")
    await imported
    seen = await eventually(count, lambda c: c == n, timeout=300)
    figures.add(
        "kill -9 selection",
        load=f"{n:,} customers imported",
        accepted=n,
        lost=n - seen,
        duplicates=0,
        in_doubt="n/a",
        ready_s=ready,
    )


async def _kill_during_run(
    fstack: Stack,
    fgw: httpx.AsyncClient,
    peers: dict[str, Any],
    figures: Figures,
    process: str,
    n: int,
) -> None:
    sms = peers["sms"]
    b = await batch_campaign(fgw, n)
    wanted = set(b.numbers.values())
    run_id = await start_run(fgw, b.campaign)

    async def progress() -> int:
        if process == "decision":
            return int((await run_state(fgw, b.campaign, run_id)).get("dispatched", 0))
        if process == "feedback":
            return await contacts(fstack, b.campaign)
        return len(sms_counts(sms, wanted))

    await eventually(progress, lambda k: k >= n // 5, timeout=600)
    ready = await _kill_and_restart(fstack, process)
    run = await final_run(fgw, b.campaign, run_id)
    d = await settle_delivery(fstack, sms, b)
    figures.add(
        f"kill -9 {process}",
        load=f"{n:,}-member batch run" if process == "decision" else f"{n:,} messages",
        accepted=n,
        lost=n - d.contacts,
        duplicates=d.duplicates,
        in_doubt=d.in_doubt,
        duplicates_not_in_doubt=d.duplicates_not_in_doubt,
        ready_s=ready,
    )
    assert run["dispatched"] == n, run
    assert d.reached == n and d.contacts == n, d
    assert d.duplicates_not_in_doubt == 0, d


async def test_kill_decision_mid_batch_run(
    fstack: Stack, fgw: httpx.AsyncClient, peers: dict[str, Any], figures: Figures
) -> None:
    await _kill_during_run(fstack, fgw, peers, figures, "decision", N_BATCH)


@pytest.mark.parametrize("process", ["dispatch", "feedback"])
async def test_kill_mid_message_stream(
    fstack: Stack, fgw: httpx.AsyncClient, peers: dict[str, Any], figures: Figures, process: str
) -> None:
    await _kill_during_run(fstack, fgw, peers, figures, process, N_MESSAGES)
