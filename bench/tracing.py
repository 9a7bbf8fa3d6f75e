"""What tracing costs one gateway-like hop: a service app built like every Kairos process
(``shared.telemetry``: FastAPI's native server span, metrics middleware) whose route calls the
bare floor through the gateway's pool with a client span and ``traceparent``, as the gateway
does for a decision. Its own CPU per request is measured with tracing off, and with OTLP
export to a local sink at sampling ratios 1.0 and 0.1 (``parentbased_traceidratio``).

``python -m bench.tracing [--requests N]``: medians of 3 per setting, in one run, with the
load average; writes bench/results/tracing-*.json. Run with the project's own module:
``python -m bench.tracing serve PORT FLOOR_PORT`` is the hop itself.
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
from pathlib import Path
from typing import Any

import psutil

from bench.loadgen import closed_loop
from shared.embedded import free_port, wait_port


def serve(port: int, floor_port: int) -> None:
    import uvicorn
    from fastapi import FastAPI
    from starlette.responses import Response

    from gateway.client import Pool
    from shared.errors import JSONResponse
    from shared.telemetry import MetricsMiddleware, configure_tracing, fastapi_telemetry_kwargs
    from shared.tracing import client_span, record_status

    app = FastAPI(default_response_class=JSONResponse, **fastapi_telemetry_kwargs())
    app.add_middleware(MetricsMiddleware, service="hop")
    configure_tracing("hop", app)
    pools: dict[str, Pool] = {}

    @app.get("/hop/{item}")
    async def hop(item: str) -> Response:
        pool = pools.get("floor") or pools.setdefault("floor", Pool("127.0.0.1", floor_port))
        headers = {"x-kairos-principal": "bench"}
        with client_span("floor", "GET", "/floor", headers) as span:
            ans = await pool.request("GET", f"/floor/{item}", headers, None, total=5, connect=1)
            record_status(span, ans.status)
        return Response(ans.body, media_type="application/json")

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


def _hop(i: int) -> tuple[str, str, bytes]:
    return "GET", f"/hop/c-{i:07d}", b""


async def _measure(port: int, pid: int, requests: int) -> dict[str, float]:
    proc = psutil.Process(pid)
    await closed_loop("127.0.0.1", port, {}, _hop, concurrency=16, duration=1.0)  # warm up
    t = proc.cpu_times()
    cpu0 = t.user + t.system
    res = await closed_loop("127.0.0.1", port, {}, _hop, concurrency=16, duration=requests / 400)
    t = proc.cpu_times()
    n = len(res.latencies)
    return {
        "cpu_us_per_request": round((t.user + t.system - cpu0) / max(1, n) * 1e6, 1),
        "requests": n,
        "rate_per_s": round(res.rate, 1),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]), int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(prog="python -m bench.tracing")
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    floor_port, sink_port = free_port(), free_port()
    children = [
        subprocess.Popen([sys.executable, "-m", "bench.floor", str(floor_port)]),
        subprocess.Popen([sys.executable, "-m", "bench.otlp_sink", str(sink_port)]),
    ]
    settings: dict[str, dict[str, str]] = {
        "off": {},
        "sampled_1.0": {"OTEL_TRACES_SAMPLER_ARG": "1.0"},
        "sampled_0.1": {"OTEL_TRACES_SAMPLER_ARG": "0.1"},
    }
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in settings}
    load = os.getloadavg()
    try:
        wait_port(floor_port, children[0], "floor", timeout=180)
        wait_port(sink_port, children[1], "OTLP sink", timeout=180)
        for _ in range(args.runs):
            for name, extra in settings.items():
                env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
                if extra:
                    env.update(
                        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{sink_port}",
                        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
                        **extra,
                    )
                port = free_port()
                hop = subprocess.Popen(
                    [sys.executable, "-m", "bench.tracing", "serve", str(port), str(floor_port)],
                    env=env,
                )
                try:
                    wait_port(port, hop, "hop", timeout=180)
                    runs[name].append(asyncio.run(_measure(port, hop.pid, args.requests)))
                finally:
                    hop.terminate()
                    hop.wait(20)
    finally:
        for c in children:
            c.terminate()
            c.wait(20)
    report: dict[str, Any] = {
        "load_average_start": [round(x, 2) for x in load],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "median_cpu_us_per_request": {
            k: statistics.median(r["cpu_us_per_request"] for r in v) for k, v in runs.items()
        },
        "runs": runs,
    }
    out = Path(__file__).parent / "results" / f"tracing-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
