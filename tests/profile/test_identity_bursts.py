"""Identity resolution loses nothing: bursts of anonymous events and the events that identify
them, fired concurrently in random interleavings and handled by two profile replicas (two
consumers on the shared durable), then anonymous-only events after the fold. Every count of
every customer is checked."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from shared.embedded import free_port
from shared.migrate import ROOT
from shared.stack import Stack
from tests.helpers import eventually

TYPES = ("page.viewed", "app.opened")


@pytest.fixture
def second_profile(stack: Stack) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A second profile process: its events consumer shares the durable with the first."""
    port = free_port()
    env = {**stack.env, "KAIROS_PROFILE_PORT": str(port)}
    with open(stack.run_dir / "logs" / "profile-2.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.profile"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(25)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def _wait_ready(replica: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, url = replica

    async def ready() -> int:
        assert proc.poll() is None, "the second profile process exited; see profile-2.log"
        async with httpx.AsyncClient(timeout=1.0) as c:
            try:
                return (await c.get(url + "/readyz")).status_code
            except httpx.HTTPError:
                return 0

    await eventually(ready, lambda s: s == 200, timeout=60)


def _burst(rng: random.Random, tag: str, n_ids: int) -> tuple[list[dict[str, Any]], dict]:
    """Anonymous events of many visitors and the event that identifies each, shuffled
    together (so an identifying event may come first, last or in between); returns the
    events and what each customer must end with."""
    events: list[dict[str, Any]] = []
    want: dict[str, Counter[str]] = {}
    for i in range(n_ids):
        anon, cid = f"a-{tag}-{i}", f"c-{tag}-{i}"
        want[cid] = Counter()
        for _ in range(rng.randint(1, 6)):
            t = rng.choice(TYPES)
            events.append({"type": t, "anonymous_id": anon})
            want[cid][t] += 1
        t = rng.choice(TYPES)
        events.append({"type": t, "customer_id": cid, "anonymous_id": anon})
        want[cid][t] += 1
    rng.shuffle(events)
    return events, want


async def _fire(gw: httpx.AsyncClient, rng: random.Random, events: list[dict[str, Any]]) -> None:
    """Post in requests of 1..12 events, many at once."""
    chunks, i = [], 0
    while i < len(events):
        n = rng.randint(1, 12)
        chunks.append(events[i : i + n])
        i += n
    sem = asyncio.Semaphore(16)

    async def post(chunk: list[dict[str, Any]]) -> None:
        async with sem:
            body = chunk[0] if len(chunk) == 1 else {"events": chunk}
            r = await gw.post("/v1/events", json=body)
            assert r.status_code == 202, r.text

    await asyncio.gather(*(post(c) for c in chunks))


async def _counts(gw: httpx.AsyncClient, cids: list[str]) -> dict[str, dict[str, int]]:
    out = {}
    for cid in cids:
        r = await gw.get(f"/v1/customers/{cid}")
        ctrs = r.json().get("counters", {}) if r.status_code == 200 else {}
        out[cid] = {t: int(c["total"]) for t, c in ctrs.items()}
    return out


def _expected(want: dict[str, Counter[str]]) -> dict[str, dict[str, int]]:
    return {cid: dict(c) for cid, c in want.items()}


async def test_bursts_fold_every_anonymous_event(
    gw: httpx.AsyncClient, second_profile: tuple[subprocess.Popen[bytes], str]
) -> None:
    await _wait_ready(second_profile)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    tag = uuid.uuid4().hex[:8]
    events, want = _burst(rng, tag, 40)
    await _fire(gw, rng, events)
    cids = sorted(want)
    await eventually(lambda: _counts(gw, cids), lambda got: got == _expected(want), timeout=60)
    # The fold is complete: each anonymous id belongs to its customer, no anonymous profile
    # is left holding counts.
    for i, cid in enumerate(cids):
        anon = f"a-{tag}-{cid.rsplit('-', 1)[1]}"
        r = await gw.get("/v1/customers:lookup", params={"kind": "anonymous_id", "value": anon})
        assert r.json() == {"customer_id": cid}, (seed, i, r.text)
        assert (await gw.get(f"/v1/customers/anon:{anon}")).status_code == 404, seed
    # Afterwards, events with only the anonymous id land on the customer.
    later: list[dict[str, Any]] = []
    for cid in cids:
        anon = f"a-{tag}-{cid.rsplit('-', 1)[1]}"
        for _ in range(rng.randint(1, 3)):
            t = rng.choice(TYPES)
            later.append({"type": t, "anonymous_id": anon})
            want[cid][t] += 1
    rng.shuffle(later)
    await _fire(gw, rng, later)
    await eventually(lambda: _counts(gw, cids), lambda got: got == _expected(want), timeout=60)


async def test_anonymous_burst_then_identify_in_one_request(gw: httpx.AsyncClient) -> None:
    """The issue's report: three page views then the identifying event, back to back."""
    tag = uuid.uuid4().hex[:8]
    anon, cid = f"a-{tag}", f"c-{tag}"
    views = [{"type": "page.viewed", "anonymous_id": anon} for _ in range(3)]
    r = await gw.post(
        "/v1/events",
        json={"events": [*views, {"type": "login", "customer_id": cid, "anonymous_id": anon}]},
    )
    assert r.status_code == 202
    await eventually(
        lambda: _counts(gw, [cid]), lambda got: got[cid] == {"page.viewed": 3, "login": 1}
    )
