"""E-mails/s to the SMTP peer and SMS/s to the SMS peer through the production provider
classes: ``.venv/bin/python -m bench.mail_sms [--runs 5]``.

Each peer runs in a process of its own (so the client's figures are not shared with the
server's GIL), the providers are built by their ``from_settings`` as dispatch builds them,
and each run sends a fixed number of messages with as many in flight as dispatch allows
(``KAIROS_DISPATCH_CONCURRENCY``). Medians of several runs are printed and written to
``bench/results/mail_sms-<UTC time>.json``. Goals: ≥ 1,000 e-mails/s, ≥ 2,000 SMS/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from services.dispatch.channels import email as email_channel
from services.dispatch.channels import sms as sms_channel
from services.dispatch.channels.base import Outgoing, Provider, Result
from shared.contracts.bus import Address, DispatchRequested
from shared.links import LinkSigner
from shared.settings import Settings

RESULTS = Path(__file__).parent / "results"
LINKS = LinkSigner("bench-link-secret-0123456789abcdef", "https://go.kairos.test")
HTML = (
    "<html><body><h1>Your EU roaming pack</h1><p>Hi Ana, travel without bill shock: "
    '<a href="https://shop.example/eu?src=mail">book the EU pack</a> for 4 € a week, or '
    '<a href="https://shop.example/help">ask us</a>.</p></body></html>'
)


def _serve_peer(name: str, tmp: str, conn: Connection) -> None:
    """A peer in its own process: send its env, answer ``count``, stop on ``stop``."""
    import importlib

    module = importlib.import_module(f"tests.peers.{name}")
    peer = module.start(Path(tmp))
    if hasattr(peer, "callbacks_enabled"):
        peer.callbacks_enabled = False  # status callbacks would go to a gateway not running
    conn.send(peer.env)
    while True:
        command = conn.recv()
        if command == "count":
            conn.send((peer.count(), time.process_time()))
        else:
            peer.stop()
            conn.send("stopped")
            return


class PeerProcess:
    """Starts ``tests/peers/<name>.py`` in a child process."""

    def __init__(self, name: str, tmp: Path) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve_peer, args=(name, str(tmp), child), daemon=True)
        self.proc.start()
        self.env: dict[str, str] = self.conn.recv()

    def count(self) -> tuple[int, float]:
        """(messages received, the peer process's CPU seconds so far)."""
        self.conn.send("count")
        n, cpu = self.conn.recv()
        return int(n), float(cpu)

    def stop(self) -> None:
        self.conn.send("stop")
        self.conn.recv()
        self.proc.join(10)


def _settings(env: dict[str, str], **extra: Any) -> Settings:
    fields = {k.removeprefix("KAIROS_").lower(): v for k, v in env.items()}
    return Settings(**{**fields, "public_url": "https://go.kairos.test", **extra})


def _email(i: int) -> Outgoing:
    req = DispatchRequested(
        tracking_id=f"bench-{uuid.uuid4().hex}",
        idempotency_key=str(i),
        customer_id=f"c-{i}",
        campaign_id="cmp-bench",
        channel="email",
        address=Address(email=f"c{i}@customers.example"),
        content={"subject": "Your EU roaming pack", "html": HTML, "text": "Book the EU pack."},
    )
    return Outgoing(req, LINKS)


def _sms(i: int) -> Outgoing:
    req = DispatchRequested(
        tracking_id=f"bench-{uuid.uuid4().hex}",
        idempotency_key=str(i),
        customer_id=f"c-{i}",
        campaign_id="cmp-bench",
        channel="sms",
        address=Address(msisdn=f"+4915{i:09d}"),
        content={"text": "Travel without bill shock: reply 1 to book the EU pack for 4€/week."},
    )
    return Outgoing(req, LINKS)


async def _run(
    provider: Provider, make: Callable[[int], Outgoing], n: int, concurrency: int
) -> tuple[float, dict[str, int]]:
    """Send ``n`` messages with ``concurrency`` in flight; (messages/s, results by kind)."""
    messages = [make(i) for i in range(n)]
    kinds: dict[str, int] = {}
    queue = iter(messages)

    async def worker() -> None:
        for out in queue:
            result: Result = await provider.send(out)
            kinds[result.kind] = kinds.get(result.kind, 0) + 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - start), kinds


async def _measure(
    label: str,
    build: Callable[[], Provider | None],
    make: Callable[[int], Outgoing],
    peer: PeerProcess,
    *,
    n: int,
    runs: int,
    concurrency: int,
) -> dict[str, Any]:
    provider = build()
    assert provider is not None, f"{label}: provider not configured"
    await provider.start()
    try:
        await _run(provider, make, min(200, n), concurrency)  # warm-up: connections, TLS
        rates: list[float] = []
        client_us: list[float] = []
        peer_us: list[float] = []
        for r in range(runs):
            before, peer_cpu = peer.count()
            cpu = time.process_time()
            rate, kinds = await _run(provider, make, n, concurrency)
            client_us.append((time.process_time() - cpu) / n * 1e6)
            after, peer_cpu_after = peer.count()
            peer_us.append((peer_cpu_after - peer_cpu) / n * 1e6)
            received = after - before
            if kinds != {"sent": n} or received != n:
                raise RuntimeError(f"{label} run {r}: {kinds}, the peer received {received}")
            rates.append(rate)
            print(  # noqa: T201
                f"  {label} run {r + 1}: {rate:,.0f}/s; CPU per message: client "
                f"{client_us[-1]:.0f} µs, peer {peer_us[-1]:.0f} µs"
            )
    finally:
        await provider.close()
    client = statistics.median(client_us)
    return {
        "median_per_s": round(statistics.median(rates)),
        "runs_per_s": [round(x) for x in rates],
        # CPU time is what the machine's load does not distort: one core of the client
        # process sends 1e6 / client_cpu_us messages per second.
        "client_cpu_us_per_message": round(client, 1),
        "client_per_core_per_s": round(1e6 / client),
        "peer_cpu_us_per_message": round(statistics.median(peer_us), 1),
        "messages_per_run": n,
        "in_flight": concurrency,
    }


async def main(runs: int, emails: int, texts: int) -> dict[str, Any]:
    """Every figure of this benchmark."""
    concurrency = int(os.environ.get("KAIROS_DISPATCH_CONCURRENCY", "64"))
    with tempfile.TemporaryDirectory() as tmp:
        smtp = PeerProcess("smtp", Path(tmp) / "smtp")
        sms = PeerProcess("sms", Path(tmp) / "sms")
        try:
            plain = {k: v for k, v in smtp.env.items() if "DKIM" not in k}
            connections = int(os.environ.get("KAIROS_SMTP_CONNECTIONS", "8"))
            figures = {
                "email": await _measure(
                    "e-mail",
                    lambda: email_channel.from_settings(
                        _settings(plain, smtp_connections=connections)
                    ),
                    _email,
                    smtp,
                    n=emails,
                    runs=runs,
                    concurrency=concurrency,
                ),
                "email_dkim": await _measure(
                    "e-mail + DKIM",
                    lambda: email_channel.from_settings(
                        _settings(smtp.env, smtp_connections=connections)
                    ),
                    _email,
                    smtp,
                    n=max(200, emails // 5),
                    runs=runs,
                    concurrency=concurrency,
                ),
                "sms": await _measure(
                    "SMS",
                    lambda: sms_channel.from_settings(_settings(sms.env)),
                    _sms,
                    sms,
                    n=texts,
                    runs=runs,
                    concurrency=concurrency,
                ),
            }
            figures["email"]["smtp_connections"] = connections
            figures["email_dkim"]["smtp_connections"] = connections
        finally:
            smtp.stop()
            sms.stop()
    return figures


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--emails", type=int, default=5_000)
    parser.add_argument("--texts", type=int, default=10_000)
    args = parser.parse_args()
    figures = asyncio.run(main(args.runs, args.emails, args.texts))
    goals = {"email": 1_000, "sms": 2_000}
    print()  # noqa: T201
    for name, fig in figures.items():
        goal = goals.get(name)
        mark = (
            ""
            if goal is None
            else f"  (goal ≥ {goal:,}/s: {'met' if fig['median_per_s'] >= goal else 'MISSED'})"
        )
        print(  # noqa: T201
            f"{name:>11}: median {fig['median_per_s']:,}/s over {len(fig['runs_per_s'])} runs"
            f"{mark}; client CPU {fig['client_cpu_us_per_message']} µs/message "
            f"(one core: {fig['client_per_core_per_s']:,}/s)"
        )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"mail_sms-{stamp}.json"
    doc = {
        "bench": "mail_sms",
        "time": stamp,
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            # Other processes share the machine: wall-clock rates depend on this.
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "goals_per_s": goals,
        "figures": figures,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"written to {path}")  # noqa: T201


if __name__ == "__main__":
    cli()
