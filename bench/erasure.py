"""Erasure figures (issue: profile write path): how long from ``DELETE /v1/customers/{id}``
until nothing of the customer is left in any store, with a population imported beside them.

Each run takes a fresh customer through the flows that leave personal data behind (profile
with e-mail, MSISDN and a device, events, a touchpoint decision with its contact and ledger
entries, a response, a dead letter), waits until every store holds them, erases them, and
polls targeted probes until every store is clean:

- every stream: the last message on each of the customer's token filters (none = purged),
  and the dead letters (scanned);
- Redis: the projection key, every key naming the customer, the markers and idempotency
  entries (through the same probes as the test's whole-store scan);
- Postgres: every row of every service's table with a customer column;
- selection's saved index file.

Once clean, the whole-store scan of the erasure test (``tests.stores.Stores``) confirms it
(not timed). ``python -m bench erasure [--runs 3] [--customers 100000]``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import nats
import sqlalchemy as sa
from nats.js.errors import NotFoundError

from bench.scenarios import Context, _import
from shared.events import CloudEvent
from shared.privacy import customer_subject, customer_token, purge_subjects
from tests.stores import SCHEMAS, Stores

DEADLINE_S = 60.0
# What must hold the customer before the erasure starts (the flows have all landed).
READY = {
    "stream:EVENTS",
    "stream:CONTACT",
    "stream:RESPONSE",
    "stream:DLQ",
    "table:profile.identity",
    "table:feedback.responses",
}
ID_COLUMNS = ("customer_id", "target", "source", "members", "value", "token")


async def _setup(ctx: Context, gw: httpx.AsyncClient) -> str:
    if not ctx.imported:
        await _import(ctx)
        ctx.imported = True
    tp = "bench_erasure"
    if "erasure" not in ctx.prepared:
        r = await gw.put(
            "/v1/offers/bench-erasure",
            json={"name": "Erasure", "content": {"default": {"title": "Hi", "body": "Yo"}}},
        )
        assert r.status_code == 200, r.text
        r = await gw.put(
            "/v1/campaigns/bench-erasure",
            json={
                "name": "Erasure",
                "type": "realtime",
                "touchpoints": [tp],
                "treatments": [{"id": "A", "offer": "bench-erasure", "weight": 1}],
                "approval_required": False,
            },
        )
        assert r.status_code == 200, r.text
        assert (await gw.post("/v1/campaigns/bench-erasure/activate")).status_code == 200
        await asyncio.sleep(1.0)  # every decision replica reloads its catalog
        ctx.prepared.add("erasure")
    return tp


async def _flows(ctx: Context, gw: httpx.AsyncClient, tp: str, needles: dict[str, str]) -> None:
    cid = needles["id"]
    r = await gw.put(
        f"/v1/customers/{cid}",
        headers={"Idempotency-Key": f"put-{cid}"},
        json={
            "attributes": {"first_name": "Ana"},
            "consents": {"push": True, "sms": True, "email": True},
            "identities": {"email": needles["email"], "msisdn": needles["msisdn"]},
        },
    )
    assert r.status_code == 200, r.text
    r = await gw.post(
        f"/v1/customers/{cid}/devices",
        json={"platform": "ios", "token": needles["device"], "app_id": "com.example.app"},
    )
    assert r.status_code in (200, 201), r.text
    events = [{"type": f"page.viewed.{i % 5}", "customer_id": cid} for i in range(50)]
    assert (await gw.post("/v1/events", json={"events": events})).status_code == 202
    r = await gw.post(
        "/v1/decisions",
        headers={"Idempotency-Key": f"decide-{cid}"},
        json={"customer_id": cid, "touchpoint": tp},
    )
    assert r.status_code == 200 and r.json()["offers"], r.text
    tracking = r.json()["offers"][0]["tracking_id"]
    r = await gw.post("/v1/responses", json={"tracking_id": tracking, "outcome": "clicked"})
    assert r.status_code == 202, r.text
    # A message that names the customer and no consumer can read: dead letters.
    ev = CloudEvent.new(
        source="bench", type="contact.recorded", subject=cid, data={"customer_id": cid}
    )
    await _publish(ctx, customer_subject("contact.recorded", cid), ev)


async def _publish(ctx: Context, subject: str, ev: CloudEvent) -> None:
    nc = await nats.connect(ctx.stack.env["KAIROS_NATS_URL"])
    try:
        await nc.jetstream().publish(
            f"{ctx.stack.env['KAIROS_BUS_PREFIX']}.{subject}", ev.to_bytes()
        )
    finally:
        await nc.close()


class Probes:
    """Targeted, cheap looks at every store (what the timing polls)."""

    def __init__(self, stores: Stores) -> None:
        self.s = stores
        self.tables: list[tuple[str, str, str]] = []

    async def prepare(self) -> None:
        async with self.s.db.connect() as conn:
            rows = await conn.execute(
                sa.text(
                    "SELECT c.table_schema, c.table_name, c.column_name"
                    " FROM information_schema.columns c JOIN information_schema.tables t"
                    " USING (table_schema, table_name)"
                    " WHERE c.table_schema = ANY(:s) AND t.table_type = 'BASE TABLE'"
                    " AND c.column_name = ANY(:c)"
                ),
                {"s": list(SCHEMAS), "c": list(ID_COLUMNS)},
            )
            self.tables = [(a, b, c) for a, b, c in rows.all()]

    async def left(self, needles: list[str]) -> list[str]:
        cid = needles[0]
        out = []
        prefix = self.s.prefix
        for stream, subject in purge_subjects(customer_token(cid)):
            try:
                await self.s.js.get_last_msg(f"{prefix.upper()}_{stream}", f"{prefix}.{subject}")
                out.append(f"stream:{stream}")
            except NotFoundError:
                pass
        out += [f for f in await self.s.stream("DLQ", needles)]
        rp = self.s.env["KAIROS_REDIS_PREFIX"]
        async for key in self.s.redis.scan_iter(match=f"{rp}:*{cid}*", count=10_000):
            out.append(f"redis:{key.decode()}")
        async with self.s.db.connect() as conn:
            for schema, table, column in self.tables:
                cond = (
                    f"{column} && CAST(:v AS text[])"
                    if column == "members"
                    else f"{column}::text = ANY(CAST(:v AS text[]))"
                )
                n = await conn.scalar(
                    sa.text(f'SELECT count(*) FROM "{schema}"."{table}" WHERE {cond}'),
                    {"v": needles},
                )
                if n:
                    out.append(f"table:{schema}.{table}")
        out += self.s.files(needles)
        return out


async def erasure(ctx: Context, run: int) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {ctx.key}"}
    async with (
        httpx.AsyncClient(base_url=ctx.stack.url("gateway"), headers=headers, timeout=60) as gw,
        Stores(ctx.stack) as stores,
    ):
        tp = await _setup(ctx, gw)
        u = uuid.uuid4().hex[:10]
        named = {
            "id": f"erase-{u}",
            "email": f"erase-{u}@example.com",
            "msisdn": "+49" + str(uuid.uuid4().int % 10**11).zfill(11),
            "device": uuid.uuid4().hex * 2,
        }
        needles = list(named.values())
        probes = Probes(stores)
        await probes.prepare()
        await _flows(ctx, gw, tp, named)
        # Everything in place: the response recorded, the dead letters written.
        t_wait = time.perf_counter()
        while time.perf_counter() - t_wait < DEADLINE_S:
            left = await probes.left(needles)
            if READY <= {":".join(f.split(":")[:2]) for f in left}:
                break
            await asyncio.sleep(0.1)
        ready_s = time.perf_counter() - t_wait
        t0 = time.perf_counter()
        r = await gw.delete(f"/v1/customers/{named['id']}")
        delete_ms = (time.perf_counter() - t0) * 1000
        assert r.status_code == 202, r.text
        polls = 0
        while True:
            polls += 1
            left = await probes.left(needles)
            if not left or time.perf_counter() - t0 > DEADLINE_S:
                break
            await asyncio.sleep(0.02)
        took = time.perf_counter() - t0
        whole = await stores.find(needles)  # the test's whole-store scan, not timed
    return {
        "flows_landed_s": round(ready_s, 2),
        "delete_ms": round(delete_ms, 1),
        "erased_everywhere_s": round(took, 3),
        "polls": polls,
        "left_after_deadline": left,
        "whole_store_scan_found": whole,
    }
