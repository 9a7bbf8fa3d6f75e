"""Whole flows to the providers' protocol peers: a roaming event reaches the APNs peer with
the rendered text; APNs' 410 removes the token from the profile; a batch run reaches the SMS
peer once per customer, also when dispatch is killed mid-run (only the sends in flight at
the kill may arrive twice, and each of those is marked in_doubt)."""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from shared.stack import Stack
from tests.helpers import eventually

pytestmark = pytest.mark.slow


def _u() -> str:
    return uuid.uuid4().hex[:8]


async def _activate(gw: httpx.AsyncClient, cid: str, body: dict[str, Any]) -> None:
    r = await gw.put(f"/v1/campaigns/{cid}", json={"approval_required": False, **body})
    assert r.status_code == 200, r.text
    r = await gw.post(f"/v1/campaigns/{cid}/activate")
    assert r.status_code == 200, r.text
    await asyncio.sleep(0.6)  # every decision replica reloads its catalog


async def _offer(gw: httpx.AsyncClient, oid: str) -> None:
    r = await gw.put(
        f"/v1/offers/{oid}",
        json={
            "name": "Roaming",
            "link": "https://example.com/roam",
            "content": {
                "default": {"title": "Hi", "body": "Go"},
                "push": {
                    "title": "In {{ event.properties.country }}, {{ attributes.first_name }}?",
                    "body": "1 GB for 5 EUR",
                },
                "sms": {"text": "Hi {{ attributes.first_name }}, 1 GB for 5 EUR"},
            },
        },
    )
    assert r.status_code == 200, r.text


async def test_roaming_event_reaches_apns_and_a_410_drops_the_token(
    stack: Stack, gw: httpx.AsyncClient, peers: dict[str, Any]
) -> None:
    apns = peers["apns"]
    u = _u()
    await _offer(gw, f"off-{u}")
    await _activate(
        gw,
        f"roam-{u}",
        {
            "name": "Roaming welcome",
            "type": "triggered",
            "trigger": {"event": f"roaming.started.{u}"},
            "channels": ["push"],
            "treatments": [{"id": "A", "offer": f"off-{u}"}],
        },
    )
    ok, gone = f"ok-{u}", f"gone-{u}"
    tokens = {ok: "a1" * 32, gone: "b2" * 32}
    for cust in (ok, gone):
        r = await gw.put(
            f"/v1/customers/{cust}",
            json={"attributes": {"first_name": "Ana"}, "consents": {"push": True}},
        )
        assert r.status_code == 200, r.text
        r = await gw.post(
            f"/v1/customers/{cust}/devices",
            json={"platform": "ios", "token": tokens[cust], "app_id": "com.example.app"},
        )
        assert r.status_code in (200, 201), r.text
    # Apple's timestamp: the token was unregistered after the app registered it.
    apns.answer(tokens[gone], 410, "Unregistered", timestamp=int(time.time() * 1000) + 1000)
    for cust in (ok, gone):
        r = await gw.post(
            "/v1/events",
            json={
                "type": f"roaming.started.{u}",
                "customer_id": cust,
                "properties": {"country": "FR"},
            },
        )
        assert r.status_code == 202, r.text

    def got(token: str) -> list[Any]:
        return [m for m in apns.received if m.token == token]

    await eventually(_none, lambda _: bool(got(tokens[ok])) and bool(got(tokens[gone])))
    push = got(tokens[ok])[0]
    assert push.payload["aps"]["alert"]["title"] == "In FR, Ana?"
    assert push.payload["aps"]["alert"]["body"] == "1 GB for 5 EUR"
    assert push.headers["apns-priority"] == "10"  # a trigger is realtime
    # The 410 reaches the profile: the token is gone from the 360° view.
    view = await eventually(
        lambda: gw.get(f"/v1/customers/{gone}"), lambda r: r.json()["devices"] == []
    )
    assert view.status_code == 200
    kept = (await gw.get(f"/v1/customers/{ok}")).json()
    assert [d["token"] for d in kept["devices"]] == [tokens[ok]]


async def _none() -> None:
    return None


def _import_body(ids: list[str], numbers: dict[str, str], tag: str) -> bytes:
    return b"".join(
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


async def _batch(gw: httpx.AsyncClient, n: int, u: str) -> tuple[str, dict[str, str]]:
    ids = [f"b{u}-{i}" for i in range(n)]
    # Numbers of this run alone (an import refuses a number another customer holds).
    numbers = {c: f"+4915{int(u, 16) % 10**6:06d}{i:05d}" for i, c in enumerate(ids)}
    r = await gw.post(
        "/v1/customers:import",
        content=_import_body(ids, numbers, f"batch:{u}"),
        headers={"content-type": "application/x-ndjson"},
        timeout=120,
    )
    assert r.status_code == 200 and r.json()["imported"] == n, r.text
    await _offer(gw, f"off-{u}")
    cmp = f"batch-{u}"
    await _activate(
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
    # the audience index must see every imported customer before the snapshot
    await eventually(
        lambda: gw.post("/v1/segments:preview", json={"rule": {"tag": f"batch:{u}"}}),
        lambda r: r.status_code == 200 and r.json()["count"] == n,
        timeout=60,
    )
    return cmp, numbers


async def _final(gw: httpx.AsyncClient, cmp: str, run_id: str) -> dict[str, Any]:
    r = await eventually(
        lambda: gw.get(f"/v1/campaigns/{cmp}/runs/{run_id}"),
        lambda r: r.json()["status"] in ("completed", "failed", "cancelled"),
        timeout=180,
    )
    run: dict[str, Any] = r.json()
    assert run["status"] == "completed", run
    return run


async def test_batch_run_reaches_the_sms_peer_once_per_customer(
    gw: httpx.AsyncClient, peers: dict[str, Any]
) -> None:
    sms = peers["sms"]
    u = _u()
    n = 10_000
    cmp, numbers = await _batch(gw, n, u)
    r = await gw.post(f"/v1/campaigns/{cmp}/runs")
    assert r.status_code == 202, r.text
    run = await _final(gw, cmp, r.json()["run_id"])
    assert run["dispatched"] == n, run
    wanted = set(numbers.values())

    def reached() -> collections.Counter[str]:
        return collections.Counter(m["To"] for m in sms.received if m["To"] in wanted)

    await eventually(_none, lambda _: len(reached()) == n, timeout=180)
    counts = reached()
    assert set(counts) == wanted
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1][:5]
    one = next(m for m in sms.received if m["To"] in wanted)
    assert one["Body"] == "Hi Ana, 1 GB for 5 EUR"


async def test_kill_dispatch_mid_run_loses_nothing(
    stack: Stack, gw: httpx.AsyncClient, peers: dict[str, Any]
) -> None:
    sms = peers["sms"]
    u = _u()
    n = 3_000
    cmp, numbers = await _batch(gw, n, u)
    wanted = set(numbers.values())

    def reached() -> collections.Counter[str]:
        return collections.Counter(m["To"] for m in sms.received if m["To"] in wanted)

    r = await gw.post(f"/v1/campaigns/{cmp}/runs")
    assert r.status_code == 202, r.text
    run_id = r.json()["run_id"]
    await eventually(_none, lambda _: len(reached()) >= n // 5, timeout=120)
    stack.stop("dispatch", kill=True)  # SIGKILL mid-stream
    stack.start("dispatch")
    stack.wait_ready(["dispatch"])
    await _final(gw, cmp, run_id)
    await eventually(_none, lambda _: len(reached()) == n, timeout=180)
    url = stack.env["KAIROS_DATABASE_URL"].replace("+asyncpg", "")

    async def rows() -> list[Any]:
        conn = await asyncpg.connect(url)
        try:
            return list(
                await conn.fetch(
                    "SELECT request->'address'->>'msisdn' AS number, in_doubt, status"
                    " FROM dispatch.message WHERE campaign_id = $1",
                    cmp,
                )
            )
        finally:
            await conn.close()

    # Every message settles (the re-sends of the interrupted ones included).
    final = await eventually(
        rows, lambda rs: len(rs) == n and all(r["status"] in ("sent", "delivered") for r in rs)
    )
    counts = reached()
    twice = {k for k, v in counts.items() if v > 1}
    assert set(counts) == wanted and max(counts.values()) <= 2
    # Every duplicate was in flight at the kill, and its message says so.
    doubtful = {r["number"] for r in final if r["in_doubt"]}
    assert twice <= doubtful, twice - doubtful
