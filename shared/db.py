"""Postgres: async engine, per-service schema, unit of work, repository base, outbox relay."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Generic, TypeVar

import orjson
import sqlalchemy as sa
from fastapi import Request
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlmodel import SQLModel

from shared.bus import Bus
from shared.events import CloudEvent

log = logging.getLogger("kairos.db")

# A dependency being unavailable (the database, the network): worth waiting for, never a
# reason to dead-letter a message.
_UNAVAILABLE = (OperationalError, InterfaceError, ConnectionError, TimeoutError, OSError)


# SQLSTATE classes of "the server cannot serve this now": connection exceptions (08),
# insufficient resources (53: "too many clients", out of memory, disk full) and operator
# intervention (57P01-57P05: shutdown, crash recovery, "cannot connect now"). A statement
# timeout (57014) is the caller's own bound and stays what it is.
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "53", "57P")
_UNAVAILABLE_ALL = (*_UNAVAILABLE, RedisConnectionError, RedisTimeoutError, BusyLoadingError)
# Two transactions that met (a deadlock, a serialization failure): the loser was rolled
# back whole and succeeds when run again.
_RETRY_SQLSTATES = frozenset({"40P01", "40001"})


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a Postgres error, raw (asyncpg) or wrapped (SQLAlchemy)."""
    for e in (exc, getattr(exc, "orig", None), getattr(exc, "__cause__", None)):
        code = getattr(e, "sqlstate", None)
        if isinstance(code, str):
            return code
    orig = getattr(exc, "orig", None)
    code = getattr(getattr(orig, "__cause__", None), "sqlstate", None)
    return code if isinstance(code, str) else None


def is_conflict(exc: BaseException) -> bool:
    """The transaction lost a deadlock or a serialization conflict to another one."""
    return _sqlstate(exc) in _RETRY_SQLSTATES


def is_transient(exc: BaseException) -> bool:
    """A dependency (Postgres, Redis, the network) is unavailable, or the transaction lost a
    deadlock or a serialization conflict: retry later rather than give up. The one rule
    behind both a consumer's nak and an HTTP 503 with Retry-After."""
    if isinstance(exc, _UNAVAILABLE_ALL):
        return True
    code = _sqlstate(exc)
    if code is not None and code.startswith(_TRANSIENT_SQLSTATE_PREFIXES):
        return True
    if is_conflict(exc):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
SQLModel.metadata.naming_convention = NAMING_CONVENTION


def make_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An asyncpg engine with a bounded pool; JSON through orjson."""
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # A pooled connection that a Postgres restart broke is found at checkout and replaced,
        # rather than failing the first request after the restart (one cheap round trip).
        pool_pre_ping=True,
        pool_recycle=1800,
        # Plan each statement for its actual arguments: a generic plan cached while a table
        # was empty turns `= ANY(:ids)` lookups into sequential scans once it has grown.
        # No JIT: every statement here is short, and a misestimated one (a temporary table
        # has no statistics) spent 200 ms compiling to save nothing (an import batch's
        # identity check took 290 ms instead of 70).
        connect_args={"server_settings": {"plan_cache_mode": "force_custom_plan", "jit": "off"}},
        json_serializer=lambda v: orjson.dumps(v).decode(),
        json_deserializer=orjson.loads,
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


class UnitOfWork:
    """One transaction; events collected during it go to the outbox in the same commit."""

    def __init__(self, session: AsyncSession, schema: str, notify: asyncio.Event | None) -> None:
        self.session = session
        self.schema = schema
        self._notify = notify
        self._events: list[tuple[str, bytes]] = []

    def emit(self, subject: str, ev: CloudEvent) -> None:
        """Publish ``ev`` on ``subject`` after (and only if) this unit of work commits."""
        self._events.append((subject, ev.to_bytes()))

    def emit_envelope(self, subject: str, envelope: dict[str, Any]) -> None:
        """Like emit, for a CloudEvents envelope already built as a dict (hot paths)."""
        self._events.append((subject, orjson.dumps(envelope)))

    async def flush_outbox(self) -> None:
        if not self._events:
            return
        await self.session.execute(
            sa.text(
                f'INSERT INTO "{self.schema}".outbox (subject, payload)'
                " SELECT * FROM unnest(CAST(:s AS text[]), CAST(:p AS bytea[]))"
            ),
            {"s": [s for s, _ in self._events], "p": [p for _, p in self._events]},
        )

    def committed(self) -> None:
        if self._events and self._notify is not None:
            self._notify.set()
        self._events.clear()


class Database:
    """A service's engine, its schema and the outbox relay's wake-up signal."""

    def __init__(self, url: str, schema: str, *, pool_size: int = 10) -> None:
        self.schema = schema
        self.engine = make_engine(url, pool_size=pool_size)
        self.sessions = make_sessionmaker(self.engine)
        self.outbox_signal = asyncio.Event()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[UnitOfWork]:
        """Commit on success (outbox rows included), roll back on any error."""
        async with self.sessions() as session:
            uow = UnitOfWork(session, self.schema, self.outbox_signal)
            try:
                yield uow
                await uow.flush_outbox()
                await session.commit()
            except BaseException:
                await session.rollback()
                raise
            uow.committed()

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()


async def get_uow(request: Request) -> AsyncIterator[UnitOfWork]:
    """FastAPI dependency: the request's unit of work (commits after the handler returns)."""
    db: Database = request.app.state.db
    async with db.transaction() as uow:
        yield uow


M = TypeVar("M", bound=SQLModel)


class Repository(Generic[M]):
    """Generic repository over one table model; all SQL lives in repositories."""

    model: type[M]

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, key: Any, *, for_update: bool = False) -> M | None:
        return await self.session.get(self.model, key, with_for_update=for_update)

    def add(self, obj: M) -> M:
        self.session.add(obj)
        return obj

    async def delete(self, obj: M) -> None:
        await self.session.delete(obj)

    async def list(self, *where: Any, limit: int = 100) -> Sequence[M]:
        stmt = sa.select(self.model).where(*where).limit(limit)
        return (await self.session.execute(stmt)).scalars().all()


def outbox_table_ddl(schema: str) -> list[str]:
    """DDL of a service's outbox table (used by each service's first migration)."""
    return [
        f'CREATE TABLE IF NOT EXISTS "{schema}".outbox ('
        " id BIGSERIAL PRIMARY KEY, subject TEXT NOT NULL, payload BYTEA NOT NULL,"
        " created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    ]


LOOKBACK_S = 60.0
LOOKBACK_EVERY_S = 5.0
STATEMENT_TIMEOUT_MS = 10_000


class OutboxRelay:
    """Publishes committed outbox rows and deletes them once JetStream has them.

    Two workers share the table (``SKIP LOCKED``), so one waiting for acks does not hold
    the other back. Within a worker's batch rows go out in order; across batches order is
    not guaranteed, which is why every event carries what a consumer needs to keep the
    newest (``profile.changed`` carries the profile version).

    Only the first worker wakes on every commit; the others join when it takes a full batch
    (a backlog). A round that took less than a full batch waits for the next commit instead
    of looking again at once. Under a trickle of commits each commit then costs one relay
    transaction rather than three (two of them finding nothing): the relay was ~17 % of the
    profile's and dispatch's CPU at 500 events/s, and this took a fifth off the profile's CPU
    at 100 events/s (README, Benchmarks).
    """

    def __init__(self, db: Database, bus: Bus, *, batch: int = 1000, workers: int = 2) -> None:
        self.db = db
        self.bus = bus
        self.batch = batch
        self.workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._backlog = asyncio.Event()  # a full batch was taken: every worker helps

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._loop(i), name=f"outbox:{self.db.schema}:{i}")
            for i in range(self.workers)
        ]

    async def stop(self) -> None:
        self._stopping = True
        self.db.outbox_signal.set()
        self._backlog.set()
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, 10)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()

    async def _loop(self, worker: int = 0) -> None:
        # A keyset floor: rows below it were relayed (their dead index entries are not
        # scanned again). A row can commit after a later id was relayed (ids are taken at
        # insert, rows become visible at commit), so every LOOKBACK_EVERY_S the worker also
        # looks from where its floor stood LOOKBACK_S ago; only the first scan starts at 0.
        floor = 0
        history: collections.deque[tuple[float, int]] = collections.deque()
        last_lookback = time.monotonic()
        while not self._stopping:
            # Clear before looking: a commit that signals from here on is not missed.
            if worker == 0:
                self.db.outbox_signal.clear()
            else:
                self._backlog.clear()
            now = time.monotonic()
            history.append((now, floor))
            while len(history) > 1 and history[1][0] <= now - LOOKBACK_S:
                history.popleft()
            start = floor
            if now - last_lookback > LOOKBACK_EVERY_S:
                start, last_lookback = history[0][1], now
            try:
                moved, lowest = await self.relay_once(start)
            except Exception as exc:
                log.warning("outbox relay %s failed: %r", self.db.schema, exc)
                moved, lowest = 0, None
                await asyncio.sleep(0.2)
            if moved > 0 and lowest is not None:
                floor = max(floor, lowest) if start == floor else floor
            if moved >= self.batch:  # more may be waiting: look again, with help
                self._backlog.set()
                continue
            wake = self.db.outbox_signal if worker == 0 else self._backlog
            with contextlib.suppress(TimeoutError):  # wake up at least twice a second
                await asyncio.wait_for(wake.wait(), 0.5)

    async def relay_once(self, floor: int = 0) -> tuple[int, int | None]:
        """Move one batch of rows with ``id >= floor``; rows are deleted only if every publish
        was acknowledged. Returns how many moved and the lowest id among them.

        The keyset floor matters after a burst: the deleted rows stay in the primary key as
        dead entries until vacuum removes them, and a scan from the start would visit every
        one of them (a million of them took minutes). The statement timeout bounds a bad
        case anyway; the next round retries."""
        schema = self.db.schema
        async with self.db.sessions() as session, session.begin():
            await session.execute(
                sa.text(f"SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT_MS}'")
            )
            # Two plain statements, not ``DELETE … WHERE id IN (SELECT … LIMIT)``: with the
            # table's statistics taken while it was nearly empty, the planner ran that
            # subquery again for every outer row, and under a backlog every round hit the
            # statement timeout (the relay stood still for ~40 s with 29,000 rows waiting).
            rows = (
                await session.execute(
                    sa.text(
                        f'SELECT id, subject, payload FROM "{schema}".outbox WHERE id >= :floor'
                        " ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED"
                    ),
                    {"n": self.batch, "floor": floor},
                )
            ).all()
            if not rows:
                return 0, None
            # Payloads are stored serialised: publish the bytes as they are.
            # If acks go missing (an overloaded connection), roll back and publish again soon;
            # Nats-Msg-Id de-duplicates what did arrive.
            await self.bus.publish_encoded(
                ((r[1], _event_id(bytes(r[2])), bytes(r[2])) for r in rows), timeout=5.0
            )
            await session.execute(
                sa.text(f'DELETE FROM "{schema}".outbox WHERE id = ANY(:ids)'),
                {"ids": [int(r[0]) for r in rows]},
            )
        return len(rows), int(rows[0][0])


_ID_HEAD = b'{"id":"'


def _event_id(payload: bytes) -> str:
    """The id of a serialised envelope: read from its head (every envelope is written with
    ``id`` first), else parsed."""
    if payload.startswith(_ID_HEAD):
        end = payload.find(b'"', len(_ID_HEAD))
        if end > 0 and b"\\" not in payload[: end + 1]:
            return payload[len(_ID_HEAD) : end].decode()
    return str(orjson.loads(payload)["id"])
