"""The batch-run figure of issue 13 alone: ``python -m bench.batch_run --customers N --runs R``.

``python -m bench outbound`` measures it too, after event rates, sustained load and timers;
this runs only bench/outbound.py's setup (the import of ``--customers``) and its batch run
(start → every dispatch request published, every publish acknowledged), so the figure can be
taken at a size that fits a working session and extrapolated: members/s at N customers
says how long 1,000,000 take, if the rate holds (it is page-bound, not population-bound).
Also the CPU per member of each process, and with ``BENCH_PYSPY=1`` a py-spy profile of
the decision process over the first 30 s of the first run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import outbound
from bench.__main__ import RESULTS, median_of, start_stack
from bench.decision import CpuMeter, _pids, _pyspy
from bench.scenarios import Context
from shared.embedded import free_port


async def _one(ctx: Context, run: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "outbound" not in ctx.prepared:
        out["setup"] = await outbound._setup(ctx)
        ctx.prepared.add("outbound")
    out["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
    meter = CpuMeter(_pids(ctx))
    spy = _pyspy(ctx.stack.procs["decision"].pid, "decision-batch", 30) if run == 0 else None
    meter.start()
    out["batch_run"] = await outbound._batch(ctx, run)
    # CPU per member, by process (raw: other work on the machine is not taken out)
    out["cpu_us_per_member"] = meter.per_request(out["batch_run"]["selected"])
    if spy is not None:
        spy.wait(60)
    rate = out["batch_run"]["members_per_s"]
    out["extrapolated_1m_members_s"] = round(1_000_000 / rate, 1) if rate else None
    out["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.batch_run")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--label", default="", help="added to the results file name")
    args = ap.parse_args()
    key = "bench-" + uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="kairos-bench-") as tmp:
        stack = start_stack(Path(tmp), key)
        floor_port = free_port()  # unused here, but Context carries one
        ctx = Context(
            stack=stack,
            key=key,
            floor_port=floor_port,
            tmp=Path(tmp),
            duration=4.0,
            customers=args.customers,
            tags_max=200,
        )
        runs: list[dict[str, Any]] = []
        try:
            for i in range(args.runs):
                print(f"== batch run {i + 1}/{args.runs}", flush=True)
                runs.append(asyncio.run(_one(ctx, i)))
                print(json.dumps(runs[-1], indent=1), flush=True)
        finally:
            stack.down()
    report = {"customers": args.customers, "median": median_of(runs), "runs": runs}
    name = "batch-run" + (f"-{args.label}" if args.label else "")
    path = RESULTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
