"""The ranking step's statistics, held in memory: the (successes, failures) of every
(offer, treatment) of the active catalog, read from Redis in one round trip a second.

Ranking used to read them for its candidates on every decision (a Redis round trip between
eligibility and the cap reservation, on the request path). They change slowly: learning
adds a response or decays an unanswered offer, and a Thompson sample over posteriors of
hundreds of observations does not move with the last second's few. So every replica reads
all of them at once, on a timer and whenever the catalog changes (a new pair starts at the
uninformed prior until the next read, which follows at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from shared.redis import Keys

log = logging.getLogger("kairos.decision.propensities")
Pair = tuple[str, str]  # (offer id, treatment id)
NONE = (0.0, 0.0)


class Propensities:
    """(successes, failures) per (offer, treatment), refreshed every ``every_s``."""

    def __init__(self, redis: Any, keys: Keys, *, every_s: float = 1.0) -> None:
        self.redis = redis
        self.keys = keys
        self.every_s = every_s
        self.stats: dict[Pair, tuple[float, float]] = {}
        self.wake = asyncio.Event()

    def of(self, offer_id: str, treatment_id: str) -> tuple[float, float]:
        """The pair's statistics as last read (the prior's zeros for a pair not read yet)."""
        return self.stats.get((offer_id, treatment_id), NONE)

    async def refresh(self, pairs: Iterable[Pair]) -> None:
        """Read every pair's statistics in one round trip."""
        wanted: Sequence[Pair] = sorted(set(pairs))
        if not wanted:
            self.stats = {}
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for offer_id, treatment_id in wanted:
                pipe.hmget(self.keys("propensity", offer_id, treatment_id), ["s", "f"])
            raw: Sequence[Any] = await pipe.execute()
        self.stats = {
            pair: (float(s or 0), float(f or 0)) for pair, (s, f) in zip(wanted, raw, strict=True)
        }

    async def forever(self, pairs: Callable[[], Iterable[Pair]]) -> None:
        """Refresh every ``every_s``, and at once when woken (the catalog changed)."""
        while True:
            self.wake.clear()
            try:
                await self.refresh(pairs())
            except Exception as exc:  # Redis blinked: rank on the last figures, retry
                log.warning("propensities not refreshed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.every_s)
