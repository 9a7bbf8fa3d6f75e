"""/metrics of every process passes `promtool check metrics`, and carries the gauges the
autoscalers and alerts act on: consumer lag (for every consumer a ScaledObject names) and
dispatch's backlog, both true to what is really waiting."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import uuid
from types import SimpleNamespace
from typing import Any

import httpx
import sqlalchemy as sa
from nats.aio.msg import Msg
from prometheus_client.parser import text_string_to_metric_families

from shared import metrics
from shared.bus import Bus, Consumer
from shared.db import Database
from shared.events import CloudEvent
from shared.stack import Stack
from tests.conftest import _drop_streams
from tests.helpers import eventually
from tests.k8s.kube import PROCESSES, PRODUCTION, build, require


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


async def _scrape(stack: Stack, name: str) -> str:
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.get(stack.url(name) + "/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


async def test_every_process_passes_promtool_check_metrics(stack: Stack) -> None:
    promtool = require("promtool")
    for name in PROCESSES:
        text = await _scrape(stack, name)
        out = await asyncio.to_thread(
            subprocess.run,
            [promtool, "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, f"{name}: {out.stdout}{out.stderr}"
        assert "kairos_http_requests_total" in text


async def test_every_scaled_consumer_reports_its_lag(stack: Stack) -> None:
    """KEDA scales on the consumer names in the ScaledObjects; a name that matches no consumer
    would read as the whole stream's length. Each must be one its process really runs."""
    for so in (o for o in build(PRODUCTION) if o["kind"] == "ScaledObject"):
        process = so["spec"]["scaleTargetRef"]["name"].removeprefix("kairos-")
        lags = _samples(await _scrape(stack, process), "kairos_consumer_lag_messages")
        reported = {(dict(k)["stream"], dict(k)["consumer"]) for k in lags}
        for t in so["spec"]["triggers"]:
            if t["type"] == "nats-jetstream":
                meta = t["metadata"]
                assert (meta["stream"], meta["consumer"]) in reported, (process, meta, reported)


async def test_consumer_lag_counts_what_is_not_acknowledged(stack: Stack) -> None:
    bus = Bus(stack.env["KAIROS_NATS_URL"], prefix=f"lag{uuid.uuid4().hex[:6]}", source="tests")
    await bus.connect()
    release = asyncio.Event()
    handled: list[str] = []

    async def slow(batch: Any) -> list[Msg] | None:
        await release.wait()
        handled.extend(ev.id for _, ev in batch)
        return None

    consumer = Consumer(bus, "lag-probe", ["events.>"], "EVENTS", slow, batch=3)
    rt = SimpleNamespace(consumers=[consumer], bus=bus, extras={})
    labels = (("consumer", "lag-probe"), ("stream", "EVENTS"))

    async def lag() -> float | None:
        rt.extras.pop("metrics.last_sample", None)
        await metrics.sample(rt)  # type: ignore[arg-type]
        text = (await asyncio.to_thread(_local_metrics)).decode()
        return _samples(text, "kairos_consumer_lag_messages").get(labels)

    try:
        await consumer.start()
        for i in range(7):
            ev = CloudEvent(source="tests", type="app.opened", subject=f"c{i}", data={})
            await bus.publish("events.app.opened", ev)
        # 3 in the handler's hands (delivered, not acked), 3 fetched ahead, 1 not delivered.
        assert await eventually(lag, lambda v: v == 7) == 7
        release.set()
        assert await eventually(lag, lambda v: v == 0) == 0
        assert len(handled) == 7
    finally:
        release.set()
        await consumer.stop()
        await _drop_streams(bus)
        await bus.close()
    assert await lag() is None  # NATS gone for this runtime: no made-up figure


def _local_metrics() -> bytes:
    from prometheus_client import generate_latest

    return generate_latest()


async def test_dispatch_backlog_is_what_waits_in_the_queue(stack: Stack) -> None:
    db = Database(stack.env["KAIROS_DATABASE_URL"], "dispatch")
    channel = f"k8s-{uuid.uuid4().hex[:6]}"  # a channel no sender claims: the rows stay
    ids = [f"t-{uuid.uuid4().hex}" for _ in range(5)]

    async def backlog() -> float | None:
        text = await _scrape(stack, "dispatch")
        return _samples(text, "kairos_dispatch_backlog_messages").get((("channel", channel),))

    try:
        async with db.transaction() as uow:
            await uow.session.execute(
                sa.text(
                    "INSERT INTO dispatch.message (tracking_id, customer_id, campaign_id, channel,"
                    " lane, priority, status, request, next_attempt_at, created_at, updated_at)"
                    " SELECT t, 'c-k8s', 'camp-k8s', :ch, 'realtime', 0,"
                    " CASE WHEN n <= 3 THEN 'queued' WHEN n = 4 THEN 'in_doubt' ELSE 'sent' END,"
                    " '{}'::jsonb, now(), now(), now()"
                    " FROM unnest(CAST(:ids AS text[])) WITH ORDINALITY AS u(t, n)"
                ),
                {"ch": channel, "ids": ids},
            )
        # Three queued and one in doubt wait; the sent one does not.
        assert await eventually(backlog, lambda v: v == 4) == 4
        scraped = await _scrape(stack, "dispatch")
        for known in ("push", "email", "sms", "inapp"):
            assert (("channel", known),) in _samples(scraped, "kairos_dispatch_backlog_messages")
        async with db.transaction() as uow:
            await uow.session.execute(
                sa.text("DELETE FROM dispatch.message WHERE tracking_id = ANY(:ids)"), {"ids": ids}
            )
        assert await eventually(backlog, lambda v: v == 0) == 0
    finally:
        with contextlib.suppress(Exception):
            async with db.transaction() as uow:
                await uow.session.execute(
                    sa.text("DELETE FROM dispatch.message WHERE tracking_id = ANY(:ids)"),
                    {"ids": ids},
                )
        await db.dispose()
