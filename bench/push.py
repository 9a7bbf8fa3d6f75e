"""Push providers' throughput: pushes per second through the production provider classes
(``ApnsProvider``, ``FcmProvider``) to their loopback protocol peers, each peer in its own
process on the same machine (client and peer share its cores, as in the tests).

``python -m bench.push [--runs 5] [--count 20000] [--concurrency 500] [--uvloop]
[--compare]`` prints the figures (median of the runs) and writes
``bench/results/push-<UTC time>.json``. ``--compare`` also measures ``httpx`` (HTTP/2) and, when
installed (``pip install aioapns``, not a dependency), ``aioapns`` against the same APNs peer
with the same notifications: the alternatives our own HTTP/2 client was chosen over.

Other work on the machine moves the wall-clock rates a lot (several sessions share its two
cores); the CPU microseconds per push of client and peer do not, and
``pushes_per_s_one_core_each`` is the rate they allow when each has a core.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import resource
import ssl
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.dispatch.channels import apns, fcm
from services.dispatch.channels.base import Outgoing, Provider, Result
from shared.contracts.bus import Device, DispatchRequested
from shared.links import LinkSigner
from shared.settings import Settings

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent


async def _peer(name: str, tmp: Path) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    """Start ``tests.peers.<name>`` in its own process; its KAIROS_* settings."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        f"tests.peers.{name}",
        str(tmp),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    return proc, json.loads(line)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), 10)
    except TimeoutError:
        proc.kill()
        await proc.wait()


def _settings(env: dict[str, str], **more: Any) -> Settings:
    fields = {k.removeprefix("KAIROS_").lower(): v for k, v in env.items()}
    return Settings(**fields, **more)


def _outgoing(platform_: str, token: str, n: int) -> Outgoing:
    request = DispatchRequested(
        tracking_id=f"bench-{n}",
        idempotency_key=f"bench-{n}",
        customer_id=f"c{n}",
        campaign_id="bench",
        channel="push",
        content={"title": "Your offer", "body": "20 % off today only", "deeplink": "app://o/1"},
        link="https://shop.example.com/o/1",
    )
    links = LinkSigner("bench-secret-" * 3, "https://k.example.com")
    return Outgoing(request, links, device=Device(platform=platform_, token=token))  # type: ignore[arg-type]


async def _closed_loop(
    send: Callable[[int], Awaitable[str]], count: int, concurrency: int
) -> tuple[float, dict[str, int]]:
    """Pushes/s with ``concurrency`` sends in flight until ``count`` are answered."""
    kinds: Counter[str] = Counter()
    next_n = 0

    async def worker() -> None:
        nonlocal next_n
        while next_n < count:
            n = next_n
            next_n += 1
            kinds[await send(n)] += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - start), dict(kinds)


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _read(path: str) -> str:
    return Path(path).read_text()


def _cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _runs(
    send: Callable[[int], Awaitable[str]], count: int, args: argparse.Namespace, peer_pid: int
) -> dict[str, Any]:
    """A warm-up, then ``args.runs`` measured runs: wall-clock rate and CPU per push."""
    await _closed_loop(send, min(2000, count), args.concurrency)
    runs, client_us, peer_us = [], [], []
    for _ in range(args.runs):
        c0, p0 = _cpu_self(), _cpu_of(peer_pid)
        runs.append(await _closed_loop(send, count, args.concurrency))
        client_us.append((_cpu_self() - c0) * 1e6 / count)
        peer_us.append((_cpu_of(peer_pid) - p0) * 1e6 / count)
    rates = [round(r, 1) for r, _ in runs]
    client, peer = statistics.median(client_us), statistics.median(peer_us)
    return {
        "pushes_per_s_median": round(statistics.median(rates), 1),
        "pushes_per_s_runs": rates,
        "answers": runs[-1][1],
        # CPU per push, immune to other load on the machine: what a core each would carry.
        "client_cpu_us_per_push": round(client, 1),
        "peer_cpu_us_per_push": round(peer, 1),
        "pushes_per_s_one_core_each": round(1e6 / max(client, peer), 1),
    }


async def _provider_runs(
    provider: Provider, platform_: str, token: str, args: argparse.Namespace, peer_pid: int
) -> dict[str, Any]:
    prepared = [_outgoing(platform_, token, n) for n in range(args.count)]

    async def send(n: int) -> str:
        result: Result = await provider.send(prepared[n])
        return result.kind if result.kind == "sent" else f"{result.kind}: {result.reason}"

    await provider.start()
    try:
        return await _runs(send, args.count, args, peer_pid)
    finally:
        await provider.close()


async def _httpx_apns(env: dict[str, str], args: argparse.Namespace, pid: int) -> dict[str, Any]:
    """The same APNs requests through ``httpx`` with HTTP/2 (an alternative measured)."""
    import httpx

    provider = apns.from_settings(_settings(env))
    assert provider is not None
    ctx = ssl.create_default_context(cafile=env["KAIROS_APNS_CA_FILE"])
    token = "ab" * 32
    outs = [_outgoing("ios", token, n) for n in range(args.count)]
    async with httpx.AsyncClient(
        http2=True, verify=ctx, limits=httpx.Limits(max_connections=args.connections)
    ) as client:

        async def send(n: int) -> str:
            r = await client.post(
                f"{env['KAIROS_APNS_URL']}/3/device/{token}",
                content=json.dumps(provider.payload(outs[n])).encode(),
                headers={
                    "authorization": f"bearer {provider.token.current()}",
                    "apns-topic": env["KAIROS_APNS_TOPIC"],
                    "apns-push-type": "alert",
                    "apns-priority": "10",
                },
            )
            return str(r.status_code)

        return await _runs(send, max(2000, args.count // 4), args, pid)


async def _aioapns(env: dict[str, str], args: argparse.Namespace, pid: int) -> dict[str, Any]:
    """The same notifications through ``aioapns`` (an alternative measured, when installed;
    note it signs one provider token per connection)."""
    import aioapns
    from aioapns import connection

    # aioapns only knows Apple's hosts: point its production host at the peer.
    connection.APNsProductionClientProtocol.APNS_SERVER = "127.0.0.1"
    connection.APNsTLSClientProtocol.APNS_PORT = int(env["KAIROS_APNS_URL"].rsplit(":", 1)[1])
    ctx = ssl.create_default_context(cafile=env["KAIROS_APNS_CA_FILE"])
    ctx.set_alpn_protocols(["h2"])
    client = aioapns.APNs(
        key=_read(env["KAIROS_APNS_KEY_FILE"]),
        key_id=env["KAIROS_APNS_KEY_ID"],
        team_id=env["KAIROS_APNS_TEAM_ID"],
        topic=env["KAIROS_APNS_TOPIC"],
        max_connections=args.connections,
        ssl_context=ctx,
    )
    provider = apns.from_settings(_settings(env))
    assert provider is not None
    token = "ab" * 32
    outs = [_outgoing("ios", token, n) for n in range(args.count)]

    async def send(n: int) -> str:
        request = aioapns.NotificationRequest(
            device_token=token,
            message=provider.payload(outs[n]),
            push_type=aioapns.PushType.ALERT,
            priority=10,
        )
        return str((await client.send_notification(request)).status)

    return await _runs(send, max(2000, args.count // 4), args, pid)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of this benchmark."""
    out: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "loop": "uvloop" if args.uvloop else "asyncio",
        "count": args.count,
        "runs": args.runs,
        "concurrency": args.concurrency,
        "apns_connections": args.connections,
        # Other work on the machine slows the wall-clock figures: recorded to read them by.
        "load_average_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        proc, env = await _peer("apns", Path(tmp) / "apns")
        try:
            provider = apns.from_settings(_settings(env, apns_connections=args.connections))
            assert provider is not None
            out["apns"] = await _provider_runs(provider, "ios", "ab" * 32, args, proc.pid)
            print(f"APNs  (own HTTP/2 client): {out['apns']}", flush=True)
            if args.compare:
                out["apns_httpx"] = await _httpx_apns(env, args, proc.pid)
                print(f"APNs  (httpx http2):        {out['apns_httpx']}", flush=True)
                if importlib.util.find_spec("aioapns") is not None:
                    out["apns_aioapns"] = await _aioapns(env, args, proc.pid)
                    print(f"APNs  (aioapns):            {out['apns_aioapns']}", flush=True)
        finally:
            await _stop(proc)
        proc, env = await _peer("fcm", Path(tmp) / "fcm")
        try:
            fcm_provider = fcm.from_settings(_settings(env))
            assert fcm_provider is not None
            out["fcm"] = await _provider_runs(
                fcm_provider, "android", "fcm-token-1", args, proc.pid
            )
            print(f"FCM   (aiohttp):            {out['fcm']}", flush=True)
        finally:
            await _stop(proc)
    out["load_average_after"] = os.getloadavg()
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--compare", action="store_true")
    arguments = parser.parse_args()
    if arguments.uvloop:
        import uvloop

        uvloop.install()
    figures = asyncio.run(main(arguments))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"push-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"written {path}")
