"""A stack of its own for the contract tests: schemathesis writes whatever the schema allows
(contact policies, campaigns, customers), which must not leak into the other tests' stack."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from shared.embedded import free_port
from shared.migrate import drop_database
from shared.stack import Stack
from tests.conftest import KEYS, RUN_ID, _env, _forget_namespaces
from tests.peers.base import Peer

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str, *candidates: Path) -> str | None:
    """A command-line tool: the first candidate that exists, else from PATH."""
    for path in candidates:
        if path.exists():
            return str(path)
    return shutil.which(name)


def missing_tool(what: str) -> None:
    """A tool the contract tests need is absent: a failure in CI, a skip on a laptop."""
    msg = f"{what} is not installed (make tools / make install)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def _distinct_ports(env: dict[str, str], *names: str) -> dict[str, int]:
    """Free ports for the embedded servers, none equal to a process's (free_port only knows
    what is bound now, and the processes bind later)."""
    taken = {int(v) for k, v in env.items() if k.endswith("_PORT") and v.isdigit()}
    out: dict[str, int] = {}
    for name in names:
        port = free_port()
        while port in taken:
            port = free_port()
        taken.add(port)
        out[name] = port
    return out


@pytest.fixture(scope="session")
def contract_stack(
    tmp_path_factory: pytest.TempPathFactory, peers: dict[str, Peer]
) -> Iterator[Stack]:
    env = _env()
    suffix = f"{RUN_ID}c"
    env.update(KAIROS_BUS_PREFIX=f"t{suffix}", KAIROS_REDIS_PREFIX=f"t{suffix}")
    external_db = bool(env.get("KAIROS_DATABASE_URL"))
    if external_db:
        url = make_url(env["KAIROS_DATABASE_URL"]).set(database=f"kairos_test_{suffix}")
        env["KAIROS_DATABASE_URL"] = url.render_as_string(hide_password=False)
    for peer in peers.values():
        env.update(peer.env)
    st = Stack.prepare(
        tmp_path_factory.mktemp("contract-run"),
        base_env=env,
        embedded_ports=_distinct_ports(env, "pg_port", "redis_port", "nats_port"),
    )
    try:
        st.start_all()
        st.wait_ready()
        yield st
    finally:
        st.down()
        if external_db:
            asyncio.run(drop_database(st.env["KAIROS_DATABASE_URL"]))
        asyncio.run(_forget_namespaces(st.env))


@pytest.fixture(scope="session")
def contract_doc(contract_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The running gateway's OpenAPI document, saved to a file."""
    r = httpx.get(contract_stack.url("gateway") + "/openapi.json", timeout=10)
    r.raise_for_status()
    path = tmp_path_factory.mktemp("contract") / "openapi.json"
    path.write_bytes(r.content)
    return path


def run(
    cmd: list[str], *, timeout: float, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def admin_key() -> str:
    return KEYS["admin"]
