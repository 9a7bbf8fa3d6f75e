"""Two replicas of every process: a batch run's pages go out once, each delayed trigger's
timer fires once, and contact caps hold while both gateways and both decision replicas
take the triggering events at once."""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from shared.stack import PROCESSES, Stack
from tests.conftest import auth
from tests.faults.conftest import N_MESSAGES, Figures
from tests.faults.flows import (
    activate,
    batch_campaign,
    fetch,
    final_run,
    import_customers,
    nothing,
    numbers_for,
    settle_delivery,
    sms_counts,
    sms_offer,
    start_run,
    u8,
)
from tests.helpers import eventually

pytestmark = pytest.mark.slow


@pytest.fixture
async def replicas(fstack: Stack) -> AsyncIterator[list[httpx.AsyncClient]]:
    """A second replica of every process; clients of both gateways."""
    second = [f"{name}#2" for name in PROCESSES]
    for name in second:
        fstack.start(name)
    try:
        await asyncio.to_thread(fstack.wait_ready, second, 120)
        async with (
            httpx.AsyncClient(base_url=fstack.url("gateway"), headers=auth(), timeout=60) as a,
            httpx.AsyncClient(base_url=fstack.url("gateway#2"), headers=auth(), timeout=60) as b,
        ):
            yield [a, b]
    finally:
        for name in second:
            fstack.stop(name)


async def _customers(gw: httpx.AsyncClient, n: int, tag: str) -> dict[str, str]:
    ids = [f"{tag}-{i}" for i in range(n)]
    numbers = numbers_for(ids)
    await import_customers(gw, ids, tag, numbers)
    return numbers


async def _per_number(stack: Stack, campaigns: list[str]) -> collections.Counter[str]:
    rows = await fetch(
        stack,
        "SELECT request->'address'->>'msisdn' AS number FROM dispatch.message"
        " WHERE campaign_id = ANY($1::text[])",
        campaigns,
    )
    return collections.Counter(r["number"] for r in rows)


async def _fire(gws: list[httpx.AsyncClient], etype: str, ids: list[str], times: int) -> None:
    """Every customer's event ``times`` times, spread over both gateways, all at once."""
    sem = asyncio.Semaphore(32)
    pairs = list(itertools.product(ids, range(times)))

    async def one(i: int, cid: str) -> None:
        async with sem:
            r = await gws[i % 2].post("/v1/events", json={"type": etype, "customer_id": cid})
            assert r.status_code == 202, r.text

    await asyncio.gather(*(one(i, c) for i, (c, _) in enumerate(pairs)))


async def test_two_replicas_of_everything(
    fstack: Stack,
    replicas: list[httpx.AsyncClient],
    peers: dict[str, Any],
    figures: Figures,
) -> None:
    gw = replicas[0]
    sms = peers["sms"]
    m = max(50, N_MESSAGES // 10)
    # 1. A batch run: every page once, every member one message.
    b = await batch_campaign(gw, N_MESSAGES)
    run = await final_run(gw, b.campaign, await start_run(gw, b.campaign))
    d = await settle_delivery(fstack, sms, b)
    # 2. Delayed triggers: each customer's timer fires once, on one replica.
    u = u8()
    timer_numbers = await _customers(gw, m, f"tm{u}")
    await sms_offer(gw, f"off-{u}")
    timed = f"timer-{u}"
    await activate(
        gw,
        timed,
        {
            "name": "Timer",
            "type": "triggered",
            "trigger": {"event": f"fault.timer.{u}", "delay": "2s"},
            "channels": ["sms"],
            "treatments": [{"id": "A", "offer": f"off-{u}"}],
        },
    )
    await _fire(replicas, f"fault.timer.{u}", list(timer_numbers), 1)
    wanted = set(timer_numbers.values())
    await eventually(nothing, lambda _: len(sms_counts(sms, wanted)) == m, timeout=300)
    # 3. Caps: at most one SMS an hour, two campaigns, three events each, both replicas.
    v = u8()
    cap_numbers = await _customers(gw, m, f"cp{v}")
    r = await gw.put(
        "/v1/contact-policy", json={"rules": [{"channel": "sms", "max": 1, "per": "1h"}]}
    )
    assert r.status_code == 200, r.text
    capped = [f"cap1-{v}", f"cap2-{v}"]
    try:
        for cmp in capped:
            await activate(
                gw,
                cmp,
                {
                    "name": cmp,
                    "type": "triggered",
                    "trigger": {"event": f"fault.cap.{v}"},
                    "channels": ["sms"],
                    "treatments": [{"id": "A", "offer": f"off-{u}"}],
                },
            )
        await _fire(replicas, f"fault.cap.{v}", list(cap_numbers), 3)
        cwanted = set(cap_numbers.values())
        await eventually(nothing, lambda _: len(sms_counts(sms, cwanted)) == m, timeout=300)
        # Whatever else was going to be sent has been by the time the timers are re-counted.
        timers = await _per_number(fstack, [timed])
        caps = await _per_number(fstack, capped)
    finally:
        await gw.put("/v1/contact-policy", json={"rules": []})
    at_peer_timers = sms_counts(sms, wanted)
    at_peer_caps = sms_counts(sms, cwanted)
    figures.add(
        "two replicas of every process",
        load=f"{N_MESSAGES:,}-member run; {m} delayed triggers; {m} customers × 6 capped triggers",
        run_members=b and len(b.numbers),
        run_dispatched=run["dispatched"],
        run_duplicates=d.duplicates,
        timers_fired=sum(timers.values()),
        timers_twice=sum(1 for v in timers.values() if v > 1),
        cap_max_per_customer=max(at_peer_caps.values()),
        cap_messages=sum(caps.values()),
    )
    assert run["dispatched"] == N_MESSAGES and d.reached == N_MESSAGES and d.duplicates == 0, d
    assert sorted(timers.values()) == [1] * m, timers
    assert max(at_peer_timers.values()) == 1
    assert max(caps.values()) == 1 and max(at_peer_caps.values()) == 1, caps
