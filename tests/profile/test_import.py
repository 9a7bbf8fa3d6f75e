"""Bulk import through the gateway: identity conflicts (the PUT rule) with line and field,
gzip bodies, per-line errors with good lines kept, files larger than one batch, the
projection and the ``profile.imported`` announcement of every imported customer, and a kill mid-import."""

from __future__ import annotations

import asyncio
import gzip
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import orjson
import pytest
from nats.js.api import DeliverPolicy
from redis.asyncio import Redis

from shared.contracts.bus import ImportBatch, ProfileImported
from shared.events import CloudEvent
from shared.redis import Keys, merge_parts
from shared.stack import Stack
from tests.conftest import KEYS
from tests.helpers import eventually

NDJSON = {"content-type": "application/x-ndjson"}


def _ndjson(lines: list[object]) -> bytes:
    return b"".join((x if isinstance(x, bytes) else orjson.dumps(x)) + b"\n" for x in lines)


def _prefix(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def _import(gw: httpx.AsyncClient, body: bytes, **headers: str) -> dict[str, Any]:
    r = await gw.post(
        "/v1/customers:import", content=body, headers={**NDJSON, **headers}, timeout=600
    )
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


async def _owner(gw: httpx.AsyncClient, kind: str, value: str) -> str | None:
    r = await gw.get("/v1/customers:lookup", params={"kind": kind, "value": value})
    return str(r.json()["customer_id"]) if r.status_code == 200 else None


async def test_identity_of_another_customer_fails_the_line_with_its_field(
    gw: httpx.AsyncClient,
) -> None:
    p = _prefix("conf")
    email, msisdn = f"{p}@example.com", "+4917" + str(uuid.uuid4().int)[:9]
    r = await gw.put(
        f"/v1/customers/{p}-owner", json={"identities": {"email": email, "msisdn": msisdn}}
    )
    assert r.status_code == 200, r.text
    doc = await _import(
        gw,
        _ndjson(
            [
                {"customer_id": f"{p}-a", "identities": {"email": email}},  # owned: fails
                {"customer_id": f"{p}-b", "identities": {"email": f"{p}-b@example.com"}},
                {"customer_id": f"{p}-c", "identities": {"msisdn": msisdn}},  # owned: fails
                {"customer_id": f"{p}-owner", "identities": {"email": email, "msisdn": msisdn}},
            ]
        ),
    )
    assert doc["imported"] == 2 and doc["failed"] == 2, doc
    assert [(e["line"], e["field"]) for e in doc["errors"]] == [
        (1, "identities.email"),
        (3, "identities.msisdn"),
    ]
    assert f"{p}-owner" in doc["errors"][0]["detail"]
    # A failed line writes nothing; the identity stays with its owner.
    assert (await gw.get(f"/v1/customers/{p}-a")).status_code == 404
    assert (await gw.get(f"/v1/customers/{p}-c")).status_code == 404
    assert await _owner(gw, "email", email) == f"{p}-owner"
    assert await _owner(gw, "msisdn", msisdn) == f"{p}-owner"
    assert await _owner(gw, "email", f"{p}-b@example.com") == f"{p}-b"
    # PUT refuses the same body the same way: one rule.
    r = await gw.put(f"/v1/customers/{p}-a", json={"identities": {"email": email}})
    assert r.status_code == 409
    assert r.json()["errors"][0]["loc"] == ["identities", "email"]
    r = await gw.patch(f"/v1/customers/{p}-b", json={"identities": {"msisdn": msisdn}})
    assert r.status_code == 409
    assert r.json()["errors"][0]["loc"] == ["identities", "msisdn"]


async def test_two_lines_claiming_one_identity_the_first_wins(gw: httpx.AsyncClient) -> None:
    p = _prefix("twice")
    email = f"{p}@example.com"
    doc = await _import(
        gw,
        _ndjson(
            [
                {"customer_id": f"{p}-1", "identities": {"email": email}},
                {"customer_id": f"{p}-2", "attributes": {"x": 1}},
                {"customer_id": f"{p}-3", "identities": {"email": email}},
                {"customer_id": f"{p}-1", "identities": {"email": email}, "tags": ["again"]},
            ]
        ),
    )
    assert doc["imported"] == 3 and doc["failed"] == 1, doc
    assert [(e["line"], e["field"]) for e in doc["errors"]] == [(3, "identities.email")]
    assert "line 1" in doc["errors"][0]["detail"]
    assert await _owner(gw, "email", email) == f"{p}-1"
    assert (await gw.get(f"/v1/customers/{p}-3")).status_code == 404
    # The last line of a customer wins, as with PUTs in file order.
    assert (await gw.get(f"/v1/customers/{p}-1")).json()["tags"] == ["again"]


async def test_merged_away_id_fails_the_line(gw: httpx.AsyncClient) -> None:
    p = _prefix("merged")
    for c in ("t", "s"):
        assert (await gw.put(f"/v1/customers/{p}-{c}", json={})).status_code == 200
    r = await gw.post(f"/v1/customers/{p}-t/merge", json={"from": f"{p}-s"})
    assert r.status_code == 200, r.text
    doc = await _import(gw, _ndjson([{"customer_id": f"{p}-s", "attributes": {"a": 1}}]))
    assert doc["imported"] == 0 and doc["failed"] == 1
    assert doc["errors"][0]["line"] == 1 and doc["errors"][0]["field"] == "customer_id"
    assert f"{p}-t" in doc["errors"][0]["detail"]


async def test_errors_name_line_and_field_and_good_lines_are_kept(
    gw: httpx.AsyncClient,
) -> None:
    p = _prefix("errs")
    body = _ndjson(
        [
            {"customer_id": f"{p}-1", "attributes": {"age": 31, "gone": None}, "tags": ["b", "a"]},
            b"",  # blank lines count as lines but are no customers
            b"{not json",
            {"customer_id": f"{p}-2", "timezone": "Mars/Olympus"},
            {"customer_id": f"{p}-3", "identities": {"crm_id": 7}},
            {"customer_id": f"{p}-4", "consents": {"email": True}, "locale": "de-DE"},
        ]
    )
    doc = await _import(gw, body + b'{"customer_id": "' + p.encode() + b'-5"}')  # no last \n
    assert doc["imported"] == 3 and doc["failed"] == 3, doc
    errs = {e["line"]: e for e in doc["errors"]}
    assert sorted(errs) == [3, 4, 5]
    assert "JSON" in errs[3]["detail"]
    assert errs[4]["field"] == "timezone"
    assert errs[5]["field"] == "identities"
    v = (await gw.get(f"/v1/customers/{p}-1")).json()
    assert v["attributes"] == {"age": 31} and v["tags"] == ["a", "b"]
    v = (await gw.get(f"/v1/customers/{p}-4")).json()
    assert v["consents"] == {"email": True} and v["locale"] == "de-DE"
    assert (await gw.get(f"/v1/customers/{p}-5")).status_code == 200


async def test_gzip_bodies_are_inflated_as_a_stream(gw: httpx.AsyncClient) -> None:
    p = _prefix("gz")
    first = [{"customer_id": f"{p}-{i}", "attributes": {"i": i}} for i in range(300)]
    second = [{"customer_id": f"{p}-{i}", "attributes": {"i": i}} for i in range(300, 400)]
    # Two gzip members back to back (what `cat a.gz b.gz` makes), and a bad line inside.
    body = gzip.compress(_ndjson([*first, b"[1, 2]"])) + gzip.compress(_ndjson(second))
    doc = await _import(gw, body, **{"content-encoding": "gzip"})
    assert doc["imported"] == 400 and doc["failed"] == 1, doc
    assert doc["errors"][0]["line"] == 301
    assert (await gw.get(f"/v1/customers/{p}-399")).json()["attributes"] == {"i": 399}

    r = await gw.post(
        "/v1/customers:import",
        content=b"x",
        headers={**NDJSON, "content-encoding": "br"},
    )
    assert r.status_code == 415
    assert r.headers["content-type"].startswith("application/problem+json")
    r = await gw.post(
        "/v1/customers:import",
        content=gzip.compress(_ndjson(first))[:-40],  # cut short
        headers={**NDJSON, "content-encoding": "gzip"},
    )
    assert r.status_code == 400, r.text
    assert "gzip" in r.json()["detail"]


async def test_a_body_that_breaks_off_leaves_what_committed_projected(
    gw: httpx.AsyncClient, stack: Stack
) -> None:
    """A gzip body cut short after its first batch: the request fails (400), the batch that
    committed stays, and its customers' projections are written all the same (a touchpoint
    decision reads the profile from there)."""
    p = _prefix("cut")
    lines = [{"customer_id": f"{p}-{i:05d}", "tags": ["cut"]} for i in range(5_600)]
    packed = gzip.compress(_ndjson(lines), compresslevel=1)
    r = await gw.post(
        "/v1/customers:import",
        content=packed[: len(packed) - 40],  # the last ~600 lines' stream is cut
        headers={**NDJSON, "content-encoding": "gzip"},
        timeout=120,
    )
    assert r.status_code == 400, r.text
    keys = Keys(stack.env["KAIROS_REDIS_PREFIX"])
    redis = Redis.from_url(stack.env["KAIROS_REDIS_URL"])
    try:
        first, last = f"{p}-00000", f"{p}-04999"
        assert (await gw.get(f"/v1/customers/{last}")).status_code == 200
        for cid in (first, last):
            doc = merge_parts(await redis.hmget(keys.profile(cid), ["v", "p", "c"]))
            assert doc is not None and doc["tags"] == ["cut"], (cid, doc)
    finally:
        await redis.aclose()


async def _announced(stack: Stack, prefix: str, want: int) -> dict[str, int]:
    """Customers (and versions) announced by ``profile.imported`` messages, read from the
    stream and resolved through the profile service, as selection does."""
    nc = await nats.connect(stack.env["KAIROS_NATS_URL"])
    js = nc.jetstream()
    bus = stack.env["KAIROS_BUS_PREFIX"]
    seen: dict[str, int] = {}
    sub = await js.subscribe(
        f"{bus}.profile.imported", deliver_policy=DeliverPolicy.ALL, ordered_consumer=True
    )

    async def probe() -> int:
        async with httpx.AsyncClient(base_url=stack.url("profile")) as profile:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except nats.errors.TimeoutError:
                    return len(seen)
                ev = CloudEvent.from_bytes(msg.data)
                assert ev.subject is None  # the message names no customer
                announced = ProfileImported.parse(ev)
                r = await profile.get(f"/internal/import-batches/{announced.batch_id}")
                assert r.status_code == 200, r.text
                batch = ImportBatch.model_validate_json(r.content)
                assert len(batch.customers) <= announced.count
                seen.update((c, v) for c, v in batch.customers.items() if c.startswith(prefix))

    try:
        await eventually(probe, lambda n: n >= want, timeout=300)
    finally:
        await sub.unsubscribe()
        await nc.close()
    return seen


async def test_the_projection_keeps_what_an_imported_customer_had_and_a_new_one_has_nothing(
    gw: httpx.AsyncClient, stack: Stack
) -> None:
    """The upsert returns each written customer's projection; for a customer it creates it
    skips the device and counter lookups, for one it replaces it must not."""
    had, new = _prefix("had"), _prefix("new")
    keys = Keys(stack.env["KAIROS_REDIS_PREFIX"])
    redis = Redis.from_url(stack.env["KAIROS_REDIS_URL"])

    async def projection(cid: str) -> dict[str, Any] | None:
        return merge_parts(await redis.hmget(keys.profile(cid), ["v", "p", "c"]))

    try:
        assert (await gw.put(f"/v1/customers/{had}", json={"attributes": {"age": 1}})).is_success
        device = {"platform": "ios", "token": f"tok-{had}", "app_id": "a"}
        assert (await gw.post(f"/v1/customers/{had}/devices", json=device)).is_success
        event = {"type": "app.opened", "customer_id": had, "properties": {"screen": "home"}}
        assert (await gw.post("/v1/events", json=event)).status_code == 202
        await eventually(lambda: projection(had), lambda d: d and "app.opened" in d["counters"])
        out = await _import(
            gw,
            _ndjson(
                [
                    {"customer_id": had, "attributes": {"age": 2}},
                    {"customer_id": new, "attributes": {"age": 3}, "tags": ["t"]},
                ]
            ),
        )
        assert out["imported"] == 2, out
        old = await eventually(
            lambda: projection(had), lambda d: d and d["attributes"] == {"age": 2}
        )
        assert [d["token"] for d in old["devices"]] == [f"tok-{had}"]
        assert old["counters"]["app.opened"]["total"] == 1
        assert old["last"]["app.opened"] == {"screen": "home"}
        fresh = await eventually(lambda: projection(new), lambda d: d is not None)
        assert fresh["attributes"] == {"age": 3} and fresh["tags"] == ["t"]
        assert fresh["devices"] == [] and fresh["counters"] == {} and fresh["last"] == {}
        assert fresh["version"] == 1
    finally:
        await redis.aclose()


async def test_a_created_customers_projection_is_the_one_its_stored_profile_gives(
    gw: httpx.AsyncClient, stack: Stack
) -> None:
    """The import writes the projection of a customer it creates from the line itself (the
    database hands back only the id, version and times): it must be the document Postgres
    gives for the stored profile (the export's), value for value."""
    p = _prefix("same")
    cid = f"{p}-a"
    line = {
        "customer_id": cid,
        "attributes": {
            "age": 41,
            "score": 0.25,
            "big": 10**15,
            "name": 'Zoë "Z" Ä\u2028',
            "nested": {"a": [1, "two", None, True]},
            "no": None,
        },
        "tags": ["vip", "b-tag", "vip", "a-tag"],
        "consents": {"email": True, "sms": False},
        "identities": {
            "email": f"{p}@example.com",
            "msisdn": f"+4798{uuid.uuid4().int % 10**6:06d}",
        },
        "timezone": "Europe/Oslo",
        "locale": "nb-NO",
    }
    keys = Keys(stack.env["KAIROS_REDIS_PREFIX"])
    redis = Redis.from_url(stack.env["KAIROS_REDIS_URL"])
    try:
        out = await _import(gw, _ndjson([line, {"customer_id": f"{p}-b"}]))
        assert out["imported"] == 2, out
        written = await eventually(
            lambda: redis.hmget(keys.profile(cid), ["v", "p", "c"]), lambda raw: raw[0]
        )
        async with httpx.AsyncClient(base_url=stack.url("profile")) as profile:
            r = await profile.get("/v1/customers:export", params={"after": p, "limit": 2})
        assert r.status_code == 200, r.text
        exported = [orjson.loads(x) for x in r.content.splitlines()]
        assert [d["customer_id"] for d in exported] == [cid, f"{p}-b"]
        assert merge_parts(written) == exported[0]
        assert exported[0]["tags"] == ["a-tag", "b-tag", "vip"]
        assert exported[0]["identities"] == line["identities"]
        empty = merge_parts(await redis.hmget(keys.profile(f"{p}-b"), ["v", "p", "c"]))
        assert empty == exported[1]
    finally:
        await redis.aclose()


@pytest.mark.parametrize("shared", [True, False], ids=["a-customer-in-both", "none-in-both"])
async def test_a_later_batch_sees_what_an_earlier_one_wrote(
    gw: httpx.AsyncClient, shared: bool
) -> None:
    """Two batches are in flight at once (the second is staged and checked while the first
    merges): the file still reads as if every line were PUT in order, whether or not a
    customer in both batches holds them in order."""
    p = _prefix("order")
    r = await gw.put(f"/v1/customers/{p}-a", json={"identities": {"email": f"{p}-x@example.com"}})
    assert r.status_code in (200, 201), r.text
    filler: list[object] = [{"customer_id": f"{p}-f{i}"} for i in range(10_001)]
    # First batch (lines 1-5000): a gives up x for y; c takes z; e is created.
    filler[10] = {"customer_id": f"{p}-a", "identities": {"email": f"{p}-y@example.com"}}
    filler[20] = {"customer_id": f"{p}-c", "identities": {"email": f"{p}-z@example.com"}}
    filler[30] = {"customer_id": f"{p}-e", "attributes": {"v": 1}}
    # Second batch (lines 5001-10000): b takes the released x; d claims c's z; e again.
    filler[5005] = {"customer_id": f"{p}-b", "identities": {"email": f"{p}-x@example.com"}}
    filler[5010] = {"customer_id": f"{p}-d", "identities": {"email": f"{p}-z@example.com"}}
    filler[5020] = {"customer_id": f"{p}-e" if shared else f"{p}-e2", "attributes": {"v": 2}}
    doc = await _import(gw, _ndjson(filler))
    assert doc["imported"] == 10_000 and doc["failed"] == 1, doc
    assert doc["errors"] == [
        {
            "line": 5011,
            "field": "identities.email",
            "detail": f"identities.email: already belongs to customer '{p}-c'",
        }
    ]
    b = (await gw.get(f"/v1/customers/{p}-b")).json()
    assert b["identities"] == {"email": f"{p}-x@example.com"}
    a = (await gw.get(f"/v1/customers/{p}-a")).json()
    assert a["identities"] == {"email": f"{p}-y@example.com"}
    e = (await gw.get(f"/v1/customers/{p}-e")).json()
    assert e["attributes"] == {"v": 2 if shared else 1} and e["version"] == (2 if shared else 1)
    assert (await gw.get(f"/v1/customers/{p}-d")).status_code == 404


async def test_large_file_in_batches(gw: httpx.AsyncClient, stack: Stack) -> None:
    p = _prefix("big")
    n = 12_345
    lines: list[object] = [
        {
            "customer_id": f"{p}-{i}",
            "attributes": {"i": i, "segment": "s" + str(i % 7)},
            "tags": [f"t{i % 3}"],
            "consents": {"email": i % 2 == 0},
            "identities": {"email": f"{p}-{i}@example.com"},
        }
        for i in range(n)
    ]
    lines[6000] = b'{"customer_id": 1}'  # bad line in the second batch
    # An identity taken by line 1 (first batch), claimed again in the third batch.
    lines[11000] = {"customer_id": f"{p}-x", "identities": {"email": f"{p}-0@example.com"}}
    doc = await _import(gw, gzip.compress(_ndjson(lines)), **{"content-encoding": "gzip"})
    assert doc["failed"] == 2 and doc["imported"] == n - 2, doc
    assert [(e["line"], e.get("field")) for e in doc["errors"]] == [
        (6001, "customer_id"),
        (11001, "identities.email"),
    ]
    # The projection (what GET reads first) holds every imported customer.
    for i in (0, 5000, 9999, n - 1):
        v = (await gw.get(f"/v1/customers/{p}-{i}")).json()
        assert v["attributes"]["i"] == i and v["identities"]["email"] == f"{p}-{i}@example.com"
    keys = stack.env["KAIROS_REDIS_PREFIX"]
    from redis.asyncio import Redis

    r = Redis.from_url(stack.env["KAIROS_REDIS_URL"])
    try:
        projected = [k async for k in r.scan_iter(match=f"{keys}:profile:{p}-*", count=5000)]
    finally:
        await r.aclose()
    assert len(projected) == n - 2
    # And every imported customer was announced once the outbox relayed the batch: one
    # message per committed batch (5,000 lines), not one per customer.
    announced = await _announced(stack, p + "-", n - 2)
    assert len(announced) == n - 2
    assert set(announced.values()) == {1}


def test_kairos_import_sends_gzip_files(stack: Stack, tmp_path: Path) -> None:
    p = _prefix("cligz")
    f = tmp_path / "c.ndjson.gz"
    f.write_bytes(
        gzip.compress(
            _ndjson(
                [{"customer_id": f"{p}-{i}", "attributes": {"i": i}} for i in range(1200)]
                + [b'{"customer_id": 5}']
            )
        )
    )
    env = {**os.environ, "KAIROS_API_KEY": KEYS["admin"], "COLUMNS": "120"}
    out = subprocess.run(
        [sys.executable, "-m", "shared.cli", "import", str(f), "--gateway", stack.url("gateway")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "imported 1,200, failed 1" in out.stdout
    assert "customers/s" in out.stdout
    assert "line 1201" in out.stdout
    r = httpx.get(
        f"{stack.url('gateway')}/v1/customers/{p}-1199",
        headers={"authorization": f"Bearer {KEYS['admin']}"},
    )
    assert r.json()["attributes"] == {"i": 1199}


async def test_kill_mid_import_leaves_whole_batches_and_a_rerun_completes(
    gw: httpx.AsyncClient, stack: Stack
) -> None:
    """SIGKILL the profile service during an import: every batch is in or out as a whole
    (a customer is never stored without its identity), and importing again completes it."""
    p = _prefix("kill")
    n = 30_000
    body = _ndjson(
        [
            {
                "customer_id": f"{p}-{i:06d}",
                "attributes": {"i": i},
                "identities": {"email": f"{p}-{i}@example.com"},
            }
            for i in range(n)
        ]
    )
    url = stack.env["KAIROS_DATABASE_URL"].replace("+asyncpg", "")

    async def stored() -> tuple[int, int]:
        conn = await asyncpg.connect(url)
        try:
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM profile.customer WHERE customer_id LIKE $1),"
                " (SELECT count(*) FROM profile.identity WHERE kind = 'email' AND value LIKE $1)",
                p + "-%",
            )
            assert row is not None
            return int(row[0]), int(row[1])
        finally:
            await conn.close()

    req = asyncio.create_task(
        gw.post("/v1/customers:import", content=body, headers=NDJSON, timeout=600)
    )
    await eventually(stored, lambda s: s[0] > 0, timeout=60)
    stack.stop("profile", kill=True)
    r = await req
    assert r.status_code >= 500  # the client is told the import did not finish
    customers, identities = await stored()
    assert 0 < customers < n
    assert customers == identities  # no customer without its identity: no half batch
    assert customers % 5000 == 0  # whole batches only
    conn = await asyncpg.connect(url)
    try:
        ids = [
            r[0]
            for r in await conn.fetch(
                "SELECT customer_id FROM profile.customer WHERE customer_id LIKE $1"
                " ORDER BY customer_id",
                p + "-%",
            )
        ]
    finally:
        await conn.close()
    assert ids == [f"{p}-{i:06d}" for i in range(customers)]  # a prefix of the file

    stack.start("profile")
    await asyncio.to_thread(stack.wait_ready, ["profile"])
    doc = await _import(gw, body)
    assert doc == {"imported": n, "failed": 0, "errors": []}
    assert await stored() == (n, n)
    v = (await gw.get(f"/v1/customers/{p}-{n - 1:06d}")).json()
    assert v["attributes"] == {"i": n - 1}
