"""The loads the fault cases run, and how they count what was accepted, lost and doubled."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import orjson

from shared.stack import Stack
from tests.helpers import eventually


def u8() -> str:
    return uuid.uuid4().hex[:8]


async def nothing() -> None:
    return None


@dataclass
class EventLoad:
    """``n`` events over ``customers`` customers, posted in batches by a few workers the way a
    careful client does: a batch that is not answered 202 (refused, 503, connection lost)
    is sent again with the same event ids until it is. ``accepted`` holds what got a 202."""

    gw: httpx.AsyncClient
    n: int
    customers: int = 50
    batch: int = 20
    workers: int = 8
    etype: str = field(default_factory=lambda: f"fault.{u8()}")
    prefix: str = field(default_factory=lambda: f"f{u8()}")
    accepted: collections.Counter[str] = field(default_factory=collections.Counter)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    sent_batches: int = 0

    def customer(self, i: int) -> str:
        return f"{self.prefix}-{i % self.customers}"

    def _batches(self) -> list[list[dict[str, Any]]]:
        evs = [
            {"id": str(uuid.uuid4()), "type": self.etype, "customer_id": self.customer(i)}
            for i in range(self.n)
        ]
        return [evs[i : i + self.batch] for i in range(0, len(evs), self.batch)]

    async def run(
        self,
        fault: Callable[[], Awaitable[None]] | None = None,
        *,
        at: float = 0.3,
        min_duration_s: float = 8.0,
    ) -> float:
        """Send everything, paced to last at least ``min_duration_s``, while a side worker
        writes and reads customers (Postgres and Redis on the request path). Once ``at`` of
        the batches were accepted, ``fault`` starts in the background: the load goes on
        meanwhile. Returns the longest a batch took from its first try to its 202 (seconds)."""
        queue: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue()
        for b in self._batches():
            queue.put_nowait(b)
        total = queue.qsize()
        pause = min_duration_s * self.workers / max(total, 1)
        faults: list[asyncio.Task[None]] = []
        longest = [0.0]
        done = asyncio.Event()

        async def worker() -> None:
            while True:
                try:
                    b = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                first = time.monotonic()
                while True:
                    try:
                        r = await self.gw.post("/v1/events", json={"events": b}, timeout=30)
                        status = str(r.status_code)
                    except httpx.HTTPError as exc:
                        status = type(exc).__name__
                    self.statuses[status] += 1
                    if status == "202":
                        break
                    await asyncio.sleep(0.1)
                longest[0] = max(longest[0], time.monotonic() - first)
                for ev in b:
                    self.accepted[ev["customer_id"]] += 1
                self.sent_batches += 1
                if fault is not None and not faults and self.sent_batches >= total * at:
                    faults.append(asyncio.create_task(fault()))
                await asyncio.sleep(pause)

        async def side() -> None:
            """Customer writes and reads next to the events: answers are 2xx or a 503."""
            k = 0
            while not done.is_set():
                k += 1
                cid = f"{self.prefix}-side-{k % 20}"
                for method, what in (("PUT", "put"), ("GET", "get")):
                    try:
                        r = await self.gw.request(
                            method,
                            f"/v1/customers/{cid}",
                            json={"attributes": {"k": k}} if method == "PUT" else None,
                            timeout=30,
                        )
                        status = str(r.status_code)
                        if status == "503":
                            assert r.headers.get("retry-after"), r.headers
                            assert r.headers["content-type"] == "application/problem+json"
                    except httpx.HTTPError as exc:
                        status = type(exc).__name__
                    self.statuses[f"{what}:{status}"] += 1
                await asyncio.sleep(0.05)

        side_task = asyncio.create_task(side())
        try:
            await asyncio.gather(*(worker() for _ in range(self.workers)))
            for t in faults:
                await t
        finally:
            done.set()
            await side_task
        return round(longest[0], 2)

    async def counted(self) -> dict[str, int]:
        """Each customer's count of this load's event type, as the profile shows it."""
        out: dict[str, int] = {}
        for cid in self.accepted:
            r = await self.gw.get(f"/v1/customers/{cid}")
            out[cid] = (
                int(r.json()["counters"].get(self.etype, {}).get("total", 0))
                if r.status_code == 200
                else -1
            )
        return out

    async def settle(self, timeout: float = 180) -> dict[str, int]:
        """Wait until every accepted event is counted (or time runs out); the last counts."""
        deadline = time.monotonic() + timeout
        counts = await self.counted()
        while time.monotonic() < deadline and counts != dict(self.accepted):
            await asyncio.sleep(0.5)
            counts = await self.counted()
        return counts

    def lost(self, counts: dict[str, int]) -> int:
        return sum(max(0, n - max(counts.get(c, 0), 0)) for c, n in self.accepted.items())

    def doubled(self, counts: dict[str, int]) -> int:
        return sum(max(0, counts.get(c, 0) - n) for c, n in self.accepted.items())

    def server_errors(self) -> dict[str, int]:
        """Answers a client cannot act on: any 5xx but a 503 (which says "retry")."""
        return {
            s: n
            for s, n in self.statuses.items()
            if s.rpartition(":")[2].startswith("5") and s.rpartition(":")[2] != "503"
        }


_BLOCKS = itertools.count(random.randrange(900))


def numbers_for(ids: list[str]) -> dict[str, str]:
    """Mobile numbers nobody else in this run has (a block of ten million per call)."""
    block = next(_BLOCKS) % 1000
    return {c: f"+4917{block:03d}{i:07d}" for i, c in enumerate(ids)}


async def import_customers(
    gw: httpx.AsyncClient, ids: list[str], tag: str, numbers: dict[str, str]
) -> None:
    body = b"".join(
        orjson.dumps(
            {
                "customer_id": c,
                "attributes": {"first_name": "Ana"},
                "tags": [tag],
                "consents": {"sms": True},
                "identities": {"msisdn": numbers[c]},
            }
        )
        + b"\n"
        for c in ids
    )
    # Imports go in slices: the body limit of one request stays what it is.
    step = 20_000
    for i in range(0, len(ids), step):
        part = b"".join(body.splitlines(keepends=True)[i : i + step])
        for _ in range(60):
            r = await gw.post(
                "/v1/customers:import",
                content=part,
                headers={"content-type": "application/x-ndjson"},
                timeout=300,
            )
            if r.status_code != 503:
                break
            await asyncio.sleep(1)
        assert r.status_code == 200, r.text
        assert r.json()["imported"] == min(step, len(ids) - i), r.text


async def sms_offer(gw: httpx.AsyncClient, oid: str) -> None:
    r = await gw.put(
        f"/v1/offers/{oid}",
        json={
            "name": "Fault",
            "link": "https://example.com/f",
            "content": {
                "default": {"title": "Hi", "body": "Go"},
                "sms": {"text": "Hi {{ attributes.first_name }}, 1 GB for 5 EUR"},
            },
        },
    )
    assert r.status_code == 200, r.text


async def activate(gw: httpx.AsyncClient, cmp: str, body: dict[str, Any]) -> None:
    r = await gw.put(f"/v1/campaigns/{cmp}", json={"approval_required": False, **body})
    assert r.status_code == 200, r.text
    r = await gw.post(f"/v1/campaigns/{cmp}/activate")
    assert r.status_code == 200, r.text
    await asyncio.sleep(0.6)  # every decision replica reloads its catalog


@dataclass
class Batch:
    """A batch campaign over ``n`` imported customers who take SMS."""

    campaign: str
    numbers: dict[str, str]


async def batch_campaign(gw: httpx.AsyncClient, n: int) -> Batch:
    u = u8()
    ids = [f"b{u}-{i}" for i in range(n)]
    numbers = numbers_for(ids)
    await import_customers(gw, ids, f"batch:{u}", numbers)
    await sms_offer(gw, f"off-{u}")
    cmp = f"batch-{u}"
    await activate(
        gw,
        cmp,
        {
            "name": "Batch",
            "type": "batch",
            "audience": {"tag": f"batch:{u}"},
            "channels": ["sms"],
            "treatments": [{"id": "A", "offer": f"off-{u}"}],
        },
    )
    await eventually(  # the audience index sees every imported customer before the snapshot
        lambda: gw.post("/v1/segments:preview", json={"rule": {"tag": f"batch:{u}"}}),
        lambda r: r.status_code == 200 and r.json()["count"] == n,
        timeout=300,
    )
    return Batch(cmp, numbers)


async def start_run(gw: httpx.AsyncClient, cmp: str) -> str:
    r = await gw.post(f"/v1/campaigns/{cmp}/runs")
    assert r.status_code == 202, r.text
    run_id: str = r.json()["run_id"]
    return run_id


async def run_state(gw: httpx.AsyncClient, cmp: str, run_id: str) -> dict[str, Any]:
    with contextlib.suppress(httpx.HTTPError):
        r = await gw.get(f"/v1/campaigns/{cmp}/runs/{run_id}")
        if r.status_code == 200:
            doc: dict[str, Any] = r.json()
            return doc
    return {}


async def final_run(
    gw: httpx.AsyncClient, cmp: str, run_id: str, timeout: float = 900
) -> dict[str, Any]:
    run = await eventually(
        lambda: run_state(gw, cmp, run_id),
        lambda r: r.get("status") in ("completed", "failed", "cancelled"),
        timeout=timeout,
    )
    assert run["status"] == "completed", run
    return run


def sms_counts(peer: Any, wanted: set[str]) -> collections.Counter[str]:
    return collections.Counter(m["To"] for m in list(peer.received) if m["To"] in wanted)


def pg_url(stack: Stack) -> str:
    return stack.env["KAIROS_DATABASE_URL"].replace("+asyncpg", "")


async def fetch(stack: Stack, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(pg_url(stack))
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def messages(stack: Stack, cmp: str) -> list[Any]:
    """Dispatch's messages of a campaign: the number, whether in doubt, the status."""
    return await fetch(
        stack,
        "SELECT request->'address'->>'msisdn' AS number, in_doubt, status"
        " FROM dispatch.message WHERE campaign_id = $1",
        cmp,
    )


async def contacts(stack: Stack, cmp: str) -> int:
    """Feedback's contact history: distinct customers contacted by a campaign."""
    rows = await fetch(
        stack,
        "SELECT count(DISTINCT customer_id) AS n FROM feedback.contacts WHERE campaign_id = $1",
        cmp,
    )
    return int(rows[0]["n"])


@dataclass
class Delivery:
    """What a batch run's members got at the SMS peer."""

    members: int
    reached: int
    duplicates: int
    in_doubt: int
    duplicates_not_in_doubt: int
    contacts: int


async def settle_delivery(stack: Stack, peer: Any, b: Batch, timeout: float = 900) -> Delivery:
    """Wait until every member reached the peer and every message settled; count."""
    wanted = set(b.numbers.values())
    n = len(wanted)
    await eventually(nothing, lambda _: len(sms_counts(peer, wanted)) == n, timeout=timeout)
    final = await eventually(
        lambda: messages(stack, b.campaign),
        lambda rs: len(rs) == n and all(r["status"] in ("sent", "delivered") for r in rs),
        timeout=timeout,
    )
    got = await eventually(lambda: contacts(stack, b.campaign), lambda c: c == n, timeout=timeout)
    counts = sms_counts(peer, wanted)
    twice = {k for k, v in counts.items() if v > 1}
    doubtful = {r["number"] for r in final if r["in_doubt"]}
    return Delivery(
        members=n,
        reached=len(counts),
        duplicates=sum(v - 1 for v in counts.values()),
        in_doubt=len(doubtful),
        duplicates_not_in_doubt=len(twice - doubtful),
        contacts=got,
    )
