"""A poison message on every consumer of every process: each goes to its dead letter
(``dlq.<consumer>``), and each consumer goes on with the next message."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import httpx
import nats
import pytest

from shared.bus import STREAMS, Bus
from shared.stack import Stack
from tests.faults.conftest import Figures
from tests.faults.flows import EventLoad
from tests.helpers import eventually

pytestmark = pytest.mark.slow


def _concrete(wire_filter: str) -> str:
    """A subject a filter takes in: every wildcard token made a word."""
    return ".".join("poison" if t in ("*", ">") else t for t in wire_filter.split("."))


async def test_poison_on_every_consumer_goes_to_dead_letter_and_it_goes_on(
    fstack: Stack, fgw: httpx.AsyncClient, figures: Figures
) -> None:
    prefix = fstack.env["KAIROS_BUS_PREFIX"]
    bus = Bus(fstack.env["KAIROS_NATS_URL"], prefix=prefix)
    nc = await nats.connect(bus.url)
    js = nc.jetstream()
    live = {str(p.pid) for p in fstack.procs.values() if p.poll() is None}
    try:
        expected: dict[str, list[str]] = {}  # consumer (logical name) -> its filters
        stream_of: dict[str, str] = {}
        for stream in STREAMS:
            for ci in await js.consumers_info(bus.stream(stream)):
                name = ci.name[len(bus.durable("")) :]
                pids = re.findall(r"-(\d{3,})(?=-|$)", name)
                if pids and pids[-1] not in live:
                    continue  # a killed process's own consumer, waiting to expire
                cfg = ci.config
                filters = list(cfg.filter_subjects or []) or [cfg.filter_subject or ""]
                expected[name] = [f for f in filters if f]
                stream_of[name] = bus.stream(stream)
        assert len(expected) >= 15, sorted(expected)  # every process's consumers

        async def backlog() -> dict[str, int]:
            out = {}
            for name in expected:
                ci = await js.consumer_info(stream_of[name], bus.durable(name))
                if ci.num_pending or ci.num_ack_pending:
                    out[name] = (ci.num_pending or 0) + (ci.num_ack_pending or 0)
            return out

        # Earlier cases leave backlogs (receipts of thousands of messages): the poison is
        # published once every consumer has caught up, so what is measured is the poison.
        await eventually(backlog, lambda b: b == {}, timeout=600)
        dead: dict[str, str] = {}
        got_all = asyncio.Event()

        async def on_dead(msg: nats.aio.msg.Msg) -> None:
            who = (msg.headers or {}).get("Kairos-Consumer", "")
            dead.setdefault(who, (msg.headers or {}).get("Kairos-Dead-Reason", ""))
            if set(expected) <= set(dead):
                got_all.set()

        await js.subscribe(
            bus.subject("dlq.>"),
            cb=on_dead,
            ordered_consumer=True,
            deliver_policy=nats.js.api.DeliverPolicy.NEW,
        )
        subjects = {_concrete(f) for fs in expected.values() for f in fs}
        t0 = time.monotonic()
        seq: dict[str, int] = {}
        for subject in sorted(subjects):  # not JSON, not a CloudEvent: it can never be handled
            ack = await js.publish(
                subject, b"\x00poison", headers={"Nats-Msg-Id": str(uuid.uuid4())}
            )
            seq[subject] = ack.seq
        try:
            await asyncio.wait_for(got_all.wait(), 120)
        except TimeoutError:
            pass
        elapsed = round(time.monotonic() - t0, 2)
        missing = sorted(set(expected) - set(dead))

        async def floors_behind() -> list[str]:
            """Consumers whose ack floor has not yet moved past their poison message."""
            behind = []
            for name, fs in expected.items():
                ci = await js.consumer_info(stream_of[name], bus.durable(name))
                if ci.ack_floor is None or (ci.ack_floor.stream_seq or 0) < max(
                    seq[_concrete(f)] for f in fs
                ):
                    behind.append(name)
            return behind

        try:
            await eventually(floors_behind, lambda b: b == [], timeout=60)
        except AssertionError:
            pass
        behind = await floors_behind()
        # Every consumer goes on: events are counted, a trigger-free flow still moves.
        load = EventLoad(fgw, 100, customers=5)
        await load.run()
        counts = await load.settle(timeout=60)
        figures.add(
            "poison message on every consumer",
            load=f"{len(subjects)} subjects, {len(expected)} consumers",
            dead_lettered=len(set(expected) & set(dead)),
            consumers=len(expected),
            missing=missing,
            stuck=behind,
            lost=load.lost(counts),
            dead_letter_s=elapsed,
        )
        assert missing == [], missing
        assert behind == [], behind
        assert all("undecodable" in r for r in dead.values()), dead
        assert load.lost(counts) == 0 and load.doubled(counts) == 0
    finally:
        await nc.close()
