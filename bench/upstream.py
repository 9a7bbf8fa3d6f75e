"""The gateway's upstream client alone: CPU per call of aiohttp (tuned connector) against
``gateway.client.Pool``, both on uvloop, against the bare FastAPI floor in another process.

``python -m bench.upstream [--calls N]``: the client process's CPU time (user + system) per
call, medians of 3 runs, 16 calls in flight; writes bench/results/upstream-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop

from gateway.client import Pool
from shared.embedded import free_port, wait_port

BODY = b'{"customer_id": "c-0000001", "touchpoint": "pos", "limit": 3}'
HEADERS = {"content-type": "application/json", "x-kairos-principal": "bench"}


async def _measure(call: Callable[[int], Awaitable[int]], n: int, inflight: int) -> float:
    """CPU µs per call of this process for ``n`` calls, ``inflight`` at once."""
    for i in range(200):  # warm up: connections open, code paths hot
        await call(i)
    sem = asyncio.Semaphore(inflight)

    async def one(i: int) -> None:
        async with sem:
            assert await call(i) == 202

    cpu0 = time.process_time()
    await asyncio.gather(*(one(i) for i in range(n)))
    return (time.process_time() - cpu0) / n * 1e6


async def _aiohttp(port: int, n: int) -> float:
    connector = aiohttp.TCPConnector(limit=64, keepalive_timeout=4, enable_cleanup_closed=False)
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False, timeout=aiohttp.ClientTimeout(total=5)
    ) as s:
        url = f"http://127.0.0.1:{port}/floor"

        async def call(i: int) -> int:
            async with s.post(url, data=BODY, headers=HEADERS) as r:
                await r.read()
                return r.status

        return await _measure(call, n, 16)


async def _pool(port: int, n: int) -> float:
    pool = Pool("127.0.0.1", port)

    async def call(i: int) -> int:
        ans = await pool.request("POST", "/floor", HEADERS, BODY, total=5, connect=1)
        return ans.status

    try:
        return await _measure(call, n, 16)
    finally:
        pool.close()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.upstream")
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    port = free_port()
    floor = subprocess.Popen([sys.executable, "-m", "bench.floor", str(port)])
    try:
        wait_port(port, floor, "floor app")
        runs: dict[str, list[float]] = {"aiohttp_us_per_call": [], "pool_us_per_call": []}
        for _ in range(args.runs):
            runs["aiohttp_us_per_call"].append(uvloop.run(_aiohttp(port, args.calls)))
            runs["pool_us_per_call"].append(uvloop.run(_pool(port, args.calls)))
    finally:
        floor.terminate()
        floor.wait(10)
    report = {
        "calls_per_run": args.calls,
        "load_average": os.getloadavg(),
        "median": {k: round(statistics.median(v), 1) for k, v in runs.items()},
        "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()},
    }
    out = Path(__file__).parent / "results" / f"upstream-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
