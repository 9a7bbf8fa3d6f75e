"""One OpenTelemetry trace from a client through the gateway, decision and the bus.

The suite's processes run here with OTLP export on, against a real OTLP/HTTP receiver on
loopback (tests/peers/otlp.py parses the protobuf the SDK sends), on a stack of their own
(own database, bus and Redis namespaces, on the session's servers): tracing is off in the
rest of the suite.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from sqlalchemy.engine import make_url

from shared.embedded import free_port
from shared.events import CloudEvent
from shared.migrate import drop_database
from shared.stack import PROCESSES, Stack
from tests.conftest import _forget_namespaces, auth
from tests.helpers import eventually
from tests.peers.otlp import OtlpPeer

SERVER, CLIENT = 2, 3  # OTLP span kinds
TRACED = ["profile", "selection", "decision", "dispatch", "gateway"]


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpPeer]:
    peer = OtlpPeer()
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def traced(
    stack: Stack, otlp: OtlpPeer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The services with tracing on, sharing the session's servers (own namespaces)."""
    rid = uuid.uuid4().hex[:8]
    env = dict(stack.env)
    env.update(otlp.env)
    env.update(KAIROS_BUS_PREFIX=f"tr{rid}", KAIROS_REDIS_PREFIX=f"tr{rid}")
    url = make_url(env["KAIROS_DATABASE_URL"]).set(database=f"kairos_trace_{rid}")
    env["KAIROS_DATABASE_URL"] = url.render_as_string(hide_password=False)
    for name in PROCESSES:
        env[f"KAIROS_{name.upper()}_PORT"] = str(free_port())
    env["KAIROS_PUBLIC_URL"] = f"http://127.0.0.1:{env['KAIROS_GATEWAY_PORT']}"
    run_dir: Path = tmp_path_factory.mktemp("traced")
    st = Stack.prepare(run_dir, base_env=env)
    try:
        for name in TRACED:
            st.start(name)
        st.wait_ready(TRACED, timeout=90)
        yield st
    finally:
        st.down()
        asyncio.run(drop_database(env["KAIROS_DATABASE_URL"]))
        asyncio.run(_forget_namespaces(st.env))


@pytest.fixture
async def tgw(traced: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=traced.url("gateway"), headers=auth(), timeout=20) as c:
        yield c


def _traceparent() -> tuple[str, str, str]:
    """A client's own trace: (header, trace id, span id), sampled."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


async def _ok(r: Any) -> Any:
    resp = await r
    assert resp.status_code < 300, resp.text
    return resp.json()


async def _catalog(tgw: httpx.AsyncClient, u: str, **campaign: Any) -> str:
    await _ok(
        tgw.put(
            f"/v1/offers/off-{u}",
            json={
                "name": "Roaming pack",
                "content": {
                    "default": {"title": "Hi", "body": "A data pack"},
                    "sms": {"text": "A data pack for your trip"},
                },
            },
        )
    )
    cid = f"cmp-{u}"
    body = {
        "name": cid,
        "treatments": [{"id": "A", "offer": f"off-{u}", "weight": 1}],
        "approval_required": False,
        **campaign,
    }
    await _ok(tgw.put(f"/v1/campaigns/{cid}", json=body))
    await _ok(tgw.post(f"/v1/campaigns/{cid}/activate"))
    return cid


async def test_a_decision_is_one_trace_from_the_client_through_gateway_and_decision(
    traced: Stack, tgw: httpx.AsyncClient, otlp: OtlpPeer
) -> None:
    u = uuid.uuid4().hex[:8]
    customer = f"c-{u}"
    await _ok(tgw.put(f"/v1/customers/{customer}", json={"attributes": {"age": 30}}))
    cmp = await _catalog(tgw, u, type="realtime", touchpoints=[f"pos{u}"])
    ask = {"customer_id": customer, "touchpoint": f"pos{u}", "limit": 1}

    async def offered() -> list[Any]:
        r = await tgw.post("/v1/decisions?dry_run=true", json=ask)
        return list(r.json().get("offers") or []) if r.status_code == 200 else []

    await eventually(offered, bool)  # the catalog reloaded
    nc = await nats.connect(traced.env["KAIROS_NATS_URL"])
    contacts: list[Any] = []
    try:
        js = nc.jetstream()
        prefix = traced.env["KAIROS_BUS_PREFIX"]

        async def on_contact(msg: Any) -> None:
            contacts.append(msg)

        await js.subscribe(f"{prefix}.contact.recorded.>", cb=on_contact, ordered_consumer=True)
        header, trace_id, client_span = _traceparent()
        r = await tgw.post("/v1/decisions", json=ask, headers={"traceparent": header})
        assert r.status_code == 200, r.text
        assert [o["campaign_id"] for o in r.json()["offers"]] == [cmp]

        def complete(spans: list[Any]) -> bool:
            return {(s.service, s.kind) for s in spans} >= {
                ("kairos-gateway", SERVER),
                ("kairos-gateway", CLIENT),
                ("kairos-decision", SERVER),
            }

        spans = await eventually(lambda: _now(otlp.trace(trace_id)), complete)
        gw_server = next(s for s in spans if (s.service, s.kind) == ("kairos-gateway", SERVER))
        gw_client = next(s for s in spans if (s.service, s.kind) == ("kairos-gateway", CLIENT))
        decision = next(s for s in spans if (s.service, s.kind) == ("kairos-decision", SERVER))
        # client → gateway → its upstream call → decision: one chain of parents
        assert gw_server.parent_id == client_span
        assert gw_client.parent_id == gw_server.span_id
        assert decision.parent_id == gw_client.span_id
        assert gw_client.attributes["http.response.status_code"] == "200"
        # and the contact it recorded carries the same trace on the bus
        await eventually(lambda: _now(contacts), bool)
        assert contacts[0].headers["traceparent"].split("-")[1] == trace_id
    finally:
        await nc.close()


async def test_an_event_is_one_trace_from_the_gateway_to_dispatch_requested(
    traced: Stack, tgw: httpx.AsyncClient, otlp: OtlpPeer
) -> None:
    u = uuid.uuid4().hex[:8]
    customer = f"c-{u}"
    msisdn = "+49" + str(uuid.uuid4().int % 10**11).zfill(11)
    await _ok(
        tgw.put(
            f"/v1/customers/{customer}",
            json={"consents": {"sms": True}, "identities": {"msisdn": msisdn}},
        )
    )
    cmp = await _catalog(tgw, u, type="triggered", channels=["sms"], trigger={"event": f"trip.{u}"})
    nc = await nats.connect(traced.env["KAIROS_NATS_URL"])
    requested: list[Any] = []
    try:
        js = nc.jetstream()
        prefix = traced.env["KAIROS_BUS_PREFIX"]

        async def on_dispatch(msg: Any) -> None:
            requested.append(msg)

        await js.subscribe(f"{prefix}.dispatch.requested.>", cb=on_dispatch, ordered_consumer=True)
        sent: set[str] = set()

        async def fire() -> list[Any]:
            # until the decision replica has loaded the campaign, an event matches nothing:
            # send one (each its own trace) until a dispatch request comes of one of them
            if not requested:
                header, trace_id, _ = _traceparent()
                sent.add(trace_id)
                r = await tgw.post(
                    "/v1/events",
                    json={"type": f"trip.{u}", "customer_id": customer},
                    headers={"traceparent": header},
                )
                assert r.status_code == 202, r.text
                for _ in range(40):
                    if requested:
                        break
                    await asyncio.sleep(0.05)
            return requested

        await eventually(fire, bool, timeout=30)
        assert CloudEvent.from_bytes(requested[0].data).data["campaign_id"] == cmp
        trace_id = requested[0].headers["traceparent"].split("-")[1]
        assert trace_id in sent

        def complete(spans: list[Any]) -> bool:
            services = {s.service for s in spans}
            return {"kairos-gateway", "kairos-decision", "kairos-dispatch"} <= services

        spans = await eventually(lambda: _now(otlp.trace(trace_id)), complete)
        names = {(s.service, s.name) for s in spans}
        assert ("kairos-decision", "consume decision-triggers") in names
        assert any(svc == "kairos-dispatch" and n.startswith("consume ") for svc, n in names)
    finally:
        await nc.close()
    assert otlp.refused == 0


async def _now(value: Any) -> Any:
    return value
