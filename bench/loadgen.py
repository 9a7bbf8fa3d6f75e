"""A small HTTP/1.1 keep-alive load generator on raw asyncio streams (cheap per request, so
the machine's two cores go to the server, not to the client)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Request = tuple[str, str, bytes]  # method, path, body


class Conn:
    """One keep-alive connection."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def send(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        head = (
            f"{method} {path} HTTP/1.1\r\nhost: {self.host}\r\n{self.extra}"
            f"content-length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            k, _, v = line.decode().partition(":")
            if k.lower() == "content-length":
                length = int(v)
        data = await self.reader.readexactly(length) if length else b""
        return status, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class Result:
    """Latencies (seconds) and statuses of one load run."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def pct(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]

    def summary(self) -> dict[str, float | int | dict[int, int]]:
        return {
            "requests": len(self.latencies),
            "rate_per_s": round(self.rate, 1),
            "p50_ms": round(self.pct(50) * 1000, 2),
            "p99_ms": round(self.pct(99) * 1000, 2),
            "mean_ms": round(statistics.fmean(self.latencies) * 1000, 2) if self.latencies else 0,
            "statuses": dict(self.statuses),
        }


async def closed_loop(
    host: str,
    port: int,
    headers: dict[str, str],
    make: Callable[[int], Request],
    *,
    concurrency: int,
    duration: float,
) -> Result:
    """As fast as possible with ``concurrency`` connections for ``duration`` seconds."""
    res = Result()
    deadline = time.perf_counter() + duration
    counter = 0

    async def worker() -> None:
        nonlocal counter
        c = Conn(host, port, headers)
        try:
            while time.perf_counter() < deadline:
                counter += 1
                method, path, body = make(counter)
                t0 = time.perf_counter()
                status, _ = await c.send(method, path, body)
                res.latencies.append(time.perf_counter() - t0)
                res.statuses[status] = res.statuses.get(status, 0) + 1
        finally:
            await c.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    res.elapsed = time.perf_counter() - start
    return res


async def open_loop(
    host: str,
    port: int,
    headers: dict[str, str],
    make: Callable[[int], Request],
    *,
    rate: float,
    duration: float,
    connections: int = 64,
    on_done: Callable[[int, float, bytes], None] | None = None,
) -> Result:
    """``rate`` requests/s on a fixed schedule; latency counts from the scheduled time, so a
    slow server cannot hide its queueing (no coordinated omission)."""
    res = Result()
    pool: asyncio.Queue[Conn] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(Conn(host, port, headers))
    n_total = int(rate * duration)
    start = time.perf_counter()
    tasks = []

    async def one(i: int, due: float) -> None:
        c = await pool.get()
        try:
            method, path, body = make(i)
            status, data = await c.send(method, path, body)
            done = time.perf_counter()
            res.latencies.append(done - due)
            res.statuses[status] = res.statuses.get(status, 0) + 1
            if on_done is not None:
                on_done(i, done, data)
        finally:
            pool.put_nowait(c)

    for i in range(n_total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    res.elapsed = time.perf_counter() - start
    while not pool.empty():
        await pool.get_nowait().close()
    return res
