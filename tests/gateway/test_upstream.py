"""The gateway's upstream client against real HTTP servers on loopback: keep-alive reuse,
answers kept apart under concurrency, chunked bodies, a connection the server closed, time
limits, and a service that is down answered as a 503 problem by a running gateway."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from gateway.client import Pool, UpstreamError, target_of
from gateway.upstream import GatewayTimeout, Upstreams
from shared.embedded import free_port, wait_port
from shared.errors import Unavailable
from shared.migrate import ROOT
from shared.settings import Settings
from shared.stack import Stack
from tests.conftest import auth


class Service:
    """A service on loopback that records which connection each request came on."""

    def __init__(self) -> None:
        self.peers: list[Any] = []
        self.headers: list[dict[str, str]] = []
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/echo/{n}", self.echo)
        app.router.add_get("/slow", self.slow)
        app.router.add_get("/chunked", self.chunked)
        app.router.add_get("/bye", self.bye)
        self.runner = web.AppRunner(app, access_log=None, keepalive_timeout=30)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    def _seen(self, request: web.Request) -> None:
        self.peers.append(
            request.transport.get_extra_info("peername") if request.transport else None
        )
        self.headers.append(dict(request.headers))

    async def echo(self, request: web.Request) -> web.Response:
        self._seen(request)
        body = await request.read()
        doc = {"n": request.match_info["n"], "query": dict(request.query), "len": len(body)}
        return web.json_response(doc, status=201 if request.method == "POST" else 200)

    async def slow(self, request: web.Request) -> web.Response:
        self._seen(request)
        await asyncio.sleep(5)
        return web.json_response({})

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        resp = web.StreamResponse(headers={"content-type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(50):
            await resp.write(f"part {i}\n".encode())
        await resp.write_eof()
        return resp

    async def bye(self, request: web.Request) -> web.Response:
        """Answers as keep-alive, then drops the connection (a server restarting)."""
        self._seen(request)
        resp = web.json_response({"bye": True})
        await resp.prepare(request)
        await resp.write_eof()
        assert request.transport is not None
        request.transport.close()
        return resp

    async def stop(self) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    s = Service()
    await s.start()
    yield s
    await s.stop()


async def test_requests_reuse_one_keep_alive_connection(service: Service) -> None:
    pool = Pool("127.0.0.1", service.port)
    try:
        for i in range(20):
            ans = await pool.request(
                "POST",
                f"/echo/{i}",
                {"content-type": "application/json"},
                b"{}",
                total=5,
                connect=1,
            )
            assert ans.status == 201
            assert orjson.loads(ans.body) == {"n": str(i), "query": {}, "len": 2}
            assert ans.headers["content-type"].startswith("application/json")
        assert pool.opened == 1
        assert len(set(service.peers)) == 1
    finally:
        pool.close()


async def test_concurrent_requests_get_their_own_answers_within_the_limit(
    service: Service,
) -> None:
    pool = Pool("127.0.0.1", service.port, limit=8)
    try:
        answers = await asyncio.gather(
            *(
                pool.request(
                    "GET", target_of(f"/echo/{i}", {"k": f"v {i}&x"}), {}, None, total=5, connect=1
                )
                for i in range(100)
            )
        )
        for i, ans in enumerate(answers):
            assert orjson.loads(ans.body) == {"n": str(i), "query": {"k": f"v {i}&x"}, "len": 0}
        assert pool.opened <= 8
        assert len(set(service.peers)) == pool.opened
    finally:
        pool.close()


async def test_a_chunked_answer_is_read_whole(service: Service) -> None:
    pool = Pool("127.0.0.1", service.port)
    try:
        ans = await pool.request("GET", "/chunked", {}, None, total=5, connect=1)
        assert ans.body == b"".join(f"part {i}\n".encode() for i in range(50))
        again = await pool.request("GET", "/echo/1", {}, None, total=5, connect=1)
        assert again.status == 200 and pool.opened == 1
    finally:
        pool.close()


async def test_a_connection_the_server_dropped_is_replaced(service: Service) -> None:
    pool = Pool("127.0.0.1", service.port)
    try:
        ans = await pool.request("GET", "/bye", {}, None, total=5, connect=1)
        assert orjson.loads(ans.body) == {"bye": True}
        for i in range(3):
            ans = await pool.request("GET", f"/echo/{i}", {}, None, total=5, connect=1)
            assert ans.status == 200
        assert pool.opened == 2
    finally:
        pool.close()


async def test_a_slow_answer_times_out_and_its_connection_is_not_reused(
    service: Service,
) -> None:
    pool = Pool("127.0.0.1", service.port)
    try:
        await pool.request("GET", "/echo/0", {}, None, total=5, connect=1)
        with pytest.raises(TimeoutError):
            await pool.request("GET", "/slow", {}, None, total=0.3, connect=0.3)
        ans = await pool.request("GET", "/echo/1", {}, None, total=5, connect=1)
        assert orjson.loads(ans.body)["n"] == "1"  # not the slow answer arriving late
        assert pool.opened == 2
    finally:
        pool.close()


async def test_nobody_listening_is_an_upstream_error() -> None:
    pool = Pool("127.0.0.1", free_port())
    with pytest.raises(UpstreamError):
        await pool.request("GET", "/", {}, None, total=2, connect=1)


async def test_upstreams_map_failures_to_503_and_504(service: Service) -> None:
    up = Upstreams(
        Settings(
            decision_url=f"http://127.0.0.1:{service.port}",
            profile_url=f"http://127.0.0.1:{free_port()}",
        )
    )
    try:
        reply = await up.request(
            "decision", "POST", "/echo/7", principal="pos-1", content=b"{}", params={"a": "b"}
        )
        assert reply.status_code == 201 and reply.content_type.startswith("application/json")
        assert orjson.loads(reply.content) == {"n": "7", "query": {"a": "b"}, "len": 2}
        assert service.headers[-1]["x-kairos-principal"] == "pos-1"
        with pytest.raises(Unavailable) as down:
            await up.request("profile", "GET", "/v1/customers/c-1")
        assert down.value.status == 503
        with pytest.raises(GatewayTimeout) as slow:
            await up.request("decision", "GET", "/slow", timeout=0.3)
        assert slow.value.status == 504
    finally:
        await up.close()


@pytest.fixture
def gateway_without_decision(stack: Stack) -> Iterator[str]:
    """A second gateway on the suite's servers whose decision service is down."""
    port = free_port()
    env = {
        **stack.env,
        "KAIROS_GATEWAY_PORT": str(port),
        "KAIROS_DECISION_URL": f"http://127.0.0.1:{free_port()}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc, "gateway")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
        if proc.poll() is None:
            proc.kill()


async def test_a_decision_service_that_is_down_is_a_503_problem(
    gateway_without_decision: str,
) -> None:
    async with httpx.AsyncClient(
        base_url=gateway_without_decision, headers=auth("pos"), timeout=20
    ) as c:
        r = await c.post("/v1/decisions", json={"customer_id": "c-1", "touchpoint": "pos"})
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "decision" in r.json()["detail"]
