"""An import request from body to committed batches: parse, stage, merge, project, announce."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from services.profile.customers import service
from services.profile.customers.repository import CustomerRepository
from services.profile.imports.parser import Parsed, parse_batch
from services.profile.imports.reader import batches
from services.profile.imports.repository import ConcurrentClaim, ImportRepository
from services.profile.projection import Doc, Projection
from shared.contracts.bus import ProfileChanged
from shared.db import Database, is_transient
from shared.errors import Unavailable
from shared.events import utcnow

log = logging.getLogger("kairos.profile.import")

BATCH = 5000
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
    """One committed batch: how many lines it kept, the lines it refused, and the
    projection documents to write."""

    imported: int
    errors: list[dict[str, Any]]
    docs: list[Doc]


async def write_batch(db: Database, parsed: Parsed) -> Written:
    """One transaction: stage, apply the identity rule, merge, outbox, projection read-back."""
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
        conflicts = await service.identity_conflicts(CustomerRepository(uow.session), parsed.claims)
        for line, errs in conflicts.items():
            if line not in refused:
                e = errs[0]
                refused[line] = {
                    "line": line,
                    "field": e["field"],
                    "detail": f"{e['field']}: {e['msg']}",
                }
        await repo.drop_lines(sorted(refused))
        kept = [r for r in parsed.rows if r[0] not in refused]
        versions = await repo.merge(now)
        if len(versions) != len({r[1] for r in kept}):
            raise ConcurrentClaim("a customer was merged away meanwhile")
        outbox = []
        for cid, v in versions.items():
            msg = ProfileChanged(customer_id=cid, version=v, changed=CHANGED, source="import")
            subject, envelope = msg.outbox_item(source=service.SOURCE)
            outbox.append((subject, orjson.dumps(envelope)))
        await repo.outbox(outbox)
        # Read back in the same transaction: what is projected is exactly what commits.
        docs = await CustomerRepository(uow.session).projection_docs(list(versions))
    db.outbox_signal.set()
    return Written(len(kept), sorted(refused.values(), key=lambda e: e["line"]), docs)


async def _write_with_retries(db: Database, parsed: Parsed, first_line: int) -> Written:
    for attempt in range(ATTEMPTS):
        try:
            return await write_batch(db, parsed)
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


async def run_import(
    db: Database,
    projection: Projection,
    body: AsyncIterable[bytes],
    content_encoding: str | None,
    *,
    batch_size: int = BATCH,
) -> Outcome:
    """Import a streamed NDJSON body. Batch n+1 is parsed while batch n is written; batches
    commit one after another in file order, so a later line always sees an earlier one.
    Each committed batch's projection goes to Redis while the next batch is written."""
    out = Outcome()
    writing: asyncio.Task[Written] | None = None
    projecting: asyncio.Task[list[str]] | None = None

    async def settle() -> None:
        nonlocal writing, projecting
        if writing is None:
            return
        done = await writing
        writing = None
        out.imported += done.imported
        out.fail(done.errors)
        if projecting is not None:
            await projecting
        projecting = asyncio.create_task(projection.write_many(done.docs))

    try:
        async for lines in batches(body, content_encoding, batch_size):
            parsed = parse_batch(lines)
            await settle()  # batches commit in order: one write at a time
            out.fail(parsed.errors)
            if parsed.rows:
                writing = asyncio.create_task(_write_with_retries(db, parsed, lines[0][0]))
        await settle()
        if projecting is not None:
            await projecting
            projecting = None
    finally:
        # The body broke off (or was refused): the batch being written commits or rolls
        # back as a whole, never half; wait for it rather than cancel it mid-commit.
        for task in (writing, projecting):
            if task is not None:
                with contextlib.suppress(Exception):
                    await task
    out.errors.sort(key=lambda e: e["line"])
    return out
