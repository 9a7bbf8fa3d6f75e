"""The Redis client's command packing (hiredis, in C) against redis-py's own (Python)."""

from __future__ import annotations

from typing import Any

import pytest
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from shared.redis import HiredisPackedConnection, make_redis

COMMANDS: list[tuple[Any, ...]] = [
    ("SET", "k", "é"),
    ("EVALSHA", "a" * 40, 2, "k1", "k2", "full", 600, 1.5, -0.0, 1e20, 1 / 3, b"\x00\r\n"),
    ("CONFIG GET", "maxmemory"),
    (b"HSET", b"k", memoryview(b"field"), bytearray(b"value")),
    ("SET", "big", b"x" * 100_000),
]


@pytest.mark.parametrize("args", COMMANDS, ids=[str(c[0]) for c in COMMANDS])
def test_commands_are_packed_to_the_same_bytes(args: tuple[Any, ...]) -> None:
    python, c = Connection(), HiredisPackedConnection()
    assert b"".join(c.pack_command(*args)) == b"".join(python.pack_command(*args))
    pipeline = [args, ("GET", "k")]
    assert b"".join(c.pack_commands(pipeline)) == b"".join(python.pack_commands(pipeline))


@pytest.mark.parametrize("bad", [None, True])
def test_an_argument_redis_cannot_take_is_refused_as_redis_py_refuses_it(bad: Any) -> None:
    for conn in (Connection(), HiredisPackedConnection()):
        with pytest.raises(DataError):
            conn.pack_command("SET", "k", bad)


def test_tcp_clients_pack_with_hiredis_others_keep_their_class() -> None:
    tcp = make_redis("redis://127.0.0.1:6379/0")
    assert tcp.connection_pool.connection_class is HiredisPackedConnection
    unix = make_redis("unix:///tmp/redis.sock")
    assert unix.connection_pool.connection_class is not HiredisPackedConnection
