"""A run or a simulation works on a catalog read after it was asked for: offers written a
moment before are never found missing (the catalog otherwise follows ``catalog.changed``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from services.decision.engine import Engine
from services.decision.pipeline.catalog import Catalog
from shared.redis import Keys


def _engine() -> Engine:
    # Nothing here touches Redis, the bus or the ledger.
    nothing = cast(Any, None)
    return Engine(nothing, Keys("t"), nothing, nothing)


async def test_a_run_waits_for_a_catalog_read_after_it_asked() -> None:
    eng = _engine()
    stale = Catalog(read_at=time.monotonic())
    eng.set_catalog(stale)
    asking = asyncio.create_task(eng.catalog_since_now(timeout=10))
    await asyncio.sleep(0.05)
    assert eng.wake.is_set()  # the refresh is woken
    assert not asking.done()  # the catalog in hand was read before the question
    eng.set_catalog(Catalog(read_at=stale.read_at))  # a reload that began too early
    await asyncio.sleep(0.05)
    assert not asking.done()
    fresh = Catalog(read_at=time.monotonic())
    eng.set_catalog(fresh)
    assert await asyncio.wait_for(asking, 1) is fresh


async def test_without_a_reload_the_catalog_in_hand_serves_after_the_timeout() -> None:
    eng = _engine()
    stale = Catalog(read_at=time.monotonic())
    eng.set_catalog(stale)
    t0 = time.monotonic()
    assert await eng.catalog_since_now(timeout=0.2) is stale
    assert time.monotonic() - t0 >= 0.2
