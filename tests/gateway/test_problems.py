"""Bad input gets a 4xx problem+json naming the field; nothing is half-written."""

from __future__ import annotations

import httpx
import pytest

from shared.stack import Stack


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


async def test_wrong_content_type_is_415(gw: httpx.AsyncClient, cid: str) -> None:
    form = {"content-type": "application/x-www-form-urlencoded"}
    doc = _problem(await gw.put(f"/v1/customers/{cid}", content=b"a=1", headers=form), 415)
    assert "application/json" in str(doc["detail"])
    _problem(await gw.post("/v1/events", content=b"type=a", headers=form), 415)
    csv = {"content-type": "text/csv"}
    _problem(await gw.post("/v1/customers:import", content=b"a,b\n", headers=csv), 415)
    assert (await gw.get(f"/v1/customers/{cid}")).status_code == 404  # nothing written


async def test_body_that_is_not_utf8_is_422(gw: httpx.AsyncClient) -> None:
    json_ct = {"content-type": "application/json"}
    _problem(await gw.post("/v1/decisions", content=b"\xff\xfe{", headers=json_ct), 422)


@pytest.mark.parametrize("body", [b"", b"\n  \n"])
async def test_empty_import_is_422(gw: httpx.AsyncClient, body: bytes) -> None:
    ndjson = {"content-type": "application/x-ndjson"}
    doc = _problem(await gw.post("/v1/customers:import", content=body, headers=ndjson), 422)
    assert "empty" in str(doc["detail"])


async def test_import_still_streams_its_lines(gw: httpx.AsyncClient, cid: str) -> None:
    line = b'{"customer_id": "%s", "tags": ["imp"]}\n' % cid.encode()
    r = await gw.post(
        "/v1/customers:import", content=line, headers={"content-type": "application/x-ndjson"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["imported"] == 1
    assert (await gw.get(f"/v1/customers/{cid}")).json()["tags"] == ["imp"]


async def test_idempotency_key_with_another_body_is_409(gw: httpx.AsyncClient, cid: str) -> None:
    h = {"idempotency-key": f"k2-{cid}"}
    r1 = await gw.put(f"/v1/customers/{cid}", json={"tags": ["a"]}, headers=h)
    assert r1.status_code == 200, r1.text
    doc = _problem(await gw.put(f"/v1/customers/{cid}", json={"tags": ["b"]}, headers=h), 409)
    assert "different body" in str(doc["detail"])
    assert (await gw.get(f"/v1/customers/{cid}")).json()["tags"] == ["a"]  # not applied
    again = await gw.put(f"/v1/customers/{cid}", json={"tags": ["a"]}, headers=h)
    assert again.status_code == 200 and again.headers.get("idempotent-replayed") == "true"


async def test_405_lists_every_method_of_the_path(gw: httpx.AsyncClient, cid: str) -> None:
    r = await gw.request("OPTIONS", f"/v1/customers/{cid}")
    _problem(r, 405)
    assert r.headers["allow"] == "DELETE, GET, PATCH, PUT"


@pytest.mark.parametrize("name", ["call-center", "pos-berlin", "web_checkout", "2nd-floor"])
async def test_touchpoint_names_a_person_types(gw: httpx.AsyncClient, cid: str, name: str) -> None:
    r = await gw.post("/v1/decisions", json={"customer_id": cid, "touchpoint": name})
    assert r.status_code == 200, r.text
    r = await gw.get("/v1/contact-policy")
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("name", ["Call Center", "pos/berlin", "-pos", "x" * 41])
async def test_a_refused_touchpoint_says_which_characters(
    gw: httpx.AsyncClient, cid: str, name: str
) -> None:
    r = await gw.post("/v1/decisions", json={"customer_id": cid, "touchpoint": name})
    doc = _problem(r, 422)
    assert "touchpoint" in str(doc["errors"]) and "a-z0-9_-" in str(doc["errors"])


async def test_path_constraints_are_the_schemas(gw: httpx.AsyncClient) -> None:
    # Ids Kairos makes have one shape, checked at the gateway as the document says.
    _problem(await gw.get("/v1/campaigns/c1/runs/not-a-run"), 422)
    _problem(await gw.get("/v1/segments/s1/snapshots/not-a-snapshot"), 422)
    _problem(await gw.get("/v1/reports/programme", params={"month": "2026-13"}), 422)
    _problem(await gw.get("/v1/outbox", params={"after": str(2**63)}), 422)
    r = await gw.get("/v1/outbox", params={"after": str(2**63 - 1)})
    assert r.status_code == 200, r.text


async def test_campaign_without_audience_simulates(gw: httpx.AsyncClient, cid: str) -> None:
    # No audience means everyone (frozen as {"all": []}), never a 422.
    u = cid[2:]
    r = await gw.put(f"/v1/offers/o-{u}", json={"name": "o", "content": {"default": {"text": "x"}}})
    assert r.status_code == 200, r.text
    body = {
        "name": "everyone",
        "type": "batch",
        "channels": ["inapp"],
        "treatments": [{"id": "A", "offer": f"o-{u}"}],
        "approval_required": False,
    }
    assert (await gw.put(f"/v1/campaigns/all-{u}", json=body)).status_code == 200
    r = await gw.post(f"/v1/campaigns/all-{u}/simulate")
    assert r.status_code == 200, r.text
    assert r.json()["kind"] == "run"
    r = await gw.post("/v1/segments:preview", json={"rule": {"all": []}})
    assert r.status_code == 200, r.text
    assert r.json()["count"] == r.json()["total"]


async def test_a_value_postgres_refuses_is_422(stack: Stack) -> None:
    # Validation passed but the value does not fit the column: the caller's input, not a 500.
    import sqlalchemy as sa
    from fastapi import FastAPI
    from starlette.responses import Response

    from shared import errors
    from shared.db import make_engine

    engine = make_engine(stack.env["KAIROS_DATABASE_URL"], pool_size=1)
    app = FastAPI()
    errors.install(app)

    @app.get("/n/{n}")
    async def fits(n: int) -> Response:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT CAST(:n AS integer)"), {"n": n})
        return Response(status_code=204)

    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/n/5")).status_code == 204
            doc = _problem(await c.get(f"/n/{2**40}"), 422)
            assert "int32" in str(doc["detail"]) or "range" in str(doc["detail"])
    finally:
        await engine.dispose()


async def test_each_issue_names_its_field(gw: httpx.AsyncClient, cid: str) -> None:
    body = {"identities": {"email": "nope"}, "consents": {"push": "maybe"}}
    doc = _problem(await gw.put(f"/v1/customers/{cid}", json=body), 422)
    issues = doc["errors"]
    assert isinstance(issues, list)
    fields = {e["field"] for e in issues}
    assert {"identities.email", "consents.push"} <= fields, issues
    assert all(e["field"] == ".".join(str(p) for p in e["loc"]) for e in issues)
