"""Delivery figures end to end (issue: dispatch), against the APNs protocol peer on loopback:

- event accepted at the gateway → push received by the APNs peer, p50/p99 at 500 events/s;
- the same while a batch run over the whole population is being pushed (the batch lane);
- the batch itself: run start → last push received (pushes/s end to end);
- a SIGKILL of dispatch at full speed: pushes that reached the peer twice, messages marked
  in_doubt, and none lost.

``.venv/bin/python -m bench.delivery --customers 100000 --runs 3 --duration 10`` starts the
suite with dispatch pointed at the peer, registers one iOS device per customer, and writes
``bench/results/delivery-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson

from bench.__main__ import RESULTS, start_stack
from bench.loadgen import open_loop
from shared.stack import Stack

TRIGGER = "dl.roaming"


def _pcts(xs: list[float]) -> dict[str, float | int | None]:
    xs = sorted(xs)
    n = len(xs)
    if not n:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "n": n,
        "p50_ms": round(xs[n // 2] * 1000, 1),
        "p99_ms": round(xs[min(n - 1, int(0.99 * n))] * 1000, 1),
        "max_ms": round(xs[-1] * 1000, 1),
    }


@dataclass
class Rec:
    """One request the APNs peer answered."""

    at: float
    status: int
    token: str
    body: str | None


class PeerProcess:
    """The APNs peer in a process of its own (so its CPU is not the load generator's),
    writing every request to a log this reads as it grows."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.log = directory / "requests.jsonl"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.peers.apns", str(directory), str(self.log)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.env: dict[str, str] = json.loads(self.proc.stdout.readline())
        self._records: list[Rec] = []
        self._offset = 0

    @property
    def received(self) -> list[Rec]:
        with self.log.open("rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        end = chunk.rfind(b"\n") + 1
        for line in chunk[:end].splitlines():
            d = orjson.loads(line)
            self._records.append(Rec(d["at"], d["status"], d["token"], d["body"]))
        self._offset += end
        return self._records

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


def token(i: int) -> str:
    return f"{i:064x}"


class Bench:
    def __init__(self, stack: Stack, key: str, apns: Any, customers: int, duration: float) -> None:
        self.stack = stack
        self.key = key
        self.apns = apns
        self.customers = customers
        self.duration = duration
        self.headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        self.port = stack.ports["gateway"]

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.stack.url("gateway"), headers=self.headers, timeout=120
        )

    async def setup(self) -> dict[str, Any]:
        """Customers with push consent (import), one iOS device each, the campaigns."""
        t0 = time.perf_counter()
        lines = b"".join(
            orjson.dumps(
                {
                    "customer_id": f"d-{i:07d}",
                    "attributes": {"first_name": "Ana"},
                    "tags": ["bench:delivery"],
                    "consents": {"push": True},
                }
            )
            + b"\n"
            for i in range(self.customers)
        )
        async with self.client() as c:
            r = await c.post(
                "/v1/customers:import",
                content=lines,
                headers={"content-type": "application/x-ndjson"},
                timeout=None,
            )
            assert r.status_code == 200, r.text
        imported = time.perf_counter() - t0

        t1 = time.perf_counter()
        sem = asyncio.Semaphore(48)
        async with self.client() as c:

            async def device(n: int) -> None:
                body = {"platform": "ios", "token": token(n), "app_id": "com.example.app"}
                async with sem:
                    for _ in range(5):
                        r = await c.post(f"/v1/customers/d-{n:07d}/devices", json=body)
                        if r.status_code in (200, 201):
                            return
                        await asyncio.sleep(0.2)
                raise RuntimeError(f"device of d-{n:07d}: {r.status_code} {r.text}")

            await asyncio.gather(*(device(n) for n in range(self.customers)))
        devices = time.perf_counter() - t1
        async with self.client() as c:
            offer = {
                "name": "Roaming",
                "link": "https://example.com/roam",
                "content": {
                    "default": {"title": "Hi {{ attributes.first_name }}", "body": "Batch"},
                    "push": {
                        "title": "In {{ event.properties.country }}?",
                        "body": "seq {{ event.properties.seq }}",
                    },
                },
            }
            assert (await c.put("/v1/offers/dl-roam", json=offer)).status_code == 200
            batch_offer = {**offer, "content": {"default": offer["content"]["default"]}}  # type: ignore[dict-item]
            assert (await c.put("/v1/offers/dl-batch", json=batch_offer)).status_code == 200
            for cid, body in (
                (
                    "dl-trigger",
                    {
                        "type": "triggered",
                        "trigger": {"event": TRIGGER},
                        "channels": ["push"],
                        "treatments": [{"id": "A", "offer": "dl-roam"}],
                        "priority": 90,
                    },
                ),
            ):
                r = await c.put(
                    f"/v1/campaigns/{cid}",
                    json={"name": cid, "approval_required": False, **body},
                )
                assert r.status_code == 200, r.text
                assert (await c.post(f"/v1/campaigns/{cid}/activate")).status_code == 200
            r = await c.put(
                "/v1/contact-policy",
                json={"rules": [{"channel": "*", "max": 1000, "per": "1d"}]},
            )
            assert r.status_code == 200, r.text
        await asyncio.sleep(1.0)
        return {
            "customers": self.customers,
            "import_s": round(imported, 1),
            "devices_s": round(devices, 1),
        }

    async def batch_campaign(self, run: int, tag: str) -> str:
        cid = f"dl-batch-{run}-{tag}"
        async with self.client() as c:
            r = await c.put(
                f"/v1/campaigns/{cid}",
                json={
                    "name": cid,
                    "type": "batch",
                    "audience": {"tag": "bench:delivery"},
                    "channels": ["push"],
                    "treatments": [{"id": "A", "offer": "dl-batch"}],
                    "approval_required": False,
                },
            )
            assert r.status_code == 200, r.text
            assert (await c.post(f"/v1/campaigns/{cid}/activate")).status_code == 200
        await asyncio.sleep(0.8)
        return cid

    async def start_run(self, cid: str) -> str:
        async with self.client() as c:
            r = await c.post(f"/v1/campaigns/{cid}/runs")
            assert r.status_code == 202, r.text
            return str(r.json()["run_id"])

    async def triggers(self, rate: float, run: int) -> dict[str, Any]:
        """Open-loop roaming events; latency from the gateway's 202 to the peer's receipt."""
        accepted: dict[int, float] = {}
        base = run * 10_000_000

        def make(i: int) -> tuple[str, str, bytes]:
            ev = {
                "type": TRIGGER,
                "customer_id": f"d-{(base + i) % self.customers:07d}",
                "properties": {"country": "FR", "seq": base + i},
            }
            return "POST", "/v1/events", orjson.dumps(ev)

        def done(i: int, at: float, _: bytes) -> None:
            accepted[base + i] = at

        mark = len(self.apns.received)
        res = await open_loop(
            "127.0.0.1",
            self.port,
            self.headers,
            make,
            rate=rate,
            duration=self.duration,
            connections=64,
            on_done=done,
        )
        await asyncio.sleep(3)
        seen: dict[int, float] = {}
        for m in list(self.apns.received)[mark:]:
            body = m.body or ""
            if body.startswith("seq "):
                seen.setdefault(int(body[4:]), m.at)
        lat = [seen[s] - t for s, t in accepted.items() if s in seen]
        return {
            "offered_events_per_s": rate,
            "achieved_events_per_s": round(res.rate, 1),
            "pushed": len(lat),
            "of": len(accepted),
            "event_to_push": _pcts(lat),
        }

    async def pushes_of(self, prefix_ms: float) -> int:
        return sum(1 for m in list(self.apns.received) if m.at >= prefix_ms)

    async def batch_alone(self, run: int) -> dict[str, Any]:
        cid = await self.batch_campaign(run, "alone")
        t0 = time.monotonic()
        await self.start_run(cid)
        got = await self._wait_pushes(t0, self.customers)
        elapsed = time.monotonic() - t0
        return {
            "members": self.customers,
            "pushed": got,
            "seconds": round(elapsed, 1),
            "pushes_per_s": round(got / elapsed, 1),
        }

    async def _wait_pushes(self, since: float, n: int, timeout: float = 900) -> int:
        last, still = -1, 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = sum(
                1
                for m in list(self.apns.received)
                if m.at >= since and m.status == 200 and not (m.body or "").startswith("seq ")
            )
            if got >= n:
                return got
            still = still + 1 if got == last else 0
            if still > 100:  # 10 s without progress
                return got
            last = got
            await asyncio.sleep(0.1)
        return last

    async def triggers_during_batch(self, run: int) -> dict[str, Any]:
        cid = await self.batch_campaign(run, "busy")
        t0 = time.monotonic()
        await self.start_run(cid)
        await asyncio.sleep(2.0)  # the run is planning and pushing
        out = await self.triggers(500, run + 100)
        got = await self._wait_pushes(t0, self.customers)
        out["batch_pushed"] = got
        out["batch_seconds"] = round(time.monotonic() - t0, 1)
        return out

    async def kill(self, run: int) -> dict[str, Any]:
        """SIGKILL dispatch at full speed, restart, count duplicates and in_doubt rows."""
        cid = await self.batch_campaign(run, "kill")
        t0 = time.monotonic()
        await self.start_run(cid)
        while (
            sum(1 for m in list(self.apns.received) if m.at >= t0) < self.customers // 3
            and time.monotonic() - t0 < 300
        ):
            await asyncio.sleep(0.05)
        self.stack.stop("dispatch", kill=True)
        killed_at = time.monotonic()
        self.stack.start("dispatch")
        self.stack.wait_ready(["dispatch"])
        ready = time.monotonic() - killed_at
        url = self.stack.env["KAIROS_DATABASE_URL"].replace("+asyncpg", "")
        conn = await asyncpg.connect(url)
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:  # every message settled, re-sends included
                final = int(
                    await conn.fetchval(
                        "SELECT count(*) FROM dispatch.message WHERE campaign_id = $1"
                        " AND status IN ('sent', 'delivered', 'failed', 'expired')",
                        cid,
                    )
                )
                if final >= self.customers:
                    break
                await asyncio.sleep(0.2)
            settled = time.monotonic() - killed_at
            await asyncio.sleep(1.0)  # the last answers reach the peer's record
            doubt = int(
                await conn.fetchval(
                    "SELECT count(*) FROM dispatch.message WHERE campaign_id = $1 AND in_doubt",
                    cid,
                )
            )
        finally:
            await conn.close()
        counts = collections.Counter(
            m.token for m in list(self.apns.received) if m.at >= t0 and m.status == 200
        )
        return {
            "members": self.customers,
            "reached": len(counts),
            "lost": self.customers - len(counts),
            "pushed_twice": sum(1 for v in counts.values() if v > 1),
            "in_doubt": doubt,
            "settled_rows": final,
            "restart_ready_s": round(ready, 2),
            "kill_to_all_settled_s": round(settled, 1),
        }


async def measure(b: Bench, run: int) -> dict[str, Any]:
    return {
        "event_to_push_100": await b.triggers(100, run + 200),
        "event_to_push_500": await b.triggers(500, run),
        "batch_alone": await b.batch_alone(run),
        "event_to_push_500_during_batch": await b.triggers_during_batch(run),
        "kill_at_full_speed": await b.kill(run),
    }


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in runs[-1].items():
        if isinstance(v, dict):
            out[k] = _median([r[k] for r in runs])
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            xs = [float(r[k]) for r in runs if r.get(k) is not None]
            out[k] = round(statistics.median(xs), 1) if xs else None
        else:
            out[k] = v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.delivery")
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=10.0)
    args = ap.parse_args()
    key = "bench-" + uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="kairos-delivery-") as tmp:
        peer = PeerProcess(Path(tmp) / "apns")
        stack = start_stack(Path(tmp) / "run", key, extra_env=dict(peer.env))
        try:
            b = Bench(stack, key, peer, args.customers, args.duration)
            report: dict[str, Any] = {
                "machine": {
                    "cpus": os.cpu_count(),
                    "servers": "external" if os.environ.get("KAIROS_DATABASE_URL") else "embedded",
                },
                "setup": asyncio.run(b.setup()),
            }
            runs = []
            for i in range(args.runs):
                print(f"== delivery run {i + 1}/{args.runs}", flush=True)
                runs.append(asyncio.run(measure(b, i)))
                print(json.dumps(runs[-1], indent=1), flush=True)
            report["delivery"] = {"median": _median(runs), "runs": runs}
        finally:
            stack.down()
            peer.stop()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"delivery-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["delivery"]["median"], indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
