"""Decision service: the catalog, the contact policy and the next best offer."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Sequence

from fastapi import FastAPI
from nats.aio.msg import Msg

from services.decision import erasure
from services.decision.catalog.endpoints import router as catalog_router
from services.decision.decisions.endpoints import router as decisions_router
from services.decision.engine import Engine
from services.decision.learning import Learning
from services.decision.messages import parse
from services.decision.models import SCHEMA
from services.decision.pipeline.catalog import Catalog, load_catalog, refresh_forever
from services.decision.policy.ledger import Ledger
from services.decision.runs.endpoints import router as runs_router
from services.decision.runs.service import Runs
from services.decision.timers.service import Timers
from services.decision.triggers import Triggers
from shared.bus import Bus, Consumer, PoisonMessage, bulk_gather_s
from shared.contracts.bus import (
    BusMessage,
    CatalogChanged,
    ContactRecorded,
    EventOccurred,
    ResponseRecorded,
    SegmentChanged,
    SegmentDeleted,
)
from shared.event_filter import EventTypeFilter
from shared.events import CloudEvent
from shared.privacy import any_customer
from shared.service import Runtime, create_service_app
from shared.settings import Settings
from shared.stream_outbox import StreamOutbox

log = logging.getLogger("kairos.decision")


async def _setup(rt: Runtime) -> None:
    assert rt.db is not None
    cfg = rt.settings
    eng = Engine(rt.redis, rt.keys, rt.bus, Ledger(rt.redis, rt.keys), explore=cfg.decision_explore)
    rt.extras["engine"] = eng
    selection = cfg.url_of("selection")
    wake = eng.wake

    kinds: dict[str, type[BusMessage]] = {
        m.TYPE: m for m in (CatalogChanged, SegmentChanged, SegmentDeleted)
    }

    async def changed(batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
        for _, ev in batch:  # typed, so a malformed one is dead-lettered, not obeyed
            kind = kinds.get(ev.type)
            if kind is None:
                raise PoisonMessage(f"unexpected event type {ev.type!r}")
            parse(ev, kind)
        wake.set()

    # Every replica reloads on every change: its own consumers, starting at "now".
    name = re.sub(r"[^A-Za-z0-9_-]", "_", f"decision-{cfg.instance_id}-{os.getpid()}")
    for stream, subjects in (
        ("CATALOG", [CatalogChanged.TYPE]),
        ("SEGMENT", [SegmentChanged.TYPE, SegmentDeleted.TYPE]),
    ):
        info = await rt.bus.js.stream_info(rt.bus.stream(stream))
        rt.consumers.append(
            Consumer(
                rt.bus,
                f"{name}-{stream.lower()}",
                subjects,
                stream,
                changed,
                start_seq=int(info.state.last_seq) + 1,
                inactive_threshold_s=600.0,
            )
        )
    timers = Timers(eng, rt.db, rt.bus)
    triggers = Triggers(eng, timers, rt.redis, rt.keys, rt.bus)
    # A run publishes pages of thousands of messages with their acks pipelined; on the
    # process's one connection a trigger's request would queue behind them. Runs get their own.
    runs_bus = Bus(cfg.nats_url, prefix=cfg.bus_prefix, source="kairos/decision")
    await runs_bus.connect(ensure_streams=False)
    rt.closers.append(runs_bus.close)
    runs = Runs(
        eng,
        rt.db,
        runs_bus,
        selection,
        name,
        timers,
        page=cfg.decision_run_page,
    )
    rt.extras["triggers"] = triggers
    rt.extras["timers"] = timers
    rt.extras["runs"] = runs
    # The server hands the trigger consumer only the event types campaigns name.
    event_filter: EventTypeFilter | None = None
    if cfg.run_consumers:
        on_events = Consumer(
            rt.bus,
            "decision-triggers",
            [f"{EventOccurred.TYPE}.>"],
            "EVENTS",
            triggers.handle_events,
            batch=cfg.consumer_batch,
            max_deliver=cfg.consumer_max_deliver,
            nak_delay_s=0.2,
            ack_wait_s=10.0,  # a killed replica's batch comes back to another soon
        )
        event_filter = EventTypeFilter(on_events)
        rt.consumers += [
            on_events,
            Consumer(
                rt.bus,
                "decision-trigger-responses",
                [any_customer(ResponseRecorded.TYPE)],
                "RESPONSE",
                triggers.handle_responses,
                max_deliver=cfg.consumer_max_deliver,
            ),
        ]
        rt.background += [
            asyncio.create_task(timers.forever()),
            asyncio.create_task(runs.work_forever()),
            asyncio.create_task(runs.cron_forever()),
        ]
        learning = Learning(rt.redis, rt.keys, unanswered_s=cfg.decision_unanswered_s)
        rt.consumers += [
            Consumer(
                rt.bus,
                "decision-propensity",
                [any_customer(ResponseRecorded.TYPE)],
                "RESPONSE",
                learning.handle,
                gather_s=bulk_gather_s(),
            ),
            Consumer(
                rt.bus,
                "decision-offered",
                [any_customer(ContactRecorded.TYPE)],
                "CONTACT",
                learning.handle,
                gather_s=bulk_gather_s(),
            ),
            erasure.consumer(rt),
        ]
        rt.background.append(asyncio.create_task(learning.sweep_forever()))
    try:
        eng.set_catalog(await load_catalog(rt.db, selection))
    except Exception as exc:  # selection not up yet: serve an empty catalog, retry at once
        log.warning("catalog not loaded at start (%s); retrying", exc)
        wake.set()
    for c in rt.consumers:
        await c.start()

    async def set_catalog(cat: Catalog) -> None:
        if event_filter is not None:  # before the catalog acts: its event types come through
            try:
                await event_filter.want(cat.event_types())
            except Exception as exc:  # the bus away: the filter's next check widens it
                log.warning("trigger event filter not widened: %r", exc)
        eng.set_catalog(cat)

    if event_filter is not None:
        if eng.loaded.is_set():  # an unloaded catalog wants nothing yet: events wait for it
            await set_catalog(eng.catalog)
        rt.background.append(asyncio.create_task(event_filter.forever(), name="event-filter"))
    rt.background.append(asyncio.create_task(refresh_forever(set_catalog, rt.db, selection, wake)))
    rt.background.append(asyncio.create_task(eng.propensities.forever(eng.pairs)))
    # Touchpoint decisions write their contact records to a Redis stream in the step that
    # reserves the caps; every replica (consumers or not) relays it to JetStream.
    relay = StreamOutbox(rt.redis, rt.bus, eng.ledger.outbox_key(), name)
    rt.background.append(asyncio.create_task(relay.run(), name="contact-outbox"))


def create_app(settings: Settings | None = None) -> FastAPI:
    """The decision process."""
    return create_service_app(
        "decision",
        schema=SCHEMA,
        # Decisions first: the hot path is matched before any other route is tried (its one
        # path is nobody else's); runs before the catalog: {action} is a catch-all.
        routers=[
            decisions_router,
            runs_router,
            catalog_router,
        ],
        setup=_setup,
        settings=settings,
    )
