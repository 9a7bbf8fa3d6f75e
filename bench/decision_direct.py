"""CPU per decision of the decision process alone, and the Redis commands each costs:
``python -m bench.decision_direct --rounds 4 --duration 6`` (5,000 customers, the decision
scenario's catalog and policy, a closed loop of 16 straight at the process's port).

Without the gateway hop and the floor, this isolates the decision process: its user +
system CPU per decision (idle burn taken out, as in bench/decision.py) and, from Redis's
``INFO commandstats``, the commands per decision by name (what the round trips are).
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

from redis.asyncio import Redis

from bench import decision as bd
from bench import outbound
from bench.__main__ import RESULTS, start_stack
from bench.loadgen import closed_loop
from bench.scenarios import Context
from shared.embedded import free_port


async def _commands(redis: Redis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


async def _measure(ctx: Context, rounds: int, duration: float) -> list[dict[str, Any]]:
    await outbound._setup(ctx)
    await bd._setup(ctx)
    await asyncio.sleep(2)
    pids = {k: v for k, v in bd._pids(ctx).items() if k in ("decision", "redis", "nats")}
    port = ctx.stack.ports["decision"]
    make = bd._decisions(ctx)
    redis = Redis.from_url(ctx.stack.env["KAIROS_REDIS_URL"])
    out = []
    try:
        for _ in range(rounds):
            meter = bd.CpuMeter(pids)
            await meter.idle(2)
            before = await _commands(redis)
            meter.start()
            res = await closed_loop(
                "127.0.0.1", port, ctx.headers, make, concurrency=16, duration=duration
            )
            n = len(res.latencies)
            cpu = meter.per_request(n)
            after = await _commands(redis)
            per = {k: round((after[k] - before.get(k, 0)) / max(1, n), 2) for k in after}
            out.append(
                {
                    "load_average": [round(x, 2) for x in os.getloadavg()],
                    "decisions_per_s": round(res.rate, 1),
                    "cpu_us_per_decision": {k: cpu[k] for k in pids if k in cpu},
                    "redis_commands_per_decision": {k: v for k, v in per.items() if v >= 0.01},
                }
            )
            print(json.dumps(out[-1]), flush=True)
    finally:
        await redis.aclose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.decision_direct")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    key = "bench-" + uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="kairos-bench-") as tmp:
        stack = start_stack(Path(tmp), key)
        ctx = Context(
            stack=stack,
            key=key,
            floor_port=free_port(),
            tmp=Path(tmp),
            duration=args.duration,
            customers=5000,
            tags_max=200,
        )
        try:
            rounds = asyncio.run(_measure(ctx, args.rounds, args.duration))
        finally:
            stack.down()
    name = "decision-direct" + (f"-{args.label}" if args.label else "")
    path = RESULTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps({"rounds": rounds}, indent=2) + "\n")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
