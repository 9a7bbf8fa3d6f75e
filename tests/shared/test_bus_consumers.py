"""No consumer left behind: per-process consumers (named after their process) are removed
when the process stops, and by the server when it was killed; restarts leave none behind."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import nats
import pytest
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared.bus import Bus, Consumer, TransientError
from shared.events import CloudEvent
from shared.stack import Stack
from tests.helpers import eventually


@pytest.fixture
def bus(scratch_bus: Bus) -> Bus:
    return scratch_bus


async def _names(js: JetStreamContext, stream: str) -> list[str]:
    return sorted(str(c.name) for c in await js.consumers_info(stream))


async def _nothing(batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
    return None


async def test_restarts_leave_no_per_process_consumer(bus: Bus) -> None:
    stream = bus.stream("CATALOG")
    shared = Consumer(bus, "catalog-shared", ["catalog.>"], "CATALOG", _nothing)
    await shared.start()
    for pid in range(5):  # five "restarts", each with messages still pending
        own = Consumer(
            bus, f"proc-{pid}", ["catalog.>"], "CATALOG", _nothing, inactive_threshold_s=60.0
        )
        await own.start()
        assert bus.durable(f"proc-{pid}") in await _names(bus.js, stream)
        for _ in range(3):
            await bus.publish(
                "catalog.changed",
                CloudEvent.new(source="t", type="catalog.changed", subject=None, data={}),
            )
        await own.stop()
    await shared.stop()
    # The shared durable stays (its replicas share its position); no process's own is left.
    assert await _names(bus.js, stream) == [bus.durable("catalog-shared")]
    assert await own.remove() is False  # already gone: removing again is harmless


async def test_a_killed_process_consumer_is_removed_by_the_server(bus: Bus, stack: Stack) -> None:
    """A process killed with -9 cannot clean up: the inactive threshold does."""
    victim = Bus(stack.env["KAIROS_NATS_URL"], prefix=bus.prefix)
    await victim.connect(ensure_streams=False)
    own = Consumer(
        victim, "killed-proc", ["segment.>"], "SEGMENT", _nothing, inactive_threshold_s=1.0
    )
    await own.start()
    stream = bus.stream("SEGMENT")
    assert bus.durable("killed-proc") in await _names(bus.js, stream)
    assert victim.nc is not None
    await victim.nc.close()  # gone without stop(): no more pulls, no delete
    await eventually(lambda: _names(bus.js, stream), lambda names: names == [], timeout=20)


async def test_service_restarts_leave_one_consumer_each(stack: Stack) -> None:
    """Decision keeps consumers of its own (named by pid) on CATALOG and SEGMENT: after
    three restarts the server holds only the live process's."""
    nc = await nats.connect(stack.env["KAIROS_NATS_URL"])
    js = nc.jetstream()
    prefix = stack.env["KAIROS_BUS_PREFIX"]
    streams = [f"{prefix.upper()}_CATALOG", f"{prefix.upper()}_SEGMENT"]
    try:
        before = {s: await _names(js, s) for s in streams}
        pids = [stack.procs["decision"].pid]
        for _ in range(3):
            stack.stop("decision")
            stack.start("decision")
            stack.wait_ready(["decision"])
            pids.append(stack.procs["decision"].pid)
        after = {s: await _names(js, s) for s in streams}
        for s in streams:
            # Other tests' replicas may still hold theirs (until their inactive threshold):
            # only this process's four lives are counted.
            mine = [n for n in after[s] if any(f"-{pid}-" in n for pid in pids)]
            assert mine == [n for n in mine if f"-{pids[-1]}-" in n] and len(mine) == 1, after[s]
            assert len(after[s]) <= len(before[s]), (before[s], after[s])
    finally:
        await nc.close()


async def test_batches_in_flight_are_each_acked_once(bus: Bus) -> None:
    """Two batches in flight: every message is handled once and acknowledged (nothing left
    pending on the server, nothing redelivered)."""
    seen: list[str] = []

    async def handle(batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
        seen.extend(ev.id for _, ev in batch)

    c = Consumer(bus, "in-flight", ["response.>"], "RESPONSE", handle, batch=50, in_flight=2)
    await c.start()
    sent = [
        CloudEvent.new(source="t", type="response.recorded", subject=None, data={"i": i})
        for i in range(1000)
    ]
    await bus.publish_many(("response.recorded", ev) for ev in sent)

    async def state() -> tuple[int, int, int]:
        info = await bus.js.consumer_info(bus.stream("RESPONSE"), bus.durable("in-flight"))
        return len(seen), int(info.num_pending), int(info.num_ack_pending)

    await eventually(state, lambda s: s == (1000, 0, 0), timeout=30)
    await c.stop()
    assert sorted(seen) == sorted(ev.id for ev in sent)


async def test_a_transient_failure_beside_a_poison_message_is_never_dead_lettered(
    bus: Bus,
) -> None:
    """A poison message sends its batch one by one; a neighbour that is only waiting for
    another process (TransientError) keeps coming back past ``max_deliver`` until it passes,
    and only the poison message is dead-lettered."""
    tries: dict[str, int] = {}
    done: list[str] = []

    async def handle(batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
        for _, ev in batch:
            if ev.data.get("poison"):
                raise ValueError("not handleable")
        for _, ev in batch:
            if ev.data.get("wait"):
                tries[ev.id] = tries.get(ev.id, 0) + 1
                if tries[ev.id] <= 4:
                    raise TransientError("not there yet")
        done.extend(ev.id for _, ev in batch)

    c = Consumer(bus, "one-by-one", ["response.>"], "RESPONSE", handle, batch=10, max_deliver=2)
    c.nak_delay_s = 0.05
    dead = await bus.js.subscribe(bus.subject("dlq.one-by-one"), ordered_consumer=True)
    poison, waiting = (
        CloudEvent.new(source="t", type="response.recorded", subject=None, data=d)
        for d in ({"poison": True}, {"wait": True})
    )
    await bus.publish_many(("response.recorded", ev) for ev in (poison, waiting))
    await c.start()
    try:
        await eventually(lambda: _value(done), lambda d: waiting.id in d, timeout=20)
        msg = await dead.next_msg(timeout=10)
        assert CloudEvent.from_bytes(msg.data).id == poison.id
        assert tries[waiting.id] == 5 and done == [waiting.id]
    finally:
        await c.stop()
        await dead.unsubscribe()


async def _value(v: list[str]) -> list[str]:
    return v


async def test_a_batch_that_breaks_the_runner_does_not_stop_the_consumer(bus: Bus) -> None:
    """Whatever goes wrong around a batch (here a handler that acked a message itself and
    then asks for it back, so the runner's nak fails), the consumer keeps fetching: the
    next message is still handled."""
    done: list[str] = []

    async def handle(batch: Sequence[tuple[Msg, CloudEvent]]) -> list[Msg]:
        msg, ev = batch[0]
        done.append(ev.id)
        if ev.data.get("break"):
            await msg.ack()
            return [msg]  # "later", for a message already acked: the runner's nak raises
        return []

    c = Consumer(bus, "unbroken", ["response.>"], "RESPONSE", handle, batch=1)
    await c.start()
    try:
        breaking, after = (
            CloudEvent.new(source="t", type="response.recorded", subject=None, data=d)
            for d in ({"break": True}, {})
        )
        await bus.publish("response.recorded", breaking)
        await eventually(lambda: _value(done), lambda d: breaking.id in d, timeout=10)
        await bus.publish("response.recorded", after)
        await eventually(lambda: _value(done), lambda d: after.id in d, timeout=10)
    finally:
        await c.stop()


async def test_a_bulk_consumer_takes_a_trickle_as_one_batch(bus: Bus) -> None:
    """A consumer off the latency path (``gather_s``) waits after a first message with no
    backlog behind it, so messages arriving a few ms apart are handled as one batch (one
    transaction) rather than one batch each."""
    batches: list[list[str]] = []

    async def handle(batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
        batches.append([ev.id for _, ev in batch])

    c = Consumer(bus, "bulk", ["response.>"], "RESPONSE", handle, batch=100, gather_s=1.0)
    await c.start()
    try:
        sent = []
        for _ in range(5):
            ev = CloudEvent.new(source="t", type="response.recorded", subject=None, data={})
            await bus.publish("response.recorded", ev)
            sent.append(ev.id)
            await asyncio.sleep(0.01)
        await eventually(
            lambda: _value([i for b in batches for i in b]), lambda d: len(d) == 5, timeout=10
        )
        assert batches == [sent]
    finally:
        await c.stop()


async def test_a_message_acknowledged_behind_the_runners_back_is_replayed(bus: Bus) -> None:
    """A consumer of one process that starts at a sequence (a read model's) checks that it
    was handed every message the server counts as acknowledged. One it never got (here
    taken and acked by another puller on its durable while the handler was busy; in the
    suite, once, by a cause not found) is replayed to it, with what came after."""
    seen: list[str] = []
    busy, release = asyncio.Event(), asyncio.Event()

    async def handle(batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
        for _, ev in batch:
            seen.append(ev.id)
            if ev.data.get("hold"):
                busy.set()
                await release.wait()

    stream = bus.stream("RESPONSE")
    first = (await bus.js.stream_info(stream)).state.last_seq + 1
    c = Consumer(
        bus,
        "healing",
        ["response.>"],
        "RESPONSE",
        handle,
        batch=10,  # no fetch ahead while the handler holds: the thief gets the next one
        start_seq=first,
        inactive_threshold_s=60.0,
        heal_every_s=0.2,
    )
    await c.start()
    thief = await bus.js.pull_subscribe_bind(bus.durable("healing"), stream=stream)
    hold, lost, after = (
        CloudEvent.new(source="t", type="response.recorded", subject=None, data=d)
        for d in ({"hold": True}, {"n": 1}, {"n": 2})
    )
    try:
        await bus.publish("response.recorded", hold)
        await asyncio.wait_for(busy.wait(), 10)
        await bus.publish("response.recorded", lost)
        (stolen,) = await thief.fetch(1, timeout=5)
        assert CloudEvent.from_bytes(stolen.data).id == lost.id
        await stolen.ack()  # acknowledged, never handed to the runner
        release.set()
        await bus.publish("response.recorded", after)
        await eventually(lambda: _value(seen), lambda d: lost.id in d and after.id in d, timeout=10)
        assert seen.index(lost.id) > seen.index(hold.id)
    finally:
        release.set()
        await thief.unsubscribe()
        await c.stop()
