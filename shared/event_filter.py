"""Keeping a shared consumer of raw events to the event types its process acts on.

Decision's trigger consumer acts on the few event types its campaigns name, yet the server
delivered every event and the process decoded each one only to drop it: at 5,000 events/s
that was ~0.25 of a core in decision and a delivery per event in NATS. The server filters
by subject instead (``events.<token>.<type>``, so ``events.*.<type>`` per type), on the
shared durable and in place: the consumer keeps its position, and what is stored past it is
matched against the new filter.

Replicas share the durable and its filter, and their catalogs may be a moment apart:

- **Widened at once**, before the process acts on a new want: a type this process acts on is
  never filtered out by its own doing. A periodic check widens again what a concurrent
  update lost.
- **Narrowed late**: a type leaves the filter only once it has been unwanted by this process
  for ``grace_s`` in a row, judged against the server's filter as read at that moment. A
  type another replica has just added is new to this one's eyes: it waits, and by then this
  replica's catalog has it too.
- "Everything" (``events.>``, the consumer as it starts) is such a type: the filter first
  narrows ``grace_s`` after a start.
- A server before 2.10 holds one filter subject only: there, several wanted types mean
  every event (as before this filter), one or none still narrow.

The handler still checks its own catalog: the filter saves work, it decides nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from shared.bus import Consumer
from shared.contracts.bus import EventOccurred

log = logging.getLogger("kairos.event_filter")

ALL = ">"  # the type that stands for every event
# Matches no event (an event type is ``[a-z][a-z0-9_.]*``): the filter of a process that
# wants none, as a consumer cannot have an empty filter.
NOTHING = f"{EventOccurred.TYPE}._.-"


def subjects_of(types: Iterable[str]) -> list[str]:
    """The consumer filter for these event types."""
    base = EventOccurred.TYPE
    out = sorted(f"{base}.>" if t == ALL else f"{base}.*.{t}" for t in set(types))
    return out or [NOTHING]


def types_of(subjects: Iterable[str]) -> set[str]:
    """The event types a consumer filter takes (``ALL`` for a filter of every event)."""
    base = EventOccurred.TYPE
    out: set[str] = set()
    for s in subjects:
        if s == NOTHING:
            continue
        if s in (f"{base}.>", ">", f"{base}.*.>"):
            out.add(ALL)
        elif s.startswith(f"{base}.*."):
            out.add(s[len(base) + 3 :])
        else:  # a filter this module did not write: treat it as taking everything
            out.add(ALL)
    return out


class EventTypeFilter:
    """The filter of one consumer of ``events.>``, kept to what this process wants."""

    def __init__(self, consumer: Consumer, *, grace_s: float = 30.0, check_s: float = 2.0):
        self.consumer = consumer
        self.grace_s = grace_s
        self.check_s = check_s
        self.wanted: set[str] | None = None  # not known yet: nothing is narrowed
        self._unwanted_since: dict[str, float] = {}
        self._lock = asyncio.Lock()

    async def want(self, types: Iterable[str]) -> None:
        """This process acts on these types from now on: the server's filter takes them
        before this returns (unless the server cannot be reached: the next check widens)."""
        self.wanted = set(types)
        await self.check(narrow=False)

    async def check(self, *, narrow: bool = True) -> None:
        """Widen the server's filter to what is wanted; narrow what has been unwanted for
        ``grace_s`` (when ``narrow``)."""
        async with self._lock:
            if self.wanted is None:
                return
            have = types_of(await self.consumer.server_subjects())
            widen = ALL not in have and not self.wanted <= have
            extra = have - self.wanted
            now = time.monotonic()
            for t in [t for t in self._unwanted_since if t not in extra]:
                del self._unwanted_since[t]
            for t in extra:
                self._unwanted_since.setdefault(t, now)
            drop = (
                {t for t in extra if now - self._unwanted_since[t] >= self.grace_s}
                if narrow
                else set()
            )
            if not widen and not drop:
                return
            new = (have | self.wanted) - drop
            if ALL in new:
                new = {ALL}
            if not await self.consumer.refilter(subjects_of(new)):
                # A server before 2.10 holds one filter only: several types mean every event.
                new = {ALL}
                if new != have:
                    await self.consumer.refilter(subjects_of(new))
            if new != have:
                log.info(
                    "consumer %s now takes %s",
                    self.consumer.name,
                    "every event" if ALL in new else sorted(new) or "no event",
                )
            for t in drop:
                self._unwanted_since.pop(t, None)

    async def forever(self) -> None:
        while True:
            await asyncio.sleep(self.check_s)
            try:
                await self.check()
            except Exception as exc:  # the server away: next time
                log.warning("event filter of %s not checked: %r", self.consumer.name, exc)
