"""The fault suite's own stack: the six processes on embedded Postgres, Redis and NATS that
this suite starts itself, so it can kill and restart every one of them (servers named by
KAIROS_*_URL are shared with others and are never restarted by a test).

FAULTS_SCALE sets the load: 1 is the issue's (10,000 events, a 100,000-member batch,
10,000 messages at the peers); ``make test`` runs it at 0.02, ``make faults`` at 1.
With FAULTS_OUT set, the figures of every case go to that JSON file
(``python -m tests.faults.table`` renders them for the README).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.embedded import free_port
from shared.stack import Stack
from tests.conftest import _env, auth
from tests.peers.base import Peer

SCALE = float(os.environ.get("FAULTS_SCALE", "0.02"))
N_EVENTS = max(200, int(10_000 * SCALE))
N_BATCH = max(1_000, int(100_000 * SCALE))
N_MESSAGES = max(200, int(10_000 * SCALE))
HEADER_TIMEOUT_S = 5.0


@pytest.fixture(scope="session")
def fstack(tmp_path_factory: pytest.TempPathFactory, peers: dict[str, Peer]) -> Iterator[Stack]:
    """The whole suite on servers of its own, which the fault tests stop and start."""
    run_dir: Path = tmp_path_factory.mktemp("faults")
    env = {
        k: v
        for k, v in _env().items()
        if k not in ("KAIROS_DATABASE_URL", "KAIROS_REDIS_URL", "KAIROS_NATS_URL")
    }
    for peer in peers.values():
        env.update(peer.env)
    env.update(
        # Short enough for the slow-loris case, long enough for a loaded 2-core machine.
        KAIROS_REQUEST_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        KAIROS_REQUEST_BODY_TIMEOUT_S="10",
        KAIROS_DECISION_RUN_PAGE="500",
    )
    # The parent's ports were picked for the shared stack: pick new ones.
    for name in ("gateway", "profile", "selection", "decision", "dispatch", "feedback"):
        env[f"KAIROS_{name.upper()}_PORT"] = str(free_port())
    env["KAIROS_PUBLIC_URL"] = f"http://127.0.0.1:{env['KAIROS_GATEWAY_PORT']}"
    st = Stack.prepare(
        run_dir,
        base_env=env,
        embedded_ports={
            "pg_port": free_port(),
            "redis_port": free_port(),
            "nats_port": free_port(),
        },
    )
    assert st.embedded is not None
    try:
        st.start_all()
        st.wait_ready()
        yield st
    finally:
        st.down()
        if os.environ.get("KAIROS_TEST_SHOW_LOGS"):
            for log in sorted((run_dir / "logs").glob("*.log")):
                print(log.name, log.read_text()[-3000:])  # noqa: T201


@pytest.fixture(scope="session")
async def fgw(fstack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the fault stack's gateway with the admin key."""
    async with httpx.AsyncClient(
        base_url=fstack.url("gateway"), headers=auth(), timeout=60
    ) as client:
        yield client


class Figures:
    """The measured outcome of every case, written to FAULTS_OUT at the end of the run."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, case: str, **figures: Any) -> None:
        self.rows.append({"case": case, **figures})


@pytest.fixture(scope="session")
def figures() -> Iterator[Figures]:
    fig = Figures()
    yield fig
    out = os.environ.get("FAULTS_OUT")
    if not out or not fig.rows:
        return
    doc = {
        "command": f"FAULTS_SCALE={os.environ.get('FAULTS_SCALE', '0.02')} make faults",
        "scale": SCALE,
        "loads": {"events": N_EVENTS, "batch": N_BATCH, "messages": N_MESSAGES},
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "cases": fig.rows,
    }
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():  # a run of some cases updates those and keeps the others
        before = json.loads(path.read_text())
        if before.get("scale") == SCALE:
            ran = {r["case"] for r in fig.rows}
            doc["cases"] = [r for r in before["cases"] if r["case"] not in ran] + fig.rows
    path.write_text(json.dumps(doc, indent=2) + "\n")
