"""``python -m bench import``: customers/s of ``POST /v1/customers:import`` through the gateway
against the same run's floor, a raw ``COPY`` of the same rows into a plain table.

Each run imports ``--customers`` new generated customers (a telecom population, 5–15 tags
each, e-mail and MSISDN) as plain NDJSON, then waits until every announcement (``profile.imported``) of the
import left the outbox (``announced_s``). The floor parses the same lines (untimed) and
times only ``COPY`` of the rows into an unindexed table, batch by batch, on one connection:
the least any import of these rows into Postgres can cost here. Medians of ``--runs``; the
machine's load average is recorded with each run, since the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson

from services.profile.imports.parser import parse_batch
from services.profile.imports.repository import STAGE_COLUMNS
from shared import demo
from shared.stack import Stack

RESULTS = Path(__file__).parent / "results"
# The run's ids replace these on the way out: every run imports new customers, e-mails and
# MSISDNs (an identity of an earlier run would be refused as another customer's).
MARK = b"RUNXXX"
PHONE_MARK = b"+4777777"
SPIED = ("profile", "selection", "gateway")  # the Python processes an import works in


def generate(path: Path, n: int) -> int:
    rng = random.Random(11)
    with path.open("wb") as fh:
        for i in range(n):
            doc = demo.customer(i, rng, tags_min=5, tags_max=15, vocab=2000)
            cid = f"{MARK.decode()}-{i:07d}"
            doc["customer_id"] = cid
            doc["identities"] = {
                "email": f"{cid}@example.com",
                "msisdn": f"{PHONE_MARK.decode()}{i:08d}",
            }
            fh.write(orjson.dumps(doc) + b"\n")
    return path.stat().st_size


def _marked(block: bytes, run_id: bytes) -> bytes:
    phone = b"+4" + run_id[1:2] + f"{int(run_id[2:], 16):05d}".encode()  # 6 digits, as the mark
    return block.replace(MARK, run_id).replace(PHONE_MARK, phone)


async def _outbox(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM profile.outbox"))
    finally:
        await conn.close()


IMPORT_PROCESSES = ("gateway", "profile", "selection")


def stack_cpu(stack: Stack, names: Sequence[str] | None = None) -> dict[str, float]:
    """CPU seconds so far of the stack's processes (``names``, or all of them) and of the
    embedded Postgres (postmaster and its backends), Redis and NATS. An import runs through
    the gateway, the profile and selection (its audience index applies every batch)."""
    import psutil

    out: dict[str, float] = {}
    roots = {n: p.pid for n, p in stack.procs.items() if names is None or n in names}
    if stack.embedded is not None:
        roots.update({n: p.pid for n, p in stack.embedded.procs.items()})
    for name, pid in roots.items():
        try:
            proc = psutil.Process(pid)
            total = 0.0
            for q in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = q.cpu_times()
                    total += t.user + t.system
            out[name] = total
        except psutil.Error:
            continue
    return out


async def import_once(stack: Stack, key: str, path: Path, run_id: bytes) -> dict[str, Any]:
    url = stack.env["KAIROS_DATABASE_URL"].replace("+asyncpg", "")
    load0 = os.getloadavg()[0]
    cpu0 = stack_cpu(stack, IMPORT_PROCESSES)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=None) as c:

        async def chunks() -> Any:
            # Whole lines only: a mark cut by a block boundary would stay unreplaced (and
            # the next run's line would then claim this run's MSISDN).
            rest = b""
            with path.open("rb") as fh:
                while block := fh.read(1 << 20):
                    block, _, tail = (rest + block).rpartition(b"\n")
                    if block:
                        yield _marked(block + b"\n", run_id)
                        rest = tail
                    else:
                        rest = tail
                if rest:
                    yield _marked(rest, run_id)

        r = await c.post(
            f"{stack.url('gateway')}/v1/customers:import",
            content=chunks(),
            headers={"authorization": f"Bearer {key}", "content-type": "application/x-ndjson"},
        )
    elapsed = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    doc = r.json()
    while await _outbox(url) > 0:
        await asyncio.sleep(0.2)
    announced = time.perf_counter() - t0
    cpu1 = stack_cpu(stack, IMPORT_PROCESSES)
    n = max(1, int(doc["imported"]))
    return {
        "customers": doc["imported"],
        "failed": doc["failed"],
        "seconds": round(elapsed, 2),
        "customers_per_s": round(doc["imported"] / elapsed, 1),
        "announced_s": round(announced, 2),
        "load_avg_1m_before": round(load0, 2),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        # CPU microseconds per imported customer, by process (until every announcement left).
        "cpu_us_per_customer": {
            k: round((cpu1[k] - cpu0.get(k, 0.0)) * 1e6 / n, 1) for k in sorted(cpu1)
        },
    }


async def floor_once(stack: Stack, path: Path, run_id: bytes, batch: int = 5000) -> dict[str, Any]:
    """COPY the same rows (parsed outside the timing) into a plain table."""
    url = stack.env["KAIROS_DATABASE_URL"].replace("+asyncpg", "")
    conn = await asyncpg.connect(url)
    table = "floor_" + run_id.decode().replace("-", "_")
    try:
        await conn.execute(
            f"CREATE TABLE public.{table} (line int, customer_id text, attributes jsonb,"
            " tags text[], consents jsonb, timezone text, locale text, identities jsonb)"
        )
        copying, rows = 0.0, 0
        lines: list[tuple[int, bytes | None]] = []

        async def flush() -> None:
            nonlocal copying, rows
            parsed = parse_batch(lines)
            t = time.perf_counter()
            await conn.copy_records_to_table(table, records=parsed.rows, columns=STAGE_COLUMNS)
            copying += time.perf_counter() - t
            rows += len(parsed.rows)
            lines.clear()

        with path.open("rb") as fh:
            for i, line in enumerate(fh, 1):
                lines.append((i, _marked(line, run_id).rstrip(b"\n")))
                if len(lines) >= batch:
                    await flush()
        if lines:
            await flush()
        await conn.execute(f"DROP TABLE public.{table}")
    finally:
        await conn.close()
    return {"floor_rows": rows, "floor_copy_per_s": round(rows / copying, 1)}


def main(argv: list[str] | None = None) -> None:
    from bench.__main__ import median_of, start_stack

    ap = argparse.ArgumentParser(prog="python -m bench import")
    ap.add_argument("--customers", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--py-spy",
        metavar="FILE",
        help="record the profile, selection and gateway processes with py-spy during the first"
        " run (collapsed stacks, to FILE.<process>)",
    )
    args = ap.parse_args(argv)
    key = "bench-" + uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="kairos-import-") as tmp:
        path = Path(tmp) / "customers.ndjson"
        size = generate(path, args.customers)
        stack = start_stack(Path(tmp) / "run", key)
        runs = []
        try:
            for i in range(args.runs):
                run_id = f"r{i}{uuid.uuid4().hex[:4]}".encode()
                assert len(run_id) == len(MARK)
                print(f"== import run {i + 1}/{args.runs}", flush=True)
                spies = []
                if args.py_spy and i == 0:
                    spies = [
                        subprocess.Popen(
                            [
                                str(Path(sys.executable).parent / "py-spy"),
                                "record",
                                "-p",
                                str(stack.procs[name].pid),
                                "-r",
                                "50",
                                "-f",
                                "raw",
                                "-o",
                                f"{args.py_spy}.{name}",
                                "--nonblocking",
                            ],
                            stdout=subprocess.DEVNULL,
                        )
                        for name in SPIED
                    ]
                run = asyncio.run(import_once(stack, key, path, run_id))
                for spy in spies:
                    spy.send_signal(signal.SIGINT)
                    spy.wait(60)
                run.update(asyncio.run(floor_once(stack, path, run_id)))
                run["vs_floor"] = round(run["customers_per_s"] / run["floor_copy_per_s"], 3)
                print(json.dumps(run, indent=1), flush=True)
                runs.append(run)
        finally:
            stack.down()
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "servers": "external" if os.environ.get("KAIROS_DATABASE_URL") else "embedded",
        },
        "customers": args.customers,
        "file_mb": round(size / 1e6, 1),
        "import": {"median": median_of(runs), "runs": runs},
        "median_customers_per_s": statistics.median(r["customers_per_s"] for r in runs),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"import-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["import"]["median"], indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
