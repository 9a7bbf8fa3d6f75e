"""API keys and scopes on every route family."""

from __future__ import annotations

import httpx
import pytest

from shared.stack import Stack
from tests.conftest import KEYS, auth

ROUTES = [
    ("POST", "/v1/events", {"type": "app.opened", "customer_id": "c-1"}, "events"),
    ("GET", "/v1/customers/c-1", None, "reader"),
    ("PUT", "/v1/customers/c-1", {"attributes": {}}, "writer"),
    ("PATCH", "/v1/customers/c-1", {"attributes": {}}, "writer"),
    ("DELETE", "/v1/customers/c-1", None, "writer"),
    (
        "POST",
        "/v1/customers/c-1/devices",
        {"platform": "ios", "token": "t" * 64, "app_id": "a"},
        "events",
    ),
    ("POST", "/v1/customers/c-1/merge", {"from": "c-2"}, "writer"),
    ("GET", "/v1/customers/c-1/merges", None, "reader"),
    ("POST", "/v1/customers:import", None, "writer"),
    ("GET", "/v1/customers:lookup?kind=email&value=a@b.c", None, "reader"),
]


@pytest.mark.parametrize(("method", "path", "body", "_"), ROUTES)
async def test_401_without_or_with_unknown_key(
    stack: Stack, method: str, path: str, body: object, _: str
) -> None:
    async with httpx.AsyncClient(base_url=stack.url("gateway")) as c:
        for headers in (
            {},
            {"authorization": "Bearer not-a-real-key-123456"},
            {"authorization": "Basic x"},
        ):
            r = await c.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (path, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["status"] == 401
            assert r.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(("method", "path", "body", "_"), ROUTES)
async def test_403_without_the_scope(
    stack: Stack, method: str, path: str, body: object, _: str
) -> None:
    async with httpx.AsyncClient(base_url=stack.url("gateway")) as c:
        r = await c.request(method, path, json=body, headers=auth("nothing"))
        assert r.status_code == 403, (path, r.text)
        assert "lacks the scope" in r.json()["detail"]


async def test_scoped_key_is_let_through(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url("gateway")) as c:
        r = await c.post(
            "/v1/events",
            json={"type": "app.opened", "customer_id": "c-auth"},
            headers=auth("events"),
        )
        assert r.status_code == 202
        r = await c.get("/v1/customers/c-unknown-auth", headers=auth("events"))
        assert r.status_code == 403
        r = await c.get("/v1/customers/c-unknown-auth", headers=auth("reader"))
        assert r.status_code == 404


async def test_open_paths_need_no_key(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url("gateway")) as c:
        for p in ("/healthz", "/readyz", "/metrics"):
            assert (await c.get(p)).status_code == 200


async def test_principal_is_logged_never_the_key(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.url("gateway")) as c:
        r = await c.get("/v1/customers/c-logged-0", headers=auth("reader"))
        assert r.status_code == 404
    log = (stack.run_dir / "logs" / "gateway.log").read_text()
    lines = [ln for ln in log.splitlines() if "/v1/customers/c-logged-0" in ln]
    assert lines, "the request was not logged"
    assert '"principal":"test-reader"' in lines[-1]
    assert KEYS["reader"] not in log
