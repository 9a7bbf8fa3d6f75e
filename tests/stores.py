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
                    msgs = await sub.fetch(1000, timeout=0.3)
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
        raw = [n.encode() for n in needles]
        found = []
        async for key in self.redis.scan_iter(match=f"{self.env['KAIROS_REDIS_PREFIX']}:*"):
            kind = (await self.redis.type(key)).decode()
            value: Any
            if kind == "string":
                value = await self.redis.get(key)
            elif kind == "hash":
                value = await self.redis.hgetall(key)
            elif kind == "set":
                value = await self.redis.smembers(key)
            elif kind == "zset":
                value = await self.redis.zrange(key, 0, -1)
            elif kind == "list":
                value = await self.redis.lrange(key, 0, -1)
            elif kind == "stream":
                value = await self.redis.xrange(key)
            else:
                value = b""
            text = key + repr(value).encode()
            if any(n in text for n in raw):
                found.append(f"redis:{key.decode()}")
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
