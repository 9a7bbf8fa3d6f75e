"""Decision service: the catalog, the contact policy and the next best offer."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Sequence

from fastapi import FastAPI
from nats.aio.msg import Msg

from services.decision.catalog.endpoints import router as catalog_router
from services.decision.decisions.endpoints import router as decisions_router
from services.decision.engine import Engine, load_catalog, refresh_forever
from services.decision.models import SCHEMA
from services.decision.policy.ledger import Ledger
from shared.bus import Consumer
from shared.events import CloudEvent
from shared.service import Runtime, create_service_app
from shared.settings import Settings

log = logging.getLogger("kairos.decision")
SUCCESS = {"accepted", "clicked", "converted"}
FAILURE = {"declined", "dismissed"}


async def _setup(rt: Runtime) -> None:
    assert rt.db is not None
    cfg = rt.settings
    eng = Engine(rt.redis, rt.keys, rt.bus, Ledger(rt.redis, rt.keys), explore=cfg.decision_explore)
    rt.extras["engine"] = eng
    selection = cfg.url_of("selection")
    wake = asyncio.Event()

    async def changed(batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
        wake.set()

    async def responses(batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
        """Beta posteriors per (offer, treatment): successes and failures from responses."""
        async with rt.redis.pipeline(transaction=False) as pipe:
            for _, ev in batch:
                d = ev.data if isinstance(ev.data, dict) else {}
                outcome, offer, treatment = d.get("outcome"), d.get("offer_id"), d.get("treatment")
                if not offer or not treatment or d.get("control"):
                    continue
                field = "s" if outcome in SUCCESS else "f" if outcome in FAILURE else None
                if field:
                    pipe.hincrby(rt.keys("propensity", str(offer), str(treatment)), field, 1)
            await pipe.execute()

    # Every replica reloads on every change: its own consumers, starting at "now".
    name = re.sub(r"[^A-Za-z0-9_-]", "_", f"decision-{cfg.instance_id}-{os.getpid()}")
    for stream, subjects in (
        ("CATALOG", ["catalog.>"]),
        ("SEGMENT", ["segment.changed", "segment.deleted"]),
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
    if cfg.run_consumers:
        rt.consumers.append(
            Consumer(rt.bus, "decision-propensity", ["response.recorded"], "RESPONSE", responses)
        )
    try:
        eng.catalog = await load_catalog(rt.db, selection)
    except Exception as exc:  # selection not up yet: serve an empty catalog, retry at once
        log.warning("catalog not loaded at start (%s); retrying", exc)
        wake.set()
    for c in rt.consumers:
        await c.start()
    rt.background.append(asyncio.create_task(refresh_forever(eng, rt.db, selection, wake)))


def create_app(settings: Settings | None = None) -> FastAPI:
    """The decision process."""
    return create_service_app(
        "decision",
        schema=SCHEMA,
        routers=[catalog_router, decisions_router],
        setup=_setup,
        settings=settings,
    )
