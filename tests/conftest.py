"""Real servers for the tests: the ones named by KAIROS_*_URL, else embedded ones.

Each run is isolated: its own database (on an external server), bus prefix and
Redis key prefix, and its own ports for the six processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from shared.bus import Bus
from shared.embedded import free_port
from shared.migrate import drop_database
from shared.stack import PROCESSES, Stack
from tests.peers.base import Peer

RUN_ID = uuid.uuid4().hex[:8]
KEYS = {
    "admin": "test-admin-key-" + RUN_ID * 2,
    "reader": "test-reader-key-" + RUN_ID * 2,
    "writer": "test-writer-key-" + RUN_ID * 2,
    "events": "test-events-key-" + RUN_ID * 2,
    "nothing": "test-nothing-key-" + RUN_ID * 2,
    "marketer": "test-marketer-key-" + RUN_ID * 2,
    "approver": "test-approver-key-" + RUN_ID * 2,
    "pos": "test-pos-key-" + RUN_ID * 2,
}
SCOPES = {
    "admin": ["admin"],
    "reader": ["customers:read"],
    "writer": ["customers:write", "customers:read"],
    "events": ["events:write"],
    "nothing": ["reports:read"],
    "marketer": ["catalog:write"],
    "approver": ["catalog:write", "campaigns:approve"],
    "pos": ["decisions:write"],
}


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KAIROS_")
        or k in ("KAIROS_DATABASE_URL", "KAIROS_REDIS_URL", "KAIROS_NATS_URL")
    }
    env.update(
        KAIROS_ENV="test",
        KAIROS_BUS_PREFIX=f"t{RUN_ID}",
        KAIROS_REDIS_PREFIX=f"t{RUN_ID}",
        KAIROS_API_KEYS=json.dumps(
            [{"name": f"test-{n}", "key": KEYS[n], "scopes": SCOPES[n]} for n in KEYS]
        ),
        KAIROS_CONSUMER_MAX_DELIVER="3",
        KAIROS_DECISION_RUN_PAGE="50",  # many checkpoints even for small test audiences
        KAIROS_LOG_LEVEL="INFO",
    )
    if env.get("KAIROS_DATABASE_URL"):
        url = make_url(env["KAIROS_DATABASE_URL"]).set(database=f"kairos_test_{RUN_ID}")
        env["KAIROS_DATABASE_URL"] = url.render_as_string(hide_password=False)
    for name in PROCESSES:
        env[f"KAIROS_{name.upper()}_PORT"] = str(free_port())
    env["KAIROS_PUBLIC_URL"] = f"http://127.0.0.1:{env['KAIROS_GATEWAY_PORT']}"
    return env


# The providers' protocol peers (tests/peers/<name>.py, each ``start(dir) -> Peer``) the
# suite's dispatch process is pointed at. FCM is left out on purpose: Android pushes then go
# to the local outbox, the embedded default, which the tests read (its own tests start an
# FCM peer of their own).
PEERS = ("apns", "webpush", "smtp", "sms", "rewards")


@pytest.fixture(scope="session")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Peer]]:
    """Every provider peer, started once for the run."""
    started: dict[str, Peer] = {}
    try:
        for name in PEERS:
            try:
                module = importlib.import_module(f"tests.peers.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"tests.peers.{name}":
                    raise
                continue
            started[name] = module.start(tmp_path_factory.mktemp(f"peer-{name}"))
        yield started
    finally:
        for peer in started.values():
            with contextlib.suppress(Exception):
                peer.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, peers: dict[str, Peer]) -> Iterator[Stack]:
    """The whole suite as real processes on real Postgres, Redis and NATS."""
    run_dir: Path = tmp_path_factory.mktemp("run")
    external_db = bool(os.environ.get("KAIROS_DATABASE_URL"))
    env = _env()
    for peer in peers.values():
        env.update(peer.env)
    st = Stack.prepare(
        run_dir,
        base_env=env,
        embedded_ports={
            "pg_port": free_port(),
            "redis_port": free_port(),
            "nats_port": free_port(),
        },
    )
    try:
        st.start_all()
        st.wait_ready()
        yield st
    finally:
        st.down()
        if external_db:
            asyncio.run(drop_database(st.env["KAIROS_DATABASE_URL"]))
        asyncio.run(_forget_namespaces(st.env))  # only touches servers named by KAIROS_*_URL
        for name in PROCESSES:  # leave the logs where CI prints them on failure
            log = run_dir / "logs" / f"{name}.log"
            if log.exists() and os.environ.get("KAIROS_TEST_SHOW_LOGS"):
                print(log.read_text()[-4000:])  # noqa: T201


async def _forget_namespaces(env: dict[str, str]) -> None:
    """Leave shared servers as they were: drop this run's streams and Redis keys."""
    from redis.asyncio import Redis

    from shared.bus import Bus

    bus = Bus(env["KAIROS_NATS_URL"], prefix=env["KAIROS_BUS_PREFIX"])
    if os.environ.get("KAIROS_NATS_URL"):
        await _drop_streams(bus)
    if os.environ.get("KAIROS_REDIS_URL"):
        r = Redis.from_url(env["KAIROS_REDIS_URL"])
        async for key in r.scan_iter(match=f"{env['KAIROS_REDIS_PREFIX']}:*", count=1000):
            await r.delete(key)
        await r.aclose()


async def _drop_streams(bus: object) -> None:
    import nats

    from shared.bus import STREAMS, Bus

    assert isinstance(bus, Bus)
    with contextlib.suppress(Exception):  # cleanup is best effort
        nc = await nats.connect(bus.url)
        js = nc.jetstream()
        for name in STREAMS:
            with contextlib.suppress(Exception):
                await js.delete_stream(bus.stream(name))
        await nc.close()


@pytest.fixture
async def scratch_bus(stack: Stack) -> AsyncIterator[Bus]:
    """A bus of the test's own on the run's NATS: streams under a fresh prefix, dropped
    afterwards."""
    b = Bus(stack.env["KAIROS_NATS_URL"], prefix=f"s{uuid.uuid4().hex[:8]}")
    await b.connect()
    yield b
    await _drop_streams(b)
    await b.close()


def auth(name: str = "admin") -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="session")
async def gw(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the gateway with the admin key."""
    async with httpx.AsyncClient(base_url=stack.url("gateway"), headers=auth(), timeout=20) as c:
        yield c


@pytest.fixture
def cid() -> str:
    """A fresh customer id per test."""
    return f"c-{uuid.uuid4().hex[:12]}"
