"""Where the CPU goes while events arrive at a fixed rate, and how fast the profile applies
them: ``python -m bench.ingest_cpu [events/s] [seconds] [runs]`` (5000, 12, 3).

Per run, on a fresh stack (embedded servers unless ``KAIROS_*_URL`` are set): imports the
customers first (as the ingest bench's lag phase does), sends requests of 50 events for
``seconds`` at the rate (open loop), and reports the cores each process used meanwhile
(Postgres with its backends, NATS and Redis included: ``bench.profile_import.stack_cpu``)
and the rate at which the profile applied them: events over the time from the first request
until its events consumer had none pending. Medians of the runs are printed and written to
``bench/results/ingest_cpu-<label>-<time>.json`` (``KAIROS_BENCH_LABEL`` names an A/B pair;
``BENCH_ENV`` passes settings to the stack). ``BENCH_PYSPY=1`` records py-spy profiles
(collapsed stacks) of the profile, selection, decision, feedback and gateway processes over
the first run's load into ``bench/results/pyspy-ingest-<process>-<time>.txt``."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from bench.__main__ import RESULTS, start_stack
from bench.decision import _pyspy
from bench.loadgen import open_loop
from bench.profile_import import stack_cpu
from bench.scenarios import Context, _drain, _event, _pending, import_known
from shared.bus import Bus
from shared.stack import Stack

PER_REQUEST = 50


SPIED = ("profile", "selection", "decision", "feedback", "gateway")


async def _settled_filter(stack: Stack, within_s: float = 90.0) -> list[str]:
    """The trigger consumer's filter once it no longer takes every event (or as it is after
    ``within_s``)."""
    bus = Bus(stack.env["KAIROS_NATS_URL"], prefix=stack.env["KAIROS_BUS_PREFIX"], source="bench")
    await bus.connect(ensure_streams=False)
    try:
        deadline = time.monotonic() + within_s
        while True:
            info = await bus.js.consumer_info(
                bus.stream("EVENTS"), bus.durable("decision-triggers")
            )
            wire = info.config.filter_subjects or [info.config.filter_subject or ">"]
            subjects = [bus.logical(w) for w in wire]
            if subjects != ["events.>"] or time.monotonic() > deadline:
                return subjects
            await asyncio.sleep(0.5)
    finally:
        await bus.close()


async def once(
    stack: Stack, key: str, tmp: Path, rate: int, seconds: float, spy: bool = False
) -> dict[str, Any]:
    ctx = Context(
        stack=stack, key=key, floor_port=0, tmp=tmp, duration=seconds, customers=0, tags_max=0
    )
    n_req = int(rate / PER_REQUEST * seconds)
    tag = uuid.uuid4().hex[:6]
    await import_known(ctx, f"cpu-{tag}", n_req, PER_REQUEST)
    # A steady state: decision's trigger consumer narrowed to its campaigns' event types
    # (``shared.event_filter``: some 30 s after a start), as in a process that has run a while.
    trigger_filter = await _settled_filter(stack)

    def make(i: int) -> tuple[str, str, bytes]:
        evs = [_event(f"cpu-{tag}-{i}-{j}") for j in range(PER_REQUEST)]
        return "POST", "/v1/events", orjson.dumps({"events": evs})

    spies = [_pyspy(stack.procs[n].pid, f"ingest-{n}", seconds) for n in SPIED] if spy else []
    cpu0, t0 = stack_cpu(stack), time.perf_counter()
    res = await open_loop(
        "127.0.0.1",
        ctx.gw_port,
        ctx.headers,
        make,
        rate=rate / PER_REQUEST,
        duration=seconds,
        connections=32,
    )
    cpu1, loaded_s = stack_cpu(stack), time.perf_counter() - t0
    pending_at_end = await _pending(ctx)
    while await _pending(ctx) > 0:
        await asyncio.sleep(0.05)
    applied_s = time.perf_counter() - t0
    await _drain(ctx)
    for p in spies:
        if p is not None:
            p.wait()
    cores = {n: round((cpu1[n] - cpu0[n]) / loaded_s, 3) for n in cpu1 if n in cpu0}
    return {
        "offered_events_per_s": rate,
        "sent_events_per_s": round(res.rate * PER_REQUEST, 1),
        "http_p99_ms": round(res.pct(99) * 1000, 2),
        "cores_during_load": cores,
        "cores_total": round(sum(cores.values()), 3),
        "pending_when_load_ended": pending_at_end,
        "applied_events_per_s": round(n_req * PER_REQUEST / applied_s, 1),
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "trigger_filter": trigger_filter,
    }


def main() -> None:
    rate = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 12.0
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    label = os.environ.get("KAIROS_BENCH_LABEL", "run")
    out: list[dict[str, Any]] = []
    for i in range(runs):
        key = "bench-" + uuid.uuid4().hex
        with tempfile.TemporaryDirectory(prefix="kairos-ingest-cpu-") as tmp:
            stack = start_stack(Path(tmp) / "run", key)
            try:
                out.append(asyncio.run(once(stack, key, Path(tmp), rate, seconds, spy=i == 0)))
            finally:
                stack.down()
        print(f"== run {i + 1}/{runs}", json.dumps(out[-1]), flush=True)
    names = sorted({n for r in out for n in r["cores_during_load"]})
    median = {
        "applied_events_per_s": statistics.median(r["applied_events_per_s"] for r in out),
        "cores_total": statistics.median(r["cores_total"] for r in out),
        "cores_during_load": {
            n: round(statistics.median(r["cores_during_load"].get(n, 0.0) for r in out), 3)
            for n in names
        },
    }
    print(json.dumps(median, indent=1))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"ingest_cpu-{label}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps({"median": median, "runs": out}, indent=1) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
