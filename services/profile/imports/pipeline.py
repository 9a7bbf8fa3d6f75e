"""An import request from body to committed batches: parse, stage, merge, project, announce."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from services.profile.customers import service
from services.profile.imports.parser import Parsed, Row, parse_batch_yielding
from services.profile.imports.reader import batches
from services.profile.imports.repository import ConcurrentClaim, ImportRepository, docs_of
from services.profile.projection import Doc, Projection
from shared.bus import STREAM_MAX_AGE_S
from shared.contracts.bus import ProfileImported
from shared.db import Database, is_transient
from shared.errors import Unavailable
from shared.events import utcnow

log = logging.getLogger("kairos.profile.import")

BATCH = 5000
IN_FLIGHT = 2  # batch transactions at once: the next is staged while one merges
MAX_ERRORS = 1000  # errors listed in the answer; ``failed`` counts them all
ATTEMPTS = 6
CHANGED = ["attributes", "tags", "consents", "identities"]
# Another transaction got in the way: deadlock, serialisation, unique violation (a
# concurrent insert of the same id or identity). Retrying the batch resolves it.
RETRY_SQLSTATES = {"40001", "40P01", "23505"}


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, ConcurrentClaim) or is_transient(exc):
        return True
    orig = getattr(exc, "orig", exc)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code in RETRY_SQLSTATES


@dataclass
class Outcome:
    imported: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    failed: int = 0

    def fail(self, errs: list[dict[str, Any]]) -> None:
        self.failed += len(errs)
        room = MAX_ERRORS - len(self.errors)
        if room > 0:
            self.errors.extend(errs[:room])


@dataclass
class Written:
    """One committed batch: how many lines it kept, the lines it refused, and what its
    projection documents are made of (the written rows, the lines kept, the time)."""

    imported: int
    errors: list[dict[str, Any]]
    rows: list[Sequence[Any]]
    lines: dict[str, Row]
    now: datetime

    def docs(self) -> list[Doc]:
        """Put together after the commit, outside the batch's task: the next batch, which
        merges once this task is done, does not wait for them."""
        return docs_of(self.rows, self.lines, self.now)


class PreviousBatchFailed(Exception):
    """The batch before this one did not commit: this one must not commit after it."""


async def write_batch(db: Database, parsed: Parsed, after: asyncio.Task[Any] | None) -> Written:
    """One transaction: stage, apply the identity rule, merge, announce; returns the
    projection documents of what it wrote.

    ``after`` is the previous batch's write, still in flight: this batch stages and checks
    its lines meanwhile, and merges only once that one has committed, so a later line always
    lands after an earlier one (a customer's row lock would otherwise decide)."""
    now = utcnow()
    async with db.transaction() as uow:
        repo = ImportRepository(uow.session)
        await repo.stage(parsed.rows)
        refused: dict[int, dict[str, Any]] = {}
        for line, into in await repo.merged_away():
            refused[line] = {
                "line": line,
                "field": "customer_id",
                "detail": f"customer_id: was merged into '{into}'; import into that id",
            }
        conflicts = service.conflict_errors(await repo.conflicts())
        if after is not None:
            if conflicts and not after.done():
                await _committed(after)
                # The previous batch may have released an identity this one claims. (One it
                # took is caught by the merge, which then retries the batch.)
                conflicts = service.conflict_errors(await repo.conflicts())
            await _committed(after)
        for line, errs in conflicts.items():
            if line not in refused:
                e = errs[0]
                refused[line] = {
                    "line": line,
                    "field": e["field"],
                    "detail": f"{e['field']}: {e['msg']}",
                }
        await repo.drop_lines(sorted(refused))
        # The last line of each customer (rows are in line order), as the merge keeps it.
        kept = {r[1]: r for r in parsed.rows if r[0] not in refused}
        # The projection comes back from the writes themselves: exactly what commits.
        batch_id, written = await repo.merge(now)
        if len(written) != len(kept):
            raise ConcurrentClaim("a customer was merged away meanwhile")
        if written:
            announce = ProfileImported(batch_id=batch_id, count=len(written), changed=CHANGED)
            uow.emit(*announce.to_event(source=service.SOURCE))
    n = sum(1 for r in parsed.rows if r[0] not in refused)
    return Written(n, sorted(refused.values(), key=lambda e: e["line"]), written, kept, now)


async def _committed(previous: asyncio.Task[Any]) -> None:
    """Wait until the previous batch has committed; raise if it never will."""
    try:
        await asyncio.shield(previous)
    except asyncio.CancelledError:
        if previous.cancelled():
            raise PreviousBatchFailed() from None
        raise  # this batch itself is being cancelled
    except Exception as exc:
        raise PreviousBatchFailed() from exc


async def _write_with_retries(
    db: Database, parsed: Parsed, first_line: int, after: asyncio.Task[Any] | None
) -> Written:
    for attempt in range(ATTEMPTS):
        try:
            return await write_batch(db, parsed, after)
        except Exception as exc:
            if not _retryable(exc) or attempt == ATTEMPTS - 1:
                if _retryable(exc):
                    raise Unavailable(
                        f"The import stopped at line {first_line}: the database is not"
                        " available. The lines before it are imported; importing the file"
                        " again is safe."
                    ) from exc
                raise
            log.info("import batch from line %d retried: %r", first_line, exc)
            await asyncio.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


async def prune(db: Database) -> None:
    """Forget announcements older than the PROFILE stream keeps messages."""
    async with db.transaction() as uow:
        await ImportRepository(uow.session).prune(utcnow() - timedelta(seconds=STREAM_MAX_AGE_S))


async def run_import(
    db: Database,
    projection: Projection,
    body: AsyncIterable[bytes],
    content_encoding: str | None,
    *,
    batch_size: int = BATCH,
) -> Outcome:
    """Import a streamed NDJSON body. Batch n+1 is parsed, staged and checked while batch n
    is written (two transactions in flight, one core each for this process and Postgres);
    batches merge and commit one after another in file order, so a later line always sees
    an earlier one. Each committed batch's projection goes to Redis while the next ones are
    written."""
    out = Outcome()
    await prune(db)
    writing: deque[asyncio.Task[Written]] = deque()
    projecting: asyncio.Task[list[str]] | None = None

    async def settle() -> None:
        """Wait for the oldest write in flight; its projection goes to Redis meanwhile."""
        nonlocal projecting
        done = await writing.popleft()
        out.imported += done.imported
        out.fail(done.errors)
        if projecting is not None:
            await projecting
        projecting = asyncio.create_task(projection.write_many(done.docs()))

    try:
        async for lines in batches(body, content_encoding, batch_size):
            parsed = await parse_batch_yielding(lines)
            if len(writing) >= IN_FLIGHT:
                await settle()
            out.fail(parsed.errors)
            if parsed.rows:
                after = writing[-1] if writing else None
                writing.append(
                    asyncio.create_task(_write_with_retries(db, parsed, lines[0][0], after))
                )
        while writing:
            await settle()
        if projecting is not None:
            await projecting
            projecting = None
    finally:
        # The body broke off (or was refused): a batch being written commits or rolls
        # back as a whole, never half; wait for it rather than cancel it mid-commit. What
        # committed still gets its projection (decisions read the profile from there).
        for task in (*writing, projecting):
            if task is not None:
                with contextlib.suppress(Exception):
                    await task
        for task in writing:
            if not task.cancelled() and task.exception() is None:
                with contextlib.suppress(Exception):
                    await projection.write_many(task.result().docs())
    out.errors.sort(key=lambda e: e["line"])
    return out
