"""Slow-loris and oversize bodies at the gateway: each gets a clear 4xx (408 for a client
that keeps the server waiting, 413 for a body over the limit, 431 for endless headers),
the gateway's memory stays bounded, and it goes on serving."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import orjson
import pytest

from shared.stack import Stack
from tests.conftest import auth
from tests.faults.conftest import HEADER_TIMEOUT_S, Figures

pytestmark = pytest.mark.slow

CONNECTIONS = 200
BOUND_S = 60.0  # how long a test waits for an answer at all (a hang fails, it is no figure)


def _rss_mb(stack: Stack) -> float:
    pid = stack.procs["gateway"].pid
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _addr(stack: Stack) -> tuple[str, int]:
    return "127.0.0.1", stack.ports["gateway"]


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, object]]:
    """The status and problem document of a raw HTTP/1.1 answer (read to EOF)."""
    raw = await asyncio.wait_for(reader.read(), BOUND_S)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, orjson.loads(body) if body else {}


async def _slow_headers(stack: Stack) -> tuple[int, dict[str, object]]:
    """Headers trickled a line at a time, never finished."""
    reader, writer = await asyncio.open_connection(*_addr(stack))

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(b"POST /v1/events HTTP/1.1\r\nhost: x\r\n")
            for i in range(int(BOUND_S * 2)):
                await writer.drain()
                await asyncio.sleep(0.5)
                writer.write(f"x-slow-{i}: y\r\n".encode())

    task = asyncio.create_task(trickle())
    try:
        return await _answer(reader)
    finally:
        task.cancel()
        writer.close()


async def _slow_body(stack: Stack) -> tuple[int, dict[str, object]]:
    """Complete headers, then a body trickled ten bytes every half second."""
    reader, writer = await asyncio.open_connection(*_addr(stack))
    key = auth("events")["authorization"]
    writer.write(
        b"POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"authorization: {key}\r\ncontent-length: 100000\r\n\r\n".encode()
    )

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(int(BOUND_S * 2)):
                writer.write(b"[" * 10)
                await writer.drain()
                await asyncio.sleep(0.5)

    task = asyncio.create_task(trickle())
    try:
        return await _answer(reader)
    finally:
        task.cancel()
        writer.close()


async def test_slow_loris_gets_408_and_memory_stays_bounded(
    fstack: Stack, fgw: httpx.AsyncClient, figures: Figures
) -> None:
    before = _rss_mb(fstack)
    status, doc = await _slow_headers(fstack)
    assert status == 408, doc
    assert doc["status"] == 408 and "headers" in str(doc["detail"])
    status, doc = await _slow_body(fstack)
    assert status == 408, doc
    assert "body" in str(doc["detail"])
    # Many at once: every one is answered 408, the gateway keeps serving meanwhile.
    many = [
        asyncio.create_task(_slow_headers(fstack) if i % 2 else _slow_body(fstack))
        for i in range(CONNECTIONS)
    ]
    await asyncio.sleep(HEADER_TIMEOUT_S / 2)
    during = _rss_mb(fstack)
    r = await fgw.get("/healthz")
    assert r.status_code == 200
    answers = await asyncio.gather(*many)
    after = _rss_mb(fstack)
    statuses = sorted({s for s, _ in answers})
    figures.add(
        "slow-loris at the gateway",
        load=f"{CONNECTIONS} connections, headers or body trickled",
        answers=statuses,
        rss_mb={"before": round(before), "during": round(during), "after": round(after)},
    )
    assert statuses == [408], statuses
    assert during - before < 100 and after - before < 100, (before, during, after)


async def _chunks(total: int, size: int = 65_536) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


async def test_oversize_bodies_get_413_and_memory_stays_bounded(
    fstack: Stack, fgw: httpx.AsyncClient, figures: Figures
) -> None:
    before = _rss_mb(fstack)
    big = 8 * 1024 * 1024
    # Announced (Content-Length) and streamed (chunked, no length): both refused.
    r = await fgw.post(
        "/v1/events", content=b" " * big, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413, r.text
    assert r.headers["content-type"] == "application/problem+json"
    async with httpx.AsyncClient(base_url=fstack.url("gateway"), headers=auth()) as c:
        results = await asyncio.gather(
            *(
                c.post(
                    "/v1/events",
                    content=_chunks(big),
                    headers={"content-type": "application/json"},
                    timeout=BOUND_S,
                )
                for _ in range(20)
            ),
            return_exceptions=True,
        )
    statuses = sorted(
        {r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in results}
    )
    after = _rss_mb(fstack)
    headers = {f"x-h{i}": "y" * 1000 for i in range(100)}
    r = await fgw.get("/healthz", headers=headers)
    figures.add(
        "oversize bodies at the gateway",
        load="8 MB announced; 20 × 8 MB chunked; 100 kB of headers",
        answers=[413, *statuses, r.status_code],
        rss_mb={"before": round(before), "after": round(after)},
    )
    assert statuses == [413], statuses
    assert r.status_code == 431, r.text
    assert after - before < 100, (before, after)
    assert (await fgw.get("/healthz")).status_code == 200
