"""Where the time from an event to its ``dispatch.requested`` goes, at 500 events/s:
``python -m bench.event_path [customers]`` (bench/outbound.py's triggered campaigns).

Per listened event: sent → the gateway's 202, sent → the profile's ``applied`` marker in
Redis (polled every 2 ms), marker → ``dispatch.requested`` seen on the bus, sent →
``dispatch.requested``. Triggers evaluate a known customer's event on "projection + this
event" and do not wait for the marker, so marker → dispatch is negative when the dispatch
request went out before the profile had applied the event. Prints three rounds (load
average included) and writes them to ``bench/results/event_path-<label>-<time>.json``
(``KAIROS_BENCH_LABEL`` names a before/after pair).

Each round also reports, per process of the stack (servers included, Postgres with its
backends), the CPU it used and the time its threads spent *runnable but waiting for a CPU*
(the kernel's run-queue wait, ``/proc/<pid>/task/*/schedstat``), both in ms per second of
the round: where a latency comes from a process that had work but no core."""

import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
import psutil
from redis.asyncio import Redis

from bench import outbound
from bench.__main__ import RESULTS, start_stack
from bench.decision import _pids
from bench.loadgen import Conn
from bench.outbound import LISTENED, TYPES, Seen, _pcts
from bench.scenarios import Context
from shared.embedded import free_port


def _sched(pid):
    """(CPU ns, run-queue wait ns) of a process's threads and of its children's (Postgres'
    backends); zeros for a process that is gone."""
    cpu = wait = 0
    pids = [pid]
    with contextlib.suppress(OSError):  # gone, or no children file
        pids += [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        try:
            tasks = list(Path(f"/proc/{p}/task").iterdir())
        except OSError:
            continue
        for t in tasks:
            try:
                run, queued, _ = (Path(t) / "schedstat").read_text().split()
            except (OSError, ValueError):
                continue
            cpu += int(run)
            wait += int(queued)
    return cpu, wait


class SchedMeter:
    """CPU and run-queue wait per process of the stack over one round, ms per second."""

    def __init__(self, ctx):
        self.pids = {k: v for k, v in _pids(ctx).items() if k != "loadgen"}
        if "postgres" not in self.pids:  # every postmaster (the stack's among them)
            for proc in psutil.process_iter(["name", "ppid"]):
                if proc.info["name"] == "postgres":
                    with contextlib.suppress(psutil.Error):
                        if psutil.Process(proc.info["ppid"]).name() != "postgres":
                            self.pids[f"postgres-{proc.pid}"] = proc.pid

    def start(self):
        self.t0, self.a = time.perf_counter(), {k: _sched(p) for k, p in self.pids.items()}

    def stop(self):
        secs = time.perf_counter() - self.t0
        out = {}
        for k, p in self.pids.items():
            cpu, wait = _sched(p)
            out[k] = {
                "cpu_ms_per_s": round((cpu - self.a[k][0]) / 1e6 / secs, 1),
                "runq_wait_ms_per_s": round((wait - self.a[k][1]) / 1e6 / secs, 1),
            }
        return out


async def _idle(ctx, secs):
    """What the stack's processes use with no traffic (pollers, timers), ms per second."""
    meter = SchedMeter(ctx)
    meter.start()
    await asyncio.sleep(secs)
    return meter.stop()


async def measure(ctx, rate, secs):
    prefix = ctx.stack.env["KAIROS_REDIS_PREFIX"]
    r = Redis.from_url(ctx.stack.env["KAIROS_REDIS_URL"])
    sent, acked, marked = {}, {}, {}
    pending = set()
    rng = random.Random(1)
    stop = False

    async def poll():
        while not stop or pending:
            ids = list(pending)
            if ids:
                vals = await r.mget([f"{prefix}:applied:{i}" for i in ids])
                now = time.perf_counter()
                for i, v in zip(ids, vals, strict=True):
                    if v is not None:
                        marked[i] = now
                        pending.discard(i)
            await asyncio.sleep(0.002)

    conns = [Conn("127.0.0.1", ctx.gw_port, ctx.headers) for _ in range(32)]
    for c in conns:
        await c.open()
    free = asyncio.Queue()
    for c in conns:
        free.put_nowait(c)

    async def one(i):
        eid = str(uuid.uuid4())
        k = rng.randrange(TYPES)
        etype = f"ob.t{k}" if k < LISTENED else f"ob.noise{k}"
        ev = {
            "id": eid,
            "type": etype,
            "customer_id": f"c-{rng.randrange(ctx.customers):07d}",
            "properties": {"n": i},
        }
        c = await free.get()
        t = time.perf_counter()
        if k < LISTENED:
            sent[eid] = t
            pending.add(eid)
        await c.send("POST", "/v1/events", orjson.dumps(ev))
        if k < LISTENED:
            acked[eid] = time.perf_counter()
        free.put_nowait(c)

    meter = SchedMeter(ctx)
    async with Seen(ctx) as seen:
        p = asyncio.create_task(poll())
        meter.start()
        t0 = time.perf_counter()
        tasks = []
        n = int(rate * secs)
        for i in range(n):
            due = t0 + i / rate
            d = due - time.perf_counter()
            if d > 0:
                await asyncio.sleep(d)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        sched = meter.stop()
        await asyncio.sleep(3)
        stop = True
        pending.clear()
        await p
    for c in conns:
        await c.close()
    await r.aclose()
    ids = [e for e in sent if e in seen.by_event]
    return {
        "load": os.getloadavg(),
        "listened": len(sent),
        "dispatched": len(ids),
        "sent_to_202": _pcts([acked[e] - sent[e] for e in ids if e in acked]),
        "sent_to_marker": _pcts([marked[e] - sent[e] for e in ids if e in marked]),
        "marker_to_dispatch": _pcts([seen.by_event[e] - marked[e] for e in ids if e in marked]),
        "sent_to_dispatch": _pcts([seen.by_event[e] - sent[e] for e in ids]),
        "sched": sched,
    }


def main() -> None:
    customers = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    # Events/s of each round (default three at 500): ``python -m bench.event_path 5000 100,300``
    rates = [int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else [500, 500, 500]
    key = "bench-" + uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="kairos-ev-") as tmp:
        st = start_stack(Path(tmp), key)
        ctx = Context(
            stack=st,
            key=key,
            floor_port=free_port(),
            tmp=Path(tmp),
            duration=4,
            customers=customers,
            tags_max=200,
        )
        rounds = []
        try:
            asyncio.run(outbound._setup(ctx))
            idle = asyncio.run(_idle(ctx, 4))
            print(json.dumps({"idle": idle}, indent=1), flush=True)
            for rate in rates:
                rounds.append({"rate": rate, **asyncio.run(measure(ctx, rate, 4))})
                print(json.dumps(rounds[-1], indent=1), flush=True)
        finally:
            st.down()
    label = os.environ.get("KAIROS_BENCH_LABEL", "run")
    out = RESULTS / f"event_path-{label}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    legs = ("sent_to_202", "sent_to_marker", "sent_to_dispatch")

    def med(rate: int, leg: str, k: str) -> float | None:
        xs = [r[leg][k] for r in rounds if r["rate"] == rate and r[leg].get(k) is not None]
        return statistics.median(xs) if xs else None

    def busy(rate: int) -> dict[str, dict[str, float]]:
        """Median CPU and run-queue wait per process at this rate."""
        at = [r["sched"] for r in rounds if r["rate"] == rate]
        return {p: {k: statistics.median(s[p][k] for s in at) for k in at[0][p]} for p in at[0]}

    median = {
        str(rate): {
            **{leg: {k: med(rate, leg, k) for k in ("p50_ms", "p99_ms")} for leg in legs},
            "sched": busy(rate),
        }
        for rate in sorted(set(rates))
    }
    out.write_text(
        json.dumps(
            {"customers": customers, "median": median, "idle": idle, "rounds": rounds}, indent=1
        )
    )
    print(json.dumps({"median": median}, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
