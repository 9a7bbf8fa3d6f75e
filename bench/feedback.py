"""Feedback figures (issue: feedback): contact history written/s and its lag, responses
ingested/s (bus and HTTP), the click redirect at 1,000 req/s, the report's latency over
aggregates standing for 10,000,000 contacts, and a Parquet export (rows/s, peak memory).

``python -m bench.feedback [--runs 3] [--contacts 200000] [--export-rows 2000000]``
starts the suite as ``python -m bench`` does and writes bench/results/feedback-*.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench.loadgen import closed_loop, open_loop
from shared.bus import Bus
from shared.contracts.bus import ContactRecorded, Conversion, ResponseReceived
from shared.events import iso, utcnow
from shared.links import LinkSigner
from shared.settings import DEFAULT_SECRET
from shared.stack import Stack


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _contact(cmp: str, i: int, control: bool) -> ContactRecorded:
    return ContactRecorded(
        tracking_id=f"b-{cmp}-{i}",
        customer_id=f"cust-{i % 50_000}",
        campaign_id=cmp,
        treatment=None if control else "AB"[i % 2],
        channel=None if control else ("push", "email", "sms")[i % 3],
        control=control,
        control_kind="campaign" if control else None,
        status="control" if control else "offered",
        conversion=Conversion(event="topup.done", within="7d"),
        time=iso(utcnow()),
    )


async def _publish_at_rate(bus: Bus, cmp: str, n: int, rate: float) -> float:
    """Publish n contacts at ``rate``/s in 10 ms slices, each stamped with its own time."""
    start = time.perf_counter()
    slice_n = max(1, int(rate / 100))
    sent = 0
    pending = []
    while sent < n:
        due = start + sent / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        batch = [
            _contact(cmp, sent + k, (sent + k) % 10 == 0) for k in range(min(slice_n, n - sent))
        ]
        pending += await bus.publish_pending(
            c.to_event(source="bench", id_="contact-" + c.tracking_id) for c in batch
        )
        sent += len(batch)
    await bus.acked(pending)
    return time.perf_counter() - start


async def _wait_rows(engine: AsyncEngine, sql: str, params: dict[str, Any], n: int) -> float:
    start = time.perf_counter()
    while True:
        async with engine.connect() as conn:
            got = int(await conn.scalar(sa.text(sql), params) or 0)
        if got >= n:
            return time.perf_counter() - start
        await asyncio.sleep(0.05)


async def _contacts(bus: Bus, engine: AsyncEngine, n: int, rate: float) -> dict[str, Any]:
    cmp = f"bench-{uuid.uuid4().hex[:6]}"
    t0 = time.perf_counter()
    published_s = await _publish_at_rate(bus, cmp, n, rate)
    await _wait_rows(
        engine, "SELECT count(*) FROM feedback.contacts WHERE campaign_id = :c", {"c": cmp}, n
    )
    total_s = time.perf_counter() - t0
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.text(
                    "SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP"
                    " (ORDER BY extract(epoch FROM recorded_at - at)),"
                    " extract(epoch FROM max(recorded_at) - min(recorded_at))"
                    " FROM feedback.contacts WHERE campaign_id = :c"
                ),
                {"c": cmp},
            )
        ).one()
    return {
        "campaign": cmp,
        "offered_rate": rate,
        "contacts": n,
        "published_s": round(published_s, 2),
        "written_per_s": round(n / total_s),
        "lag_p50_ms": round(row[0][0] * 1000, 1),
        "lag_p99_ms": round(row[0][1] * 1000, 1),
    }


async def _responses_bus(bus: Bus, engine: AsyncEngine, cmp: str, n: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    msgs = [
        ResponseReceived(tracking_id=f"b-{cmp}-{i}", outcome="opened", source="provider")
        for i in range(n)
    ]
    for k in range(0, n, 5000):
        await bus.publish_many([m.to_event(source="bench") for m in msgs[k : k + 5000]], timeout=60)
    await _wait_rows(
        engine,
        "SELECT count(*) FROM feedback.responses WHERE campaign_id = :c AND outcome = 'opened'",
        {"c": cmp},
        n,
    )
    s = time.perf_counter() - t0
    return {"responses": n, "seconds": round(s, 2), "ingested_per_s": round(n / s)}


async def _responses_http(st: Stack, headers: dict[str, str], cmp: str, n: int) -> dict[str, Any]:
    def make(i: int) -> tuple[str, str, bytes]:
        body = {"tracking_id": f"b-{cmp}-{i % n}", "outcome": "accepted", "value": 1.5}
        return "POST", "/v1/responses", orjson.dumps(body)

    res = await closed_loop(
        "127.0.0.1", st.ports["gateway"], headers, make, concurrency=64, duration=8
    )
    return res.summary()


async def _clicks(st: Stack, cmp: str, n: int) -> dict[str, Any]:
    secret = (
        st.env.get("KAIROS_LINK_SECRET") or st.env.get("KAIROS_TRACKING_SECRET") or DEFAULT_SECRET
    )
    signer = LinkSigner(secret, st.url("gateway"))
    tokens = [
        signer.token("t", f"b-{cmp}-{i}", channel="email", url=f"https://example.com/o/{i % 7}")
        for i in range(min(n, 20_000))
    ]

    def make(i: int) -> tuple[str, str, bytes]:
        return "GET", f"/t/{tokens[i % len(tokens)]}", b""

    res = await open_loop("127.0.0.1", st.ports["gateway"], {}, make, rate=1000, duration=10)
    return res.summary()


async def _seed_aggregates(engine: AsyncEngine, cmp: str, contacts: int) -> None:
    """report_daily rows standing for ``contacts`` contacts: 90 days x 3 treatments x
    4 channels x target/control, as a 10M-contact campaign leaves them."""
    keys = 90 * 3 * 4 * 2
    per = contacts // keys
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO feedback.report_daily (campaign_id, day, treatment, channel, control,"
                " control_kind, targeted, control_n, sent, delivered, opened, clicked, converted,"
                " revenue)"
                " SELECT :c, DATE '2026-06-01' + d, t, ch, k, CASE WHEN k THEN 'campaign' ELSE '' END,"
                " CASE WHEN k THEN 0 ELSE :per END, CASE WHEN k THEN :per ELSE 0 END,"
                " :per, :per * 9 / 10, :per / 3, :per / 10, :per / 40, :per * 0.5"
                " FROM generate_series(0, 89) d, unnest(ARRAY['A', 'B', 'C']) t,"
                " unnest(ARRAY['push', 'email', 'sms', 'inapp']) ch, unnest(ARRAY[false, true]) k"
            ),
            {"c": cmp, "per": per},
        )


async def _report(st: Stack, headers: dict[str, str], cmp: str) -> dict[str, Any]:
    def make(_: int) -> tuple[str, str, bytes]:
        return "GET", f"/v1/campaigns/{cmp}/report", b""

    one = await closed_loop(
        "127.0.0.1", st.ports["gateway"], headers, make, concurrency=1, duration=5
    )
    eight = await closed_loop(
        "127.0.0.1", st.ports["gateway"], headers, make, concurrency=8, duration=5
    )
    return {"one_client": one.summary(), "eight_clients": eight.summary()}


async def _seed_history(engine: AsyncEngine, rows: int) -> None:
    async with engine.begin() as conn:
        await conn.execute(sa.text("SELECT feedback.ensure_partitions(ARRAY[DATE '2022-01-01'])"))
        done = await conn.scalar(sa.text("SELECT count(*) FROM feedback.contacts_202201"))
    step = 1_000_000
    for k in range(int(done or 0), rows, step):
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "INSERT INTO feedback.contacts (tracking_id, at, customer_id, campaign_id,"
                    " treatment, offer_id, channel, control, status, value)"
                    " SELECT 'x-' || i, TIMESTAMPTZ '2022-01-01' + i * interval '2 ms',"
                    " 'cust-' || (i % 1000000), 'cmp-export', 'A', 'off-1', 'push',"
                    " i % 10 = 0, 'delivered', 4.0"
                    " FROM generate_series(CAST(:a AS bigint), CAST(:b AS bigint)) i"
                ),
                {"a": k, "b": min(rows, k + step) - 1},
            )
    async with engine.begin() as conn:  # as autovacuum would after a bulk load
        await conn.execute(sa.text("ANALYZE feedback.contacts_202201"))


async def _export(st: Stack, headers: dict[str, str], rows: int) -> dict[str, Any]:
    pid = st.procs["feedback"].pid
    base_rss = _rss_mb(pid)
    peak = [base_rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    size = 0
    t0 = time.perf_counter()
    params = {"since": "2022-01-01T00:00:00Z", "until": "2022-02-01T00:00:00Z", "format": "parquet"}
    async with (
        httpx.AsyncClient(base_url=st.url("gateway"), headers=headers, timeout=None) as c,
        c.stream("GET", "/v1/exports/contacts", params=params) as r,
    ):
        assert r.status_code == 200
        async for chunk in r.aiter_bytes():
            size += len(chunk)
    s = time.perf_counter() - t0
    stop.set()
    sampler.join()
    return {
        "rows": rows,
        "seconds": round(s, 1),
        "rows_per_s": round(rows / s),
        "bytes": size,
        "feedback_rss_before_mb": base_rss,
        "feedback_rss_peak_mb": peak[0],
    }


async def feedback(st: Stack, key: str, run: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run of every feedback measurement."""
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    bus = Bus(st.env["KAIROS_NATS_URL"], prefix=st.env["KAIROS_BUS_PREFIX"], source="bench")
    await bus.connect(ensure_streams=False)
    engine = create_async_engine(st.env["KAIROS_DATABASE_URL"])
    out: dict[str, Any] = {}
    parts = set(args.only.split(",")) if args.only else None

    def want(part: str) -> bool:
        return parts is None or part in parts

    try:
        out["contacts_at_10k_per_s"] = await _contacts(bus, engine, args.contacts, 10_000)
        cmp = out["contacts_at_10k_per_s"]["campaign"]
        if want("max"):
            out["contacts_at_max"] = await _contacts(bus, engine, args.contacts, 1_000_000)
        if want("responses"):
            out["responses_bus"] = await _responses_bus(bus, engine, cmp, args.contacts)
            out["responses_http"] = await _responses_http(st, headers, cmp, args.contacts)
        if want("clicks"):
            out["click_redirect_1000rps"] = await _clicks(st, cmp, args.contacts)
        if want("report"):
            big = f"bench-10m-{run}"
            await _seed_aggregates(engine, big, 10_000_000)
            out["report_10m_contacts"] = await _report(st, headers, big)
        if want("export"):
            await _seed_history(engine, args.export_rows)
            out["export_parquet"] = await _export(st, headers, args.export_rows)
    finally:
        await bus.close()
        await engine.dispose()
    return out


def main() -> None:
    from bench.__main__ import RESULTS, median_of, start_stack

    ap = argparse.ArgumentParser(prog="python -m bench.feedback")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--contacts", type=int, default=200_000)
    ap.add_argument("--export-rows", type=int, default=2_000_000)
    ap.add_argument("--only", default="", help="max,responses,clicks,report,export")
    args = ap.parse_args()
    key = "bench-" + uuid.uuid4().hex
    runs = []
    with tempfile.TemporaryDirectory(prefix="kairos-bench-") as tmp:
        st = start_stack(Path(tmp), key)
        try:
            for i in range(args.runs):
                print(f"== feedback run {i + 1}/{args.runs}", flush=True)  # noqa: T201
                runs.append(asyncio.run(feedback(st, key, i, args)))
                print(json.dumps(runs[-1], indent=1), flush=True)  # noqa: T201
        finally:
            st.down()
    report = {"feedback": {"median": median_of(runs), "runs": runs}}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"feedback-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["feedback"]["median"], indent=2))  # noqa: T201
    print(f"written to {out}")  # noqa: T201


if __name__ == "__main__":
    main()
