"""A shared consumer of raw events kept to the event types its process acts on: the server
filters by subject, widened at once, narrowed only after a grace (``shared.event_filter``)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import pytest
from nats.aio.msg import Msg

from shared.bus import Bus, Consumer, _multi_filter
from shared.event_filter import ALL, EventTypeFilter, types_of
from shared.events import CloudEvent
from shared.privacy import event_subject
from tests.helpers import eventually


@pytest.fixture
def bus(scratch_bus: Bus) -> Bus:
    return scratch_bus


async def _send(bus: Bus, etype: str) -> str:
    ev = CloudEvent.new(source="t", type=f"kairos.event.{etype}", subject=None, data={})
    await bus.publish(event_subject(etype, f"c-{uuid.uuid4().hex[:6]}", None), ev)
    return ev.id


async def _value(v: list[str]) -> list[str]:
    return v


async def _filter(c: Consumer) -> set[str]:
    return types_of(await c.server_subjects())


def _as_held(bus: Bus, types: set[str]) -> set[str]:
    """The filter a server holds for these types: before 2.10 (one filter subject only)
    several types are every event."""
    return types if len(types) <= 1 or _multi_filter(bus) else {ALL}


async def test_the_server_hands_over_only_the_wanted_types(bus: Bus) -> None:
    seen: list[str] = []

    async def handle(batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
        seen.extend(ev.id for _, ev in batch)

    c = Consumer(bus, "triggers", ["events.>"], "EVENTS", handle, batch=50)
    await c.start()
    f = EventTypeFilter(c, grace_s=0.5, check_s=0.1)
    task: asyncio.Task[None] | None = None
    try:
        await f.want({"app.opened"})
        assert await _filter(c) == {ALL}  # nothing narrowed before the grace
        task = asyncio.create_task(f.forever())
        await eventually(lambda: _filter(c), lambda t: t == {"app.opened"}, timeout=10)
        wanted = await _send(bus, "app.opened")
        await eventually(lambda: _value(seen), lambda s: wanted in s, timeout=10)
        # A new want is in the server's filter before ``want`` returns.
        await f.want({"app.opened", "page.viewed"})
        assert await _filter(c) == _as_held(bus, {"app.opened", "page.viewed"})
        late = await _send(bus, "page.viewed")
        await eventually(lambda: _value(seen), lambda s: late in s, timeout=10)
        # Narrowed again after the grace: a type no longer wanted is not handed over (it
        # was stored before a wanted one, which arrives; in stream order it would be first).
        await f.want({"app.opened"})
        await eventually(lambda: _filter(c), lambda t: t == {"app.opened"}, timeout=10)
        gone, marker = await _send(bus, "page.viewed"), await _send(bus, "app.opened")
        await eventually(lambda: _value(seen), lambda s: marker in s, timeout=10)
        assert gone not in seen
        # Wanting nothing leaves a filter that matches nothing.
        await f.want(set())
        await eventually(lambda: _filter(c), lambda t: t == set(), timeout=10)
    finally:
        if task is not None:
            task.cancel()
        await c.stop()


async def test_a_type_another_replica_just_added_is_not_narrowed_away(bus: Bus) -> None:
    """Two replicas share the durable and its filter. One with a catalog a moment behind
    sees the other's new type as unwanted only from that moment: it waits the grace."""
    c1 = Consumer(bus, "shared", ["events.>"], "EVENTS", _none, batch=50)
    c2 = Consumer(bus, "shared", ["events.>"], "EVENTS", _none, batch=50)
    await c1.start()
    await c2.start()
    behind, ahead = EventTypeFilter(c1, grace_s=1.0), EventTypeFilter(c2, grace_s=1.0)
    try:
        await behind.want({"a"})
        await ahead.want({"a"})
        await asyncio.sleep(1.1)
        await behind.check()
        assert await _filter(c1) == {"a"}
        both = _as_held(bus, {"a", "b"})
        await ahead.want({"a", "b"})  # the newer catalog: widened at once
        await behind.check()  # the older one, just after: "b" is new to it, kept
        assert await _filter(c1) == both
        await behind.want({"a", "b"})  # it catches up before the grace ends
        await asyncio.sleep(1.1)
        await behind.check()
        assert await _filter(c1) == both
        await ahead.want({"a"})  # a trigger removed: narrowed only after the grace
        await ahead.check()
        assert await _filter(c1) == both
        await behind.want({"a"})
        await asyncio.sleep(1.1)
        await ahead.check()
        assert await _filter(c1) == {"a"}
    finally:
        await c1.stop()
        await c2.stop()


async def _none(batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
    return None
