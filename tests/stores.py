"""Every store of a running stack read whole: where does a customer's personal data remain?
(The erasure test and ``python -m bench erasure`` scan with it.)"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nats
import sqlalchemy as sa
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from shared.bus import STREAMS
from shared.stack import Stack

READ: dict[str, Any] = {
    "string": lambda p, k: p.get(k),
    "hash": lambda p, k: p.hgetall(k),
    "set": lambda p, k: p.smembers(k),
    "zset": lambda p, k: p.zrange(k, 0, -1),
    "list": lambda p, k: p.lrange(k, 0, -1),
    "stream": lambda p, k: p.xrange(k),
}
SCHEMAS = ("profile", "decision", "dispatch", "feedback", "selection")


class Stores:
    """Reads every store of the stack whole and says where any of the needles is."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.env = stack.env
        self.prefix = self.env["KAIROS_BUS_PREFIX"]

    async def __aenter__(self) -> Stores:
        self.nc = await nats.connect(self.env["KAIROS_NATS_URL"])
        self.js = self.nc.jetstream()
        self.redis = Redis.from_url(self.env["KAIROS_REDIS_URL"])
        self.db: AsyncEngine = create_async_engine(self.env["KAIROS_DATABASE_URL"])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()
        await self.redis.aclose()
        await self.db.dispose()

    async def find(self, needles: list[str]) -> list[str]:
        """Where the needles are: ``stream:<name>:<subject>``, ``redis:<key>``,
        ``table:<schema>.<table>``, ``file:<path>``."""
        found = await self._streams(needles)
        found += await self._redis(needles)
        found += await self._tables(needles)
        found += self.files(needles)
        return found

    async def _streams(self, needles: list[str]) -> list[str]:
        found = []
        for name in STREAMS:
            found += await self.stream(name, needles)
        return found

    async def stream(self, name: str, needles: list[str]) -> list[str]:
        """``stream:<name>:<subject>`` of every message of one stream holding a needle."""
        raw = [n.encode() for n in needles]
        found: list[str] = []
        stream = f"{self.prefix.upper()}_{name}"
        info = await self.js.stream_info(stream)
        if not info.state.messages:
            return found
        sub = await self.js.pull_subscribe(
            f"{self.prefix}.>",
            stream=stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.ALL,
                inactive_threshold=10.0,
            ),
        )
        try:
            while True:
                try:
                    msgs = await sub.fetch(5000, timeout=0.3)
                except TimeoutError:
                    break
                for m in msgs:
                    text = m.data + m.subject.encode() + repr(m.headers).encode()
                    if any(n in text for n in raw):
                        found.append(f"stream:{name}:{m.subject}")
                if not msgs or (msgs[-1].metadata.num_pending or 0) == 0:
                    break
        finally:
            await sub.unsubscribe()
        return found

    async def _redis(self, needles: list[str]) -> list[str]:
        """Every key of the run and its whole value, read in pipelined pages."""
        raw = [n.encode() for n in needles]
        found = []
        cursor: Any = 0
        match = f"{self.env['KAIROS_REDIS_PREFIX']}:*"
        while True:
            cursor, keys = await self.redis.scan(cursor, match=match, count=2000)
            if keys:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.type(key)
                    kinds = await pipe.execute()
                async with self.redis.pipeline(transaction=False) as pipe:
                    for key, kind in zip(keys, kinds, strict=True):
                        read = READ.get(kind.decode() if isinstance(kind, bytes) else kind)
                        if read is None:
                            pipe.exists(key)
                        else:
                            read(pipe, key)
                    values = await pipe.execute()
                for key, value in zip(keys, values, strict=True):
                    if any(n in key + repr(value).encode() for n in raw):
                        found.append(f"redis:{key.decode()}")
            if not cursor:
                return found

    async def _tables(self, needles: list[str]) -> list[str]:
        found = []
        patterns = [f"%{n}%" for n in needles]
        async with self.db.connect() as conn:
            tables = (
                await conn.execute(
                    sa.text(
                        "SELECT table_schema, table_name FROM information_schema.tables"
                        " WHERE table_schema = ANY(:s) AND table_type = 'BASE TABLE'"
                    ),
                    {"s": list(SCHEMAS)},
                )
            ).all()
            assert len(tables) > 10, tables  # every service's tables are there to scan
            for schema, table in tables:
                n = await conn.scalar(
                    sa.text(
                        f'SELECT count(*) FROM "{schema}"."{table}" AS t'
                        " WHERE t::text LIKE ANY(CAST(:p AS text[]))"
                    ),
                    {"p": patterns},
                )
                if n:
                    found.append(f"table:{schema}.{table}")
        return found

    def index_file(self) -> Path:
        base = self.env.get("KAIROS_SELECTION_INDEX_DIR") or os.path.join(
            self.env["KAIROS_RUN_DIR"], "selection"
        )
        return Path(base) / "index.pickle"

    def files(self, needles: list[str]) -> list[str]:
        path = self.index_file()
        if not path.exists():
            return []
        data = path.read_bytes()
        return [f"file:{path}" for n in needles if n.encode() in data]
