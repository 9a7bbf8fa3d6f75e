"""Projection, events out (profile.changed/erased), erasure, provider feedback, import, partial view."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import nats
import orjson
import pytest
from nats.js.api import DeliverPolicy
from redis.asyncio import Redis

from services.profile.projection import Doc, Projection, merge_parts
from shared import counters
from shared.contracts.bus import DeliveryReported, ImportBatch, ProfileCounted, ResponseRecorded
from shared.events import CloudEvent
from shared.privacy import event_subject
from shared.redis import Keys
from shared.stack import Stack
from tests.conftest import KEYS
from tests.helpers import eventually


@pytest.fixture
async def redis(stack: Stack) -> AsyncIterator[Redis]:
    r = Redis.from_url(stack.env["KAIROS_REDIS_URL"])
    yield r
    await r.aclose()


@pytest.fixture
async def js(stack: Stack) -> AsyncIterator[nats.js.JetStreamContext]:
    nc = await nats.connect(stack.env["KAIROS_NATS_URL"])
    yield nc.jetstream()
    await nc.close()


def _keys(stack: Stack) -> Keys:
    return Keys(stack.env["KAIROS_REDIS_PREFIX"])


async def _projection(redis: Redis, stack: Stack, cid: str) -> dict | None:
    return merge_parts(await redis.hmget(_keys(stack).profile(cid), ["v", "p", "c"]))


async def test_projection_follows_every_change(
    gw: httpx.AsyncClient, stack: Stack, redis: Redis, cid: str
) -> None:
    await gw.put(
        f"/v1/customers/{cid}",
        json={
            "attributes": {"age": 20},
            "tags": ["value:gold"],
            "consents": {"push": True},
            "identities": {"email": f"{cid}@x.io"},
        },
    )
    doc = await _projection(redis, stack, cid)
    assert doc is not None
    assert doc["version"] == 1
    assert doc["attributes"] == {"age": 20}
    assert doc["tags"] == ["value:gold"]
    assert doc["identities"]["email"] == f"{cid}@x.io"
    assert doc["consents"] == {"push": True}
    await gw.post(
        "/v1/events",
        json={"type": "roaming.started", "customer_id": cid, "properties": {"country": "FR"}},
    )
    doc = await eventually(
        lambda: _projection(redis, stack, cid), lambda d: "roaming.started" in d["counters"]
    )
    assert doc["version"] == 2
    assert doc["last"]["roaming.started"] == {"country": "FR"}
    assert doc["counters"]["roaming.started"]["total"] == 1


def _doc(cid: str, version: int, created_ms: int = 0, *, whole: bool = True) -> Doc:
    profile = orjson.dumps({"customer_id": cid, "attributes": {"v": version}})
    counters = orjson.dumps({"counters": {"x": {"total": version}}})
    return Doc(cid, version, created_ms, counters, profile if whole else None)


async def test_projection_never_goes_back_a_version(stack: Stack, redis: Redis, cid: str) -> None:
    proj = Projection(redis, _keys(stack))
    await proj.write_many([_doc(cid, 5)])
    await proj.write_many([_doc(cid, 4)])
    assert (await proj.read(cid))["attributes"] == {"v": 5}
    await proj.write_many([_doc(cid, 6)])
    assert (await proj.read(cid))["attributes"] == {"v": 6}
    await proj.erase(cid)
    await proj.write_many([_doc(cid, 7, created_ms=1)])
    assert await proj.read(cid) is None  # a late write of the erased profile
    await proj.write_many([_doc(cid, 1, created_ms=2**50)])
    assert (await proj.read(cid))["attributes"] == {"v": 1}  # the id created afresh
    # Counters-only writes apply on top of the previous version only.
    assert await proj.write_many([_doc(cid, 2, whole=False)]) == []
    doc = await proj.read(cid)
    assert doc["counters"]["x"]["total"] == 2
    assert doc["attributes"] == {"v": 1}
    assert await proj.write_many([_doc(cid, 4, whole=False)]) == [cid]  # 3 is missing
    assert (await proj.read(cid))["version"] == 2


async def test_markers_are_set_with_the_projection_that_holds_their_events(
    stack: Stack, redis: Redis, cid: str
) -> None:
    """Triggers read "marker present" as "the projection has the event": a marker must
    never appear beside an older projection (stale or refused writes leave it unset)."""
    keys = _keys(stack)
    proj = Projection(redis, keys)
    e1, e2, e3 = (f"{cid}-e{i}" for i in range(3))
    stale, rest = await proj.write_applied([_doc(cid, 3)], {e1: cid})
    assert (stale, rest) == ([], {})
    assert await redis.get(keys.applied(e1)) == cid.encode()
    # a counters write on top of a missing version: neither written nor marked
    stale, rest = await proj.write_applied([_doc(cid, 5, whole=False)], {e2: cid})
    assert (stale, rest) == ([cid], {e2: cid})
    assert await redis.get(keys.applied(e2)) is None
    # an older whole write: Redis holds a newer version, which has the event
    stale, rest = await proj.write_applied([_doc(cid, 2)], {e3: cid})
    assert (stale, rest) == ([], {})
    assert await redis.get(keys.applied(e3)) == cid.encode()
    # an event landing on a customer whose document is not in the write is left to the caller
    assert (await proj.write_applied([], {e2: cid}))[1] == {e2: cid}


async def test_projection_plus_an_event_is_what_the_profile_projects(
    gw: httpx.AsyncClient, stack: Stack, redis: Redis, cid: str
) -> None:
    """Triggers fold an event the profile has not applied yet into the projection with
    ``counters.fold_event``: it must give what the profile writes once it has applied it."""
    await gw.put(f"/v1/customers/{cid}", json={"tags": ["a:b"]})
    now = datetime.now(UTC).replace(microsecond=0)
    events = [
        ("topup", now - timedelta(days=3), {"amount": 10, "nested": {"x": 1}}),
        ("topup", now - timedelta(minutes=5), {"amount": 20, "channel": "app"}),
        ("topup", now - timedelta(days=1), {"amount": 5}),  # late: last values stay
        ("login", now - timedelta(seconds=30), {}),
        ("login", now - timedelta(days=200), {"old": True}),  # in the total only
    ]
    for n, (etype, at, props) in enumerate(events, start=2):
        before = await _projection(redis, stack, cid)
        assert before is not None
        expected = counters.fold_event(before, etype, at, props, datetime.now(UTC))
        resp = await gw.post(
            "/v1/events",
            json={"type": etype, "customer_id": cid, "time": at.isoformat(), "properties": props},
        )
        assert resp.status_code == 202, resp.text
        after = await eventually(
            lambda: _projection(redis, stack, cid), lambda d, n=n: d["version"] == n
        )
        assert after["counters"] == expected["counters"], etype
        assert after["last"] == expected["last"], etype


async def test_profile_changed_is_published(
    gw: httpx.AsyncClient, stack: Stack, js, cid: str
) -> None:
    prefix = stack.env["KAIROS_BUS_PREFIX"]
    sub = await js.subscribe(f"{prefix}.profile.changed.*", deliver_policy=DeliverPolicy.NEW)
    await gw.put(f"/v1/customers/{cid}", json={"tags": ["a:b"]})
    await gw.patch(f"/v1/customers/{cid}", json={"consents": {"sms": True}})
    seen = []
    while len(seen) < 2:
        ev = CloudEvent.from_bytes((await sub.next_msg(timeout=10)).data)
        if ev.subject == cid:
            seen.append(ev.data)
    assert [d["version"] for d in seen] == [1, 2]
    assert seen[1]["changed"] == ["consents"]
    await sub.unsubscribe()


async def test_an_event_batch_is_announced_once_naming_its_customers(
    gw: httpx.AsyncClient, stack: Stack, js, cid: str
) -> None:
    """Events are announced per applied batch (``profile.counted``), not per customer: the
    batch's customers and their versions are read from the profile service, and erasure
    removes a customer from them."""
    prefix = stack.env["KAIROS_BUS_PREFIX"]
    others = [f"{cid}-{i}" for i in range(3)]
    for c in (cid, *others):
        assert (await gw.put(f"/v1/customers/{c}", json={"tags": ["t:1"]})).status_code == 200
    counted = await js.subscribe(
        f"{prefix}.{ProfileCounted.TYPE}", deliver_policy=DeliverPolicy.NEW
    )
    changed = await js.subscribe(f"{prefix}.profile.changed.*", deliver_policy=DeliverPolicy.NEW)
    events = [{"type": "app.opened", "customer_id": c} for c in (cid, *others)]
    events.append({"type": "topup", "customer_id": cid})
    assert (await gw.post("/v1/events", json={"events": events})).status_code == 202
    profile = httpx.AsyncClient(base_url=stack.url("profile"), timeout=10)
    named: dict[str, int] = {}
    types: set[str] = set()
    batches: list[int] = []
    while set(named) < {cid, *others}:
        msg = await counted.next_msg(timeout=10)
        ev = CloudEvent.from_bytes(msg.data)
        assert ev.subject is None  # names no one: the stream keeps nothing personal
        announced = ProfileCounted.parse(ev)
        r = await profile.get(f"/internal/import-batches/{announced.batch_id}")
        assert r.status_code == 200
        batch = ImportBatch.model_validate_json(r.content)
        got = batch.customers
        assert announced.count == len(got)
        named.update({c: v for c, v in got.items() if c == cid or c in others})
        types |= set(announced.event_types)
        assert batch.event_types is not None
        for c in got:  # each customer's own event types, not the whole batch's
            if c == cid:
                assert set(batch.event_types[c]) <= {"app.opened", "topup"}
            elif c in others:
                assert batch.event_types[c] == ["app.opened"]
        batches.append(announced.batch_id)
    assert named == {c: 2 for c in (cid, *others)}  # PUT made version 1, the events 2
    assert {"app.opened", "topup"} <= types
    per_customer = []  # and no profile.changed per customer for the events (version 2)
    with contextlib.suppress(TimeoutError):
        while True:
            ev = CloudEvent.from_bytes((await changed.next_msg(timeout=1)).data)
            if ev.subject in (cid, *others) and ev.data["version"] > 1:
                per_customer.append(ev.data)
    assert per_customer == []
    # Erased: gone from the announcement rows too.
    assert (await gw.delete(f"/v1/customers/{cid}")).status_code == 202

    async def names_of_batches() -> set[str]:
        out: set[str] = set()
        for b in batches:
            r = await profile.get(f"/internal/import-batches/{b}")
            out |= set(ImportBatch.model_validate_json(r.content).customers)
        return out

    await eventually(names_of_batches, lambda names: cid not in names and set(others) <= names)
    await profile.aclose()
    await counted.unsubscribe()
    await changed.unsubscribe()


async def test_erasure(gw: httpx.AsyncClient, stack: Stack, redis: Redis, js, cid: str) -> None:
    prefix = stack.env["KAIROS_BUS_PREFIX"]
    sub = await js.subscribe(f"{prefix}.profile.erased.*", deliver_policy=DeliverPolicy.NEW)
    await gw.put(
        f"/v1/customers/{cid}",
        json={"attributes": {"name": "Ana"}, "identities": {"email": f"{cid}@x.io"}},
    )
    await gw.post(
        f"/v1/customers/{cid}/devices",
        json={"platform": "ios", "token": "tok-" + cid, "app_id": "a"},
    )
    await gw.post("/v1/events", json={"type": "app.opened", "customer_id": cid})
    await eventually(
        lambda: _projection(redis, stack, cid), lambda d: d and "app.opened" in d["counters"]
    )
    r = await gw.delete(f"/v1/customers/{cid}")
    assert r.status_code == 202
    await eventually(
        lambda: gw.get(f"/v1/customers/{cid}"), lambda r: r.status_code == 404, timeout=10
    )
    assert await _projection(redis, stack, cid) is None
    r = await gw.get("/v1/customers:lookup", params={"kind": "email", "value": f"{cid}@x.io"})
    assert r.status_code == 404
    while True:
        ev = CloudEvent.from_bytes((await sub.next_msg(timeout=10)).data)
        if ev.subject == cid:
            break
    assert ev.data["customer_id"] == cid
    await sub.unsubscribe()
    # The id can start afresh, with nothing of the old profile.
    await gw.put(f"/v1/customers/{cid}", json={})
    v = (await gw.get(f"/v1/customers/{cid}")).json()
    assert v["attributes"] == {}
    assert v["devices"] == []
    assert v["counters"] == {}
    assert (await _projection(redis, stack, cid))["version"] == 1


async def test_erasure_takes_an_anonymous_id_linked_without_a_history_of_its_own(
    gw: httpx.AsyncClient, stack: Stack, redis: Redis, js, cid: str
) -> None:
    """An anonymous id linked to the customer by its first event (no anonymous profile was
    ever made, so nothing was folded) still has its events under ``anon:<id>`` on the bus;
    erasure names it and purges them."""
    anon = f"anon-{cid}"
    await gw.put(f"/v1/customers/{cid}", json={})
    r = await gw.post(
        "/v1/events", json={"type": "app.opened", "customer_id": cid, "anonymous_id": anon}
    )
    assert r.status_code == 202, r.text
    await eventually(
        lambda: _projection(redis, stack, cid), lambda d: d and "app.opened" in d["counters"]
    )
    r = await gw.post("/v1/events", json={"type": "page.viewed", "anonymous_id": anon})
    assert r.status_code == 202, r.text
    await eventually(  # counted on the customer through the link
        lambda: _projection(redis, stack, cid), lambda d: d and "page.viewed" in d["counters"]
    )
    stream = f"{stack.env['KAIROS_BUS_PREFIX'].upper()}_EVENTS"
    subject = f"{stack.env['KAIROS_BUS_PREFIX']}.{event_subject('page.viewed', None, anon)}"
    assert (await js.get_last_msg(stream, subject)).data  # on the bus, under anon:<id>

    r = await gw.delete(f"/v1/customers/{cid}")
    assert r.status_code == 202, r.text
    assert set(r.json()["erased"]) == {cid, f"anon:{anon}"}

    async def still_there() -> bool:
        try:
            await js.get_last_msg(stream, subject)
        except nats.js.errors.NotFoundError:
            return False
        return True

    await eventually(still_there, lambda there: not there, timeout=10)


async def test_invalid_push_token_is_dropped(
    gw: httpx.AsyncClient, stack: Stack, js, cid: str
) -> None:
    await gw.put(f"/v1/customers/{cid}", json={})
    old, fresh = "dead-" + cid, "fresh-" + cid
    for tok in (old, fresh):
        await gw.post(
            f"/v1/customers/{cid}/devices", json={"platform": "ios", "token": tok, "app_id": "a"}
        )
    unregistered_at = datetime.now(UTC) + timedelta(seconds=1)
    for tok, since in (
        # APNs' own timestamp: milliseconds since the epoch
        (old, int(unregistered_at.timestamp() * 1000)),
        # Unregistered as of a time *before* the fresh token was registered again: kept.
        (fresh, "2020-01-01T00:00:00Z"),
    ):
        report = DeliveryReported(
            tracking_id=f"t-{tok}",
            customer_id=cid,
            channel="push",
            status="token_invalid",
            token_invalid=True,
            platform="ios",
            token=tok,
            token_invalid_since=since,  # type: ignore[arg-type]
        )
        subject, ev = report.to_event(source="test")
        await js.publish(f"{stack.env['KAIROS_BUS_PREFIX']}.{subject}", ev.to_bytes())
    v = await eventually(
        lambda: gw.get(f"/v1/customers/{cid}"),
        lambda r: [d["token"] for d in r.json()["devices"]] == [fresh],
    )
    assert v.status_code == 200


async def test_unsubscribe_withdraws_consent(
    gw: httpx.AsyncClient, stack: Stack, js, cid: str
) -> None:
    await gw.put(f"/v1/customers/{cid}", json={"consents": {"email": True, "push": True}})
    response = ResponseRecorded(
        tracking_id="t",
        customer_id=cid,
        campaign_id="k",
        channel="email",
        outcome="unsubscribed",
        time="2026-01-01T00:00:00Z",
    )
    subject, ev = response.to_event(source="test")
    await js.publish(f"{stack.env['KAIROS_BUS_PREFIX']}.{subject}", ev.to_bytes())
    await eventually(
        lambda: gw.get(f"/v1/customers/{cid}"),
        lambda r: r.json()["consents"] == {"email": False, "push": True},
    )


def _ndjson(lines: list[object]) -> bytes:
    return b"".join((orjson.dumps(x) if not isinstance(x, bytes) else x) + b"\n" for x in lines)


async def test_import_keeps_good_lines_and_reports_bad_ones(gw: httpx.AsyncClient) -> None:
    p = "imp-" + uuid.uuid4().hex[:8]
    lines = [
        {"customer_id": f"{p}-1", "attributes": {"age": 1}, "tags": ["t:1"]},
        b"{not json",
        {"customer_id": f"{p}-2", "consents": {"fax": True}},
        {"customer_id": "bad id with spaces"},
        {"customer_id": f"{p}-3", "identities": {"email": f"{p}@x.io"}},
    ]
    r = await gw.post(
        "/v1/customers:import",
        content=_ndjson(lines),
        headers={"content-type": "application/x-ndjson"},
    )
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["imported"] == 2
    assert doc["failed"] == 3
    assert [e["line"] for e in doc["errors"]] == [2, 3, 4]
    assert "consents" in doc["errors"][1]["detail"]
    assert (await gw.get(f"/v1/customers/{p}-1")).json()["tags"] == ["t:1"]
    assert (await gw.get(f"/v1/customers/{p}-2")).status_code == 404
    r = await gw.get("/v1/customers:lookup", params={"kind": "email", "value": f"{p}@x.io"})
    assert r.json() == {"customer_id": f"{p}-3"}


def test_kairos_import_command(stack: Stack, tmp_path: Path) -> None:
    p = "cli-" + uuid.uuid4().hex[:8]
    f = tmp_path / "c.ndjson"
    f.write_bytes(
        _ndjson(
            [{"customer_id": f"{p}-{i}", "attributes": {"i": i}} for i in range(2500)]
            + [b'{"customer_id": 5}']
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
    assert "imported 2,500, failed 1" in out.stdout
    assert "line 2501" in out.stdout
    r = httpx.get(
        f"{stack.url('gateway')}/v1/customers/{p}-2499",
        headers={"authorization": f"Bearer {KEYS['admin']}"},
    )
    assert r.json()["attributes"] == {"i": 2499}


async def test_view_is_partial_when_a_service_is_down(
    gw: httpx.AsyncClient, stack: Stack, cid: str
) -> None:
    await gw.put(f"/v1/customers/{cid}", json={"attributes": {"a": 1}})
    stack.stop("selection")
    try:
        r = await gw.get(f"/v1/customers/{cid}")
        assert r.status_code == 200
        v = r.json()
        assert v["partial"] is True
        assert v["missing"] == ["selection"]
        assert v["attributes"] == {"a": 1}
    finally:
        stack.start("selection")
        stack.wait_ready(["selection"])
    v = (await gw.get(f"/v1/customers/{cid}")).json()
    assert v["partial"] is False
    assert v["missing"] == []


async def test_view_is_503_when_profile_is_down(
    gw: httpx.AsyncClient, stack: Stack, cid: str
) -> None:
    stack.stop("profile")
    try:
        r = await gw.get(f"/v1/customers/{cid}")
        assert r.status_code == 503
        assert r.headers["content-type"].startswith("application/problem+json")
        assert "profile" in r.json()["detail"]
    finally:
        stack.start("profile")
        stack.wait_ready(["profile"])


def test_stack_json_shape(stack: Stack) -> None:
    doc = json.loads(stack.write_stack_json().read_text())
    assert set(doc) >= {"gateway", "services", "postgres", "redis", "nats"}
