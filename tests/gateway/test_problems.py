"""Bad input gets a 4xx problem+json naming the field; nothing is half-written."""

from __future__ import annotations

import httpx
import pytest


def _problem(r: httpx.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    doc: dict[str, object] = r.json()
    assert {"type", "title", "status", "detail"} <= set(doc)
    return doc


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"attributes": "nope"}, "attributes"),
        ({"tags": [1, 2]}, "tags"),
        ({"consents": {"fax": True}}, "consents"),
        ({"consents": {"push": "maybe"}}, "consents"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"identities": {"email": "not-an-email"}}, "identities"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
async def test_put_names_the_field(
    gw: httpx.AsyncClient, cid: str, body: dict[str, object], field: str
) -> None:
    doc = _problem(await gw.put(f"/v1/customers/{cid}", json=body), 422)
    assert field in str(doc["errors"])
    assert (await gw.get(f"/v1/customers/{cid}")).status_code == 404  # nothing written


async def test_bad_customer_id(gw: httpx.AsyncClient) -> None:
    doc = _problem(await gw.put("/v1/customers/has%20space", json={}), 422)
    assert "customer_id" in str(doc["errors"])
    _problem(await gw.put("/v1/customers/" + "x" * 129, json={}), 422)


async def test_malformed_json(gw: httpx.AsyncClient, cid: str) -> None:
    _problem(
        await gw.put(
            f"/v1/customers/{cid}", content=b"{nope", headers={"content-type": "application/json"}
        ),
        422,
    )
    _problem(
        await gw.post("/v1/events", content=b"[1,", headers={"content-type": "application/json"}),
        422,
    )


async def test_body_too_large(gw: httpx.AsyncClient, cid: str) -> None:
    big = {"attributes": {"blob": "x" * 1_100_000}}
    _problem(await gw.put(f"/v1/customers/{cid}", json=big), 413)


async def test_too_many_events(gw: httpx.AsyncClient, cid: str) -> None:
    evs = [{"type": "a", "customer_id": cid}] * 1001
    doc = _problem(await gw.post("/v1/events", json={"events": evs}), 422)
    assert "1000" in str(doc["detail"])


async def test_unknown_route_and_method(gw: httpx.AsyncClient) -> None:
    _problem(await gw.get("/v1/nothing-here"), 404)
    _problem(await gw.post("/healthz"), 405)


async def test_unknown_customer_is_404(gw: httpx.AsyncClient, cid: str) -> None:
    _problem(await gw.get(f"/v1/customers/{cid}"), 404)
    _problem(await gw.patch(f"/v1/customers/{cid}", json={"attributes": {"a": 1}}), 404)
    _problem(await gw.delete(f"/v1/customers/{cid}"), 404)


async def test_idempotency_key_replays_first_answer(gw: httpx.AsyncClient, cid: str) -> None:
    h = {"idempotency-key": f"k-{cid}"}
    r1 = await gw.post("/v1/events", json={"type": "topup", "customer_id": cid}, headers=h)
    r2 = await gw.post("/v1/events", json={"type": "topup", "customer_id": cid}, headers=h)
    assert r1.status_code == r2.status_code == 202
    assert r1.json()["ids"] == r2.json()["ids"]
    assert r2.headers.get("idempotent-replayed") == "true"
