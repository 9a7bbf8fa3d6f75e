"""The unified profile through the gateway: writes, reads, devices, identities, merges."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import httpx

from tests.helpers import eventually


async def _view(gw: httpx.AsyncClient, cid: str) -> dict:
    r = await gw.get(f"/v1/customers/{cid}")
    assert r.status_code == 200, r.text
    return r.json()


async def test_put_get_and_replace(gw: httpx.AsyncClient, cid: str) -> None:
    body = {
        "attributes": {"age": 34, "region": "north", "arpu": 41.5, "plan": "prepaid", "vip": True},
        "tags": ["value:gold", "device:ios", "interest:travel"],
        "consents": {"push": True, "email": True, "sms": False, "inapp": True},
        "identities": {
            "email": f"{cid}@example.com",
            "msisdn": "+4915112345678",
            "crm_id": "X-" + cid,
        },
        "timezone": "Europe/Berlin",
        "locale": "de-DE",
    }
    r = await gw.put(f"/v1/customers/{cid}", json=body)
    assert r.status_code == 200
    assert r.json()["version"] == 1
    v = await _view(gw, cid)
    assert v["attributes"] == body["attributes"]
    assert v["tags"] == sorted(body["tags"])
    assert v["consents"] == body["consents"]
    assert v["identities"]["crm_id"] == "X-" + cid
    assert v["timezone"] == "Europe/Berlin"
    assert v["locale"] == "de-DE"
    for key in ("devices", "counters", "segments", "contacts", "responses", "partial", "missing"):
        assert key in v
    r = await gw.put(
        f"/v1/customers/{cid}", json={"attributes": {"age": 35}, "tags": ["value:silver"]}
    )
    assert r.json()["version"] == 2
    v = await _view(gw, cid)
    assert v["attributes"] == {"age": 35}
    assert v["tags"] == ["value:silver"]
    assert "crm_id" not in v["identities"]


async def test_patch_merges(gw: httpx.AsyncClient, cid: str) -> None:
    await gw.put(
        f"/v1/customers/{cid}",
        json={"attributes": {"a": 1, "b": 2}, "tags": ["x:1", "x:2"], "consents": {"push": True}},
    )
    r = await gw.patch(
        f"/v1/customers/{cid}",
        json={
            "attributes": {"a": None, "c": "3"},
            "tags_add": ["x:3"],
            "tags_remove": ["x:1"],
            "consents": {"email": False},
        },
    )
    assert r.status_code == 200
    assert r.json()["version"] == 2
    v = await _view(gw, cid)
    assert v["attributes"] == {"b": 2, "c": "3"}
    assert v["tags"] == ["x:2", "x:3"]
    assert v["consents"] == {"push": True, "email": False}


async def test_large_profile(gw: httpx.AsyncClient, cid: str) -> None:
    attrs = {f"attr_{i}": i * 1.5 if i % 2 else f"v{i}" for i in range(500)}
    tags = [f"seg:{i:05d}" for i in range(1500)]
    r = await gw.put(f"/v1/customers/{cid}", json={"attributes": attrs, "tags": tags})
    assert r.status_code == 200, r.text
    v = await _view(gw, cid)
    assert len(v["attributes"]) == 500
    assert len(v["tags"]) == 1500


async def test_devices_and_lookup(gw: httpx.AsyncClient, cid: str) -> None:
    other = cid + "-b"
    await gw.put(f"/v1/customers/{cid}", json={"identities": {"email": f"{cid}@example.com"}})
    await gw.put(f"/v1/customers/{other}", json={})
    token = uuid.uuid4().hex * 2
    r = await gw.post(
        f"/v1/customers/{cid}/devices", json={"platform": "ios", "token": token, "app_id": "app"}
    )
    assert r.status_code == 201, r.text
    assert (await _view(gw, cid))["devices"] == [
        {"platform": "ios", "token": token, "app_id": "app"}
    ]
    # The same token registered by another customer moves (a handed-down phone).
    await gw.post(
        f"/v1/customers/{other}/devices", json={"platform": "ios", "token": token, "app_id": "app"}
    )
    assert (await _view(gw, cid))["devices"] == []
    r = await gw.get(
        "/v1/customers:lookup", params={"kind": "email", "value": f"{cid}@example.com"}
    )
    assert r.json() == {"customer_id": cid}
    r = await gw.get(
        "/v1/customers:lookup", params={"kind": "email", "value": "nobody@example.com"}
    )
    assert r.status_code == 404
    r = await gw.post(
        f"/v1/customers/{cid}/devices",
        json={"platform": "blackberry", "token": token, "app_id": "a"},
    )
    assert r.status_code == 422


async def test_identity_owned_by_another_customer_is_409(gw: httpx.AsyncClient, cid: str) -> None:
    await gw.put(f"/v1/customers/{cid}", json={"identities": {"email": f"{cid}@example.com"}})
    r = await gw.put(f"/v1/customers/{cid}-x", json={"identities": {"email": f"{cid}@example.com"}})
    assert r.status_code == 409
    assert "merge" in r.json()["detail"]
    assert (await gw.get(f"/v1/customers/{cid}-x")).status_code == 404


async def test_merge(gw: httpx.AsyncClient, cid: str) -> None:
    src = cid + "-old"
    await gw.put(
        f"/v1/customers/{cid}",
        json={
            "attributes": {"age": 30, "region": "north"},
            "tags": ["a:1"],
            "consents": {"push": True, "sms": True},
        },
    )
    await gw.put(
        f"/v1/customers/{src}",
        json={
            "attributes": {"age": 99, "plan": "prepaid"},
            "tags": ["b:2"],
            "consents": {"push": False, "email": True},
            "identities": {"email": f"{src}@example.com"},
        },
    )
    await gw.post(
        f"/v1/customers/{src}/devices",
        json={"platform": "android", "token": "tok-" + src, "app_id": "a"},
    )
    await gw.post(
        "/v1/events",
        json={
            "events": [
                {"type": "topup", "customer_id": cid},
                {"type": "topup", "customer_id": src},
                {"type": "app.opened", "customer_id": src},
            ]
        },
    )
    await eventually(
        lambda: gw.get(f"/v1/customers/{src}"),
        lambda r: r.json().get("counters", {}).get("app.opened", {}).get("total") == 1,
    )
    await eventually(
        lambda: gw.get(f"/v1/customers/{cid}"),
        lambda r: r.json().get("counters", {}).get("topup", {}).get("total") == 1,
    )
    r = await gw.post(f"/v1/customers/{cid}/merge", json={"from": src})
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["source"] == src
    assert rec["target"] == cid
    assert rec["principal"] == "test-admin"
    v = await _view(gw, cid)
    assert v["attributes"] == {"age": 30, "region": "north", "plan": "prepaid"}
    assert v["tags"] == ["a:1", "b:2"]
    assert v["consents"] == {"push": False, "sms": True, "email": True}
    assert v["counters"]["topup"]["total"] == 2
    assert v["counters"]["app.opened"]["total"] == 1
    assert v["devices"][0]["token"] == "tok-" + src
    assert v["identities"]["email"] == f"{src}@example.com"
    assert (await gw.get(f"/v1/customers/{src}")).status_code == 404
    merges = (await gw.get(f"/v1/customers/{cid}/merges")).json()["merges"]
    assert [m["source"] for m in merges] == [src]
    # Events and lookups that use the merged-away id reach the survivor.
    await gw.post("/v1/events", json={"type": "topup", "customer_id": src})
    await eventually(lambda: _view(gw, cid), lambda d: d["counters"]["topup"]["total"] == 3)
    r = await gw.get("/v1/customers:lookup", params={"kind": "customer_id", "value": src})
    assert r.json() == {"customer_id": cid}
    assert (await gw.post(f"/v1/customers/{cid}/merge", json={"from": src})).status_code == 409
    assert (await gw.post(f"/v1/customers/{cid}/merge", json={"from": cid})).status_code == 422
    assert (
        await gw.post(f"/v1/customers/{cid}/merge", json={"from": "nobody-" + cid})
    ).status_code == 404


async def test_anonymous_history_folds_into_customer(gw: httpx.AsyncClient, cid: str) -> None:
    anon = "anon-" + uuid.uuid4().hex[:10]
    await gw.post(
        "/v1/events",
        json={
            "events": [
                {"type": "app.opened", "anonymous_id": anon},
                {"type": "app.opened", "anonymous_id": anon},
            ]
        },
    )
    await eventually(
        lambda: gw.get(f"/v1/customers/anon:{anon}"),
        lambda r: r.status_code == 200 and r.json()["counters"]["app.opened"]["total"] == 2,
    )
    await gw.put(f"/v1/customers/{cid}", json={"attributes": {"age": 40}})
    await gw.post(
        "/v1/events", json={"type": "app.opened", "customer_id": cid, "anonymous_id": anon}
    )
    v = await eventually(
        lambda: _view(gw, cid), lambda d: d["counters"].get("app.opened", {}).get("total") == 3
    )
    assert v["identities"]["anonymous_id"] == anon
    assert (await gw.get(f"/v1/customers/anon:{anon}")).status_code == 404
    r = await gw.get("/v1/customers:lookup", params={"kind": "anonymous_id", "value": anon})
    assert r.json() == {"customer_id": cid}
    # Later anonymous-only events reach the customer too.
    await gw.post("/v1/events", json={"type": "app.opened", "anonymous_id": anon})
    await eventually(lambda: _view(gw, cid), lambda d: d["counters"]["app.opened"]["total"] == 4)


async def test_out_of_order_events_land_in_their_bucket(gw: httpx.AsyncClient, cid: str) -> None:
    now = datetime.now(UTC)
    events = [
        {
            "type": "topup",
            "customer_id": cid,
            "time": (now - timedelta(days=3)).isoformat(),
            "properties": {"amount": 5},
        },
        {
            "type": "topup",
            "customer_id": cid,
            "time": (now - timedelta(days=120)).isoformat(),
            "properties": {"amount": 99},
        },
        {
            "type": "topup",
            "customer_id": cid,
            "time": now.isoformat(),
            "properties": {"amount": 10},
        },
    ]
    await gw.post("/v1/events", json={"events": events[:1] + events[2:]})
    await eventually(lambda: gw.get(f"/v1/customers/{cid}"), lambda r: r.status_code == 200)
    await gw.post("/v1/events", json=events[1])
    v = await eventually(lambda: _view(gw, cid), lambda d: d["counters"]["topup"]["total"] == 3)
    c = v["counters"]["topup"]
    assert (c["1d"], c["7d"], c["30d"], c["90d"]) == (1, 2, 2, 2)
    assert v["last"]["topup"] == {"amount": 10}  # the newest event's values, not the latest arrival
    assert v["first_seen"]["topup"] < v["last_seen"]["topup"]
