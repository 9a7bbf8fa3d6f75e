"""A consumer of several subjects gets exactly those, on any NATS server: 2.10+ filters on
the server (``filter_subjects``); older servers ignore that field, so the runner then takes
the stream and acks what is not for it without handing it to the handler."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from shared.bus import Bus, Consumer, subject_matches
from shared.embedded import Embedded, free_port
from shared.events import CloudEvent
from tests.helpers import eventually


def test_subject_matching() -> None:
    assert subject_matches("p.segment.changed", "p.segment.changed")
    assert subject_matches("p.events.a.b", "p.events.>")
    assert subject_matches("p.dispatch.requested.sms", "p.dispatch.requested.*")
    assert not subject_matches("p.dispatch.requested.sms.batch", "p.dispatch.requested.*")
    assert not subject_matches("p.events", "p.events.>")
    assert not subject_matches("p.segment.created", "p.segment.changed")


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[Bus]:
    """The configured NATS (KAIROS_NATS_URL, perhaps an old one) or an embedded one."""
    emb = None
    url = os.environ.get("KAIROS_NATS_URL")
    if not url:
        emb = Embedded(tmp_path, nats_port=free_port())
        emb.start_nats()
        url = emb.nats_url
    b = Bus(url, prefix=f"f{uuid.uuid4().hex[:8]}")
    await b.connect()
    try:
        yield b
    finally:
        for name in ("SEGMENT",):
            try:
                await b.js.delete_stream(b.stream(name))
            except Exception:  # noqa: S110 - best-effort cleanup of a shared server
                pass
        await b.close()
        if emb is not None:
            emb.stop()


async def test_a_consumer_of_two_subjects_gets_only_those(bus: Bus) -> None:
    got: list[str] = []

    async def handler(batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
        got.extend(bus.logical(m.subject) for m, _ in batch)

    c = Consumer(bus, "two", ["segment.changed", "segment.deleted"], "SEGMENT", handler)
    await c.start()
    try:
        for subject in ("segment.changed", "segment.other", "segment.deleted"):
            await bus.publish(subject, bus.envelope("x", {}))
        await eventually(lambda: asyncio.sleep(0, list(got)), lambda g: len(g) >= 2)
        info = await bus.js.consumer_info(bus.stream("SEGMENT"), bus.durable("two"))
        await eventually(
            lambda: bus.js.consumer_info(bus.stream("SEGMENT"), bus.durable("two")),
            lambda i: i.num_pending == 0 and i.num_ack_pending == 0,
        )
        assert info is not None
        assert sorted(got) == ["segment.changed", "segment.deleted"]
    finally:
        await c.stop()
