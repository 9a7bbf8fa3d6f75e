"""``profile.erased`` in selection: the index forgets the customer as it applies the message
(``Audience._on_profile``); here the rest goes soon after: the saved index file is written
again without them, and frozen segment snapshots drop them from their members."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

import sqlalchemy as sa

from shared.db import Database

log = logging.getLogger("kairos.selection.erasure")
SAVE_AFTER_S = 0.5  # erasures arriving together are saved once


class Forget:
    """Carries an erasure from the in-memory index to the saved one and the snapshots."""

    def __init__(self, db: Database | None, save: Callable[[], Awaitable[None]]) -> None:
        self.db = db
        self.save = save
        self._pending: asyncio.Task[None] | None = None

    async def erased(self, ids: Sequence[str]) -> None:
        """Called once the index has dropped ``ids``; raises if the snapshots could not be
        changed (the message is then retried)."""
        if self.db is not None and ids:
            async with self.db.transaction() as uow:
                got = await uow.session.execute(
                    sa.text(
                        "UPDATE selection.snapshot_chunk SET members = ARRAY("
                        "SELECT m FROM unnest(members) AS m WHERE m <> ALL(CAST(:ids AS text[])))"
                        " WHERE members && CAST(:ids AS text[])"
                    ),
                    {"ids": list(ids)},
                )
            n = int(got.rowcount or 0)  # type: ignore[attr-defined]
            if n:
                log.info("erasure: %d snapshot chunks changed", n)
        if self._pending is None or self._pending.done():
            self._pending = asyncio.create_task(self._save_soon(), name="erasure-save")

    async def _save_soon(self) -> None:
        await asyncio.sleep(SAVE_AFTER_S)
        try:
            await self.save()
        except OSError as exc:  # the periodic save tries again
            log.warning("could not save the index after an erasure: %s", exc)

    async def stop(self) -> None:
        if self._pending is not None:
            with contextlib.suppress(Exception):
                await self._pending
