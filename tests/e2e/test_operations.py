"""Every process serves /healthz, /readyz, /metrics; the gateway documents the contract."""

from __future__ import annotations

import httpx
import pytest

from shared.stack import PROCESSES, Stack


@pytest.mark.parametrize("name", list(PROCESSES))
async def test_health_ready_metrics(stack: Stack, name: str) -> None:
    async with httpx.AsyncClient(base_url=stack.url(name)) as c:
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        ready = await c.get("/readyz")
        assert ready.status_code == 200
        checks = ready.json()["checks"]
        assert checks["redis"] == "ok"
        assert checks["nats"] == "ok"
        if name != "gateway":
            assert checks["database"] == "ok"
        metrics = await c.get("/metrics")
        assert metrics.status_code == 200
        assert "kairos_http_requests_total" in metrics.text


async def test_openapi_describes_the_public_paths(gw: httpx.AsyncClient) -> None:
    doc = (await gw.get("/openapi.json")).json()
    paths = doc["paths"]
    for path in (
        "/v1/events",
        "/v1/customers/{customer_id}",
        "/v1/customers:import",
        "/v1/customers/{customer_id}/devices",
        "/v1/customers/{customer_id}/merge",
        "/v1/customers/{customer_id}/merges",
    ):
        assert path in paths, path
    ev = paths["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refs = str(ev)
    assert "EventIn" in refs
    assert "EventBatch" in refs
    assert "EventIn" in doc["components"]["schemas"]
    put = paths["/v1/customers/{customer_id}"]["put"]
    assert "CustomerPut" in str(put["requestBody"])
