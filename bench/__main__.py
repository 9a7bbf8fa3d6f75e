"""``make bench``: measure the suite on this machine and write figures to bench/results/.

Scenarios: ``ingest`` (issue: foundation), ``profile`` (issue: profile), ``rules`` and
``selection`` (issue: rules and selection), ``decision`` (issue: decision), ``outbound``
(issue: triggered and batch campaigns). Each starts the
whole suite as real processes (embedded servers unless KAIROS_*_URL are set), plus a bare
FastAPI app as the floor, and repeats each measurement ``--runs`` times, reporting medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench import scenarios
from shared.embedded import free_port, wait_port
from shared.stack import PROCESSES, Stack

RESULTS = Path(__file__).parent / "results"


def start_stack(run_dir: Path, key: str, extra_env: dict[str, str] | None = None) -> Stack:
    rid = uuid.uuid4().hex[:6]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAIROS_") or k.endswith("_URL")}
    env.update(
        KAIROS_ENV="test",
        KAIROS_BUS_PREFIX=f"b{rid}",
        KAIROS_REDIS_PREFIX=f"b{rid}",
        KAIROS_API_KEYS=json.dumps([{"name": "bench", "key": key, "scopes": ["admin"]}]),
        KAIROS_LOG_LEVEL="WARNING",
        KAIROS_IMPORT_MAX_BYTES=str(16 << 30),  # a 1M-customer file is ~1.7 GB
    )
    env.update(extra_env or {})
    # Settings for an A/B run: BENCH_ENV="KAIROS_CONSUMER_BULK_GATHER_MS=5 ..."
    env.update(x.split("=", 1) for x in os.environ.get("BENCH_ENV", "").split() if "=" in x)
    if env.get("KAIROS_DATABASE_URL"):
        from sqlalchemy.engine import make_url

        env["KAIROS_DATABASE_URL"] = (
            make_url(env["KAIROS_DATABASE_URL"])
            .set(database=f"kairos_bench_{rid}")
            .render_as_string(hide_password=False)
        )
    for name in PROCESSES:
        env[f"KAIROS_{name.upper()}_PORT"] = str(free_port())
    env["KAIROS_PUBLIC_URL"] = f"http://127.0.0.1:{env['KAIROS_GATEWAY_PORT']}"
    st = Stack.prepare(
        run_dir,
        base_env=env,
        embedded_ports={
            "pg_port": free_port(),
            "redis_port": free_port(),
            "nats_port": free_port(),
        },
    )
    st.start_all()
    st.wait_ready()
    return st


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric figure over the runs (other values from the last run)."""
    out: dict[str, Any] = {}
    for k, v in runs[-1].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs = [float(r[k]) for r in runs if r.get(k) is not None]
            out[k] = round(statistics.median(xs), 2) if xs else None
        elif isinstance(v, dict) and all(isinstance(x, dict) for x in (r.get(k) for r in runs)):
            out[k] = median_of([r[k] for r in runs])
        else:
            out[k] = v
    return out


def main() -> None:
    if sys.argv[1:2] == ["import"]:  # its own options: python -m bench import --customers N
        from bench import profile_import

        profile_import.main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument(
        "scenario",
        nargs="*",
        default=["all"],
        choices=[
            "all",
            "ingest",
            "profile",
            "rules",
            "selection",
            "decision",
            "outbound",
            "erasure",
        ],
        help="one or more scenarios; they share one stack (and one imported population)",
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--customers", type=int, default=100_000, help="profile: population size")
    ap.add_argument("--tags-max", type=int, default=200, help="profile: most tags per customer")
    ap.add_argument(
        "--trace",
        type=float,
        default=None,
        metavar="RATIO",
        help="tracing on, OTLP/HTTP to a local sink, this share of traces sampled (0..1)",
    )
    args = ap.parse_args()
    if args.scenario == ["rules"]:
        from bench import rules_eval

        runs = [rules_eval.measure() for _ in range(args.runs)]
        report = {"rules": {"median": median_of(runs), "runs": runs}}
        _write("rules", report, args.runs)
        return
    key = "bench-" + uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="kairos-bench-") as tmp:
        trace_env, sink = _trace_sink(args.trace)
        stack = start_stack(Path(tmp), key, trace_env)
        floor_port = free_port()
        floor = subprocess.Popen([sys.executable, "-m", "bench.floor", str(floor_port)])
        try:  # a loaded machine can take long to start a process; never leave the stack up
            wait_port(floor_port, floor, "floor app", timeout=180)
        except BaseException:
            floor.kill()
            stack.down()
            if sink is not None:
                sink.terminate()
            raise
        ctx = scenarios.Context(
            stack=stack,
            key=key,
            floor_port=floor_port,
            tmp=Path(tmp),
            duration=args.duration,
            customers=args.customers,
            tags_max=args.tags_max,
        )
        report: dict[str, Any] = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "servers": "external" if os.environ.get("KAIROS_DATABASE_URL") else "embedded",
            },
            "runs": args.runs,
            "duration_s": args.duration,
            "tracing_sampled": args.trace,
        }
        try:
            todo = (
                ["ingest", "profile", "selection", "decision", "outbound"]
                if args.scenario == ["all"]
                else [s for s in args.scenario if s != "rules"]
            )
            for name in todo:
                if name == "ingest":
                    from bench.ingest import ingest as fn
                elif name == "selection":
                    from bench.selection import selection as fn
                elif name == "decision":
                    from bench.decision import decision as fn
                elif name == "outbound":
                    from bench.outbound import outbound as fn
                elif name == "erasure":
                    from bench.erasure import erasure as fn
                else:
                    fn = getattr(scenarios, name)
                runs = []
                for i in range(args.runs):
                    print(f"== {name} run {i + 1}/{args.runs}", flush=True)
                    runs.append(asyncio.run(fn(ctx, i)))
                    print(json.dumps(runs[-1], indent=1), flush=True)
                report[name] = {"median": median_of(runs), "runs": runs}
        finally:
            floor.terminate()
            stack.down()
            if sink is not None:
                sink.terminate()
    _write("-".join(args.scenario), report, args.runs)


def _trace_sink(ratio: float | None) -> tuple[dict[str, str], subprocess.Popen[bytes] | None]:
    """With ``--trace``: an OTLP/HTTP receiver process and the settings that export to it."""
    if ratio is None:
        return {}, None
    port = free_port()
    sink = subprocess.Popen([sys.executable, "-m", "bench.otlp_sink", str(port)])
    wait_port(port, sink, "OTLP sink")
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": str(ratio),
    }
    return env, sink


def _write(scenario: str, report: dict[str, Any], runs: int) -> None:
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = RESULTS / f"{scenario}-{stamp}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name in ("ingest", "profile", "rules", "selection", "decision", "outbound", "erasure"):
        if name in report:
            print(f"\n== {name} (median of {runs})")
            print(json.dumps(report[name]["median"], indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
