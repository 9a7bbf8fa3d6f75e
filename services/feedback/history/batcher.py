"""Group commit for ``POST /v1/responses``: the requests that arrive while a transaction is
running share the next one.

Every response of a campaign increments the same report row; one transaction per request
would make concurrent requests wait on that row's lock one after the other (about 120
requests/s on a busy two-core machine). Batched, they pay for one statement and one commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.feedback.history import service
from shared.contracts.bus import ResponseReceived
from shared.db import Database

log = logging.getLogger("kairos.feedback.batcher")
MAX_BATCH = 500
WORKERS = 2  # one builds its statement while the other commits
ATTEMPTS = 3  # a deadlock with a consumer's transaction is tried again


class ResponseBatcher:
    """Queues responses and records them in shared transactions."""

    def __init__(self, db: Database, state: service.State) -> None:
        self.db = db
        self.state = state
        self._queue: asyncio.Queue[tuple[ResponseReceived, asyncio.Future[str]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._loop(), name=f"feedback:responses:{i}")
            for i in range(WORKERS)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def submit(self, item: ResponseReceived) -> str:
        """Record one response: ``stored``, ``duplicate`` or ``unknown`` (no such contact)."""
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, fut))
        return await fut

    async def _record(self, items: list[ResponseReceived]) -> service.Recorded:
        for attempt in range(ATTEMPTS):
            try:
                async with self.db.transaction() as uow:
                    return await service.record_responses(self.db, uow, self.state, items)
            except Exception as exc:
                if attempt == ATTEMPTS - 1 or not service.retryable(exc):
                    raise
        raise AssertionError("unreachable")

    async def _loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                done = await self._record([item for item, _ in batch])
            except Exception as exc:  # every waiting request answers with the failure
                log.warning("recording %d responses failed: %r", len(batch), exc)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), outcome in zip(batch, done.outcome, strict=True):
                if not fut.done():
                    fut.set_result(outcome)
