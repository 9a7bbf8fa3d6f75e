"""Feedback service: contact and response history, conversions, reports, exports."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI

from services.feedback import exports
from services.feedback.consumers import consumers, keep_event_filter
from services.feedback.history import endpoints as history
from services.feedback.history import service
from services.feedback.history.batcher import ResponseBatcher
from services.feedback.reports import endpoints as reports
from shared.events import utcnow
from shared.service import Runtime, create_service_app
from shared.settings import Settings

log = logging.getLogger("kairos.feedback")
PRUNE_EVERY_S = 600.0


async def _prune(rt: Runtime) -> None:
    """Forget closed conversion windows and events no window can use, now and then."""
    assert rt.db is not None
    while True:
        with contextlib.suppress(Exception):
            async with rt.db.transaction() as uow:
                await service.prune(uow, rt.extras["feedback"], utcnow())
        await asyncio.sleep(PRUNE_EVERY_S)


async def _setup(rt: Runtime) -> None:
    assert rt.db is not None
    # Pseudonyms are keyed with the link secret: irreversible without it, stable with it.
    rt.extras["feedback"] = service.State(secret=rt.settings.link_signer_secret())
    batcher = ResponseBatcher(rt.db, rt.extras["feedback"])
    batcher.start()
    rt.extras["responses"] = batcher
    rt.closers.append(batcher.stop)
    if rt.settings.run_consumers:
        rt.consumers = consumers(rt)
        for c in rt.consumers:
            await c.start()
        rt.background.append(asyncio.create_task(_prune(rt), name="feedback:prune"))
        rt.background.append(
            asyncio.create_task(
                keep_event_filter(rt.db, rt.extras["feedback"], rt.extras["event_filter"]),
                name="feedback:event-filter",
            )
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    """The feedback process."""
    return create_service_app(
        "feedback",
        schema="feedback",
        routers=[history.router, reports.router, exports.router],
        setup=_setup,
        settings=settings,
    )
