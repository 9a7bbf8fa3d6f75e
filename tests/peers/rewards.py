"""A bonus system's webhook on loopback: verifies ``Kairos-Signature`` and honours
``Idempotency-Key`` (a repeated key gets the first answer again and books nothing), records
grants and revokes, and answers on command (per tracking id)."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from tests.peers.base import LoopThread

SECRET = "rewards-webhook-secret-for-tests"
TOLERANCE_S = 300


@dataclass(frozen=True)
class Booked:
    """One request the bonus system booked (the first with its Idempotency-Key)."""

    key: str
    body: dict[str, Any]
    signature: str
    raw: bytes

    @property
    def action(self) -> str:
        return str(self.body["action"])

    @property
    def tracking_id(self) -> str:
        return str(self.body["tracking_id"])


def verify(secret: str, header: str, body: bytes, now: float | None = None) -> bool:
    """Check ``t=<unix>,v1=<hex>`` the way a receiver should: MAC and freshness."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        t = int(fields["t"])
        given = fields["v1"]
    except (KeyError, ValueError):
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    fresh = abs((now if now is not None else time.time()) - t) <= TOLERANCE_S
    return fresh and hmac.compare_digest(expected, given)


class RewardsPeer:
    """The started webhook: ``env`` points dispatch at it; ``answer`` scripts failures."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._booked: list[Booked] = []
        self._replies: dict[str, tuple[int, bytes]] = {}
        self._scripted: dict[str, list[tuple[int, int | None]]] = {}
        self.requests = 0  # every request, replays and refusals included
        self._per_tracking: dict[str, int] = {}
        self.refused_signatures = 0
        self.thread = LoopThread("peer-rewards")
        self.port: int = self.thread.run(self._serve())
        self.env = {
            "KAIROS_REWARDS_URL": f"http://127.0.0.1:{self.port}/webhooks/kairos",
            "KAIROS_REWARDS_SECRET": SECRET,
        }

    async def _serve(self) -> int:
        app = web.Application()
        app.router.add_post("/webhooks/kairos", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        port: int = self._runner.addresses[0][1]
        return port

    def answer(self, tracking_id: str, status: int, *, times: int | None = 1) -> None:
        """Answer requests for ``tracking_id`` with ``status`` (``times`` times; None: always)."""
        with self._lock:
            self._scripted.setdefault(tracking_id, []).append((status, times))

    @property
    def booked(self) -> list[Booked]:
        """Every grant or revoke booked, once per Idempotency-Key."""
        with self._lock:
            return list(self._booked)

    def for_tracking(self, tracking_id: str) -> list[Booked]:
        """What was booked for one tracking id."""
        return [b for b in self.booked if b.tracking_id == tracking_id]

    def requests_for(self, tracking_id: str) -> int:
        """How many signed requests named this tracking id (replays included)."""
        with self._lock:
            return self._per_tracking.get(tracking_id, 0)

    def _next_scripted(self, tracking_id: str) -> int | None:
        with self._lock:
            queue = self._scripted.get(tracking_id)
            if not queue:
                return None
            status, times = queue[0]
            if times is not None:
                if times <= 1:
                    queue.pop(0)
                else:
                    queue[0] = (status, times - 1)
            return status

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self.requests += 1
        signature = request.headers.get("Kairos-Signature", "")
        if not verify(SECRET, signature, body):
            with self._lock:
                self.refused_signatures += 1
            return web.json_response({"error": "bad signature"}, status=401)
        key = request.headers.get("Idempotency-Key")
        if not key:
            return web.json_response({"error": "Idempotency-Key required"}, status=400)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return web.json_response({"error": "not JSON"}, status=400)
        tracking_id = str(doc.get("tracking_id"))
        with self._lock:
            self._per_tracking[tracking_id] = self._per_tracking.get(tracking_id, 0) + 1
            replay = self._replies.get(key)
        if replay is not None:
            return web.Response(body=replay[1], status=replay[0], content_type="application/json")
        scripted = self._next_scripted(tracking_id)
        if scripted is not None and scripted >= 300:
            reply = orjson.dumps({"error": f"scripted {scripted}"})
            if scripted < 500:  # remembered like a booking; 5xx are not (retries must pass)
                with self._lock:
                    self._replies[key] = (scripted, reply)
            return web.Response(body=reply, status=scripted, content_type="application/json")
        reply = orjson.dumps({"id": f"bk_{key}", "status": "booked", "action": doc.get("action")})
        with self._lock:
            if key in self._replies:  # a concurrent duplicate won the race
                status, reply = self._replies[key]
                return web.Response(body=reply, status=status, content_type="application/json")
            self._replies[key] = (200, reply)
            self._booked.append(Booked(key, doc, signature, body))
        return web.Response(body=reply, status=200, content_type="application/json")

    def stop(self) -> None:
        self.thread.run(self._runner.cleanup())
        self.thread.stop()


def start(tmp: Path) -> RewardsPeer:
    """Start the rewards peer (the ``peers`` fixture calls this)."""
    return RewardsPeer()
