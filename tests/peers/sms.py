"""A Twilio-style Messages API on loopback: checks basic auth and the form, answers per To
number on command, and after a 201 posts status callbacks (sent, then delivered or
undelivered) to the message's StatusCallback URL, form-encoded like Twilio."""

from __future__ import annotations

import asyncio
import base64
import itertools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.peers.base import LoopThread

ACCOUNT, TOKEN, SENDER = "AC0123456789abcdef0123456789abcdef", "sms-token-for-tests", "+15005550006"
REQUIRED = ("To", "From", "Body")


@dataclass(frozen=True)
class Answer:
    """A scripted answer: status and Twilio's error ``code``/``message`` (or a Retry-After)."""

    status: int
    code: int | None = None
    message: str = ""
    retry_after: str | None = None


class SmsPeer:
    """The started API: ``env`` points dispatch at it, ``answer`` scripts refusals."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received: list[dict[str, str]] = []
        self._callbacks: list[tuple[str, dict[str, str], int]] = []
        self._answers: dict[str, list[tuple[Answer, int | None]]] = {}
        self._undelivered: dict[str, tuple[int, str]] = {}
        self._sids = itertools.count(1)
        self._reporting: set[asyncio.Task[None]] = set()
        self.callbacks_enabled = True
        self.thread = LoopThread("peer-sms")
        self.port: int = self.thread.run(self._serve())
        self.env = {
            "KAIROS_SMS_URL": f"http://127.0.0.1:{self.port}",
            "KAIROS_SMS_ACCOUNT": ACCOUNT,
            "KAIROS_SMS_TOKEN": TOKEN,
            "KAIROS_SMS_FROM": SENDER,
        }

    async def _serve(self) -> int:
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{account}/Messages.json", self._messages)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._client = aiohttp.ClientSession()
        port: int = self._runner.addresses[0][1]
        return port

    # -- commands (from the test's thread) --------------------------------------------
    def answer(
        self,
        to: str,
        status: int,
        code: int | None = None,
        message: str = "",
        *,
        retry_after: str | None = None,
        times: int | None = None,
    ) -> None:
        """Answer messages to ``to`` so (``times`` times, then the next scripted or 201)."""
        with self._lock:
            self._answers.setdefault(to, []).append(
                (Answer(status, code, message, retry_after), times)
            )

    def undeliverable(self, to: str, error_code: int = 30003, message: str = "Unreachable") -> None:
        """Accept messages to ``to`` but report them undelivered (status callback)."""
        with self._lock:
            self._undelivered[to] = (error_code, message)

    @property
    def received(self) -> list[dict[str, str]]:
        """The form of every message accepted (201), in order."""
        with self._lock:
            return list(self._received)

    @property
    def callbacks(self) -> list[tuple[str, dict[str, str], int]]:
        """(url, form, status the callback got) for every status callback posted."""
        with self._lock:
            return list(self._callbacks)

    def count(self) -> int:
        with self._lock:
            return len(self._received)

    # -- protocol ------------------------------------------------------------------------
    def _scripted(self, to: str) -> Answer | None:
        with self._lock:
            queue = self._answers.get(to)
            if not queue:
                return None
            answer, times = queue[0]
            if times is not None:
                if times <= 1:
                    queue.pop(0)
                else:
                    queue[0] = (answer, times - 1)
            return answer

    @staticmethod
    def _error(status: int, code: int | None, message: str, **headers: str) -> web.Response:
        body = {"code": code, "message": message, "more_info": "", "status": status}
        return web.json_response(body, status=status, headers=headers)

    def _authorized(self, request: web.Request) -> bool:
        expected = "Basic " + base64.b64encode(f"{ACCOUNT}:{TOKEN}".encode()).decode()
        return request.headers.get("Authorization") == expected

    async def _messages(self, request: web.Request) -> web.Response:
        if not self._authorized(request) or request.match_info["account"] != ACCOUNT:
            return self._error(401, 20003, "Authenticate")
        form = {k: str(v) for k, v in (await request.post()).items()}
        missing = [f for f in REQUIRED if not form.get(f)]
        if missing:
            return self._error(400, 21604, f"A '{missing[0]}' parameter is required.")
        scripted = self._scripted(form["To"])
        if scripted is not None and scripted.status != 201:
            headers = {"Retry-After": scripted.retry_after} if scripted.retry_after else {}
            return self._error(scripted.status, scripted.code, scripted.message, **headers)
        sid = f"SM{next(self._sids):032x}"
        with self._lock:
            self._received.append({**form, "MessageSid": sid})
        callback = form.get("StatusCallback")
        if callback and self.callbacks_enabled:
            # Held until done: the loop keeps only weak references to tasks.
            task = asyncio.get_running_loop().create_task(self._report(callback, sid, form))
            self._reporting.add(task)
            task.add_done_callback(self._reporting.discard)
        body: dict[str, Any] = {
            "sid": sid,
            "account_sid": ACCOUNT,
            "to": form["To"],
            "from": form["From"],
            "body": form["Body"],
            "status": "queued",
            "num_segments": None,  # Twilio fills it in later; clients count themselves
            "error_code": None,
        }
        return web.json_response(body, status=201)

    async def _report(self, url: str, sid: str, form: dict[str, str]) -> None:
        base = {"MessageSid": sid, "AccountSid": ACCOUNT, "To": form["To"], "From": form["From"]}
        with self._lock:
            undelivered = self._undelivered.get(form["To"])
        steps: list[dict[str, str]] = [{**base, "MessageStatus": "sent"}]
        if undelivered:
            code, message = undelivered
            steps.append(
                {
                    **base,
                    "MessageStatus": "undelivered",
                    "ErrorCode": str(code),
                    "ErrorMessage": message,
                }
            )
        else:
            steps.append({**base, "MessageStatus": "delivered"})
        for step in steps:
            status = 0
            # A provider tries a callback again when the connection fails (a keep-alive
            # connection the receiver closed just as it was reused, say); what the receiver
            # answered, it keeps.
            for attempt in range(3):
                try:
                    async with self._client.post(url, data=step) as resp:
                        status = resp.status
                    break
                except aiohttp.ClientError:
                    status = -1
                    await asyncio.sleep(0.05 * (attempt + 1))
            with self._lock:
                self._callbacks.append((url, step, status))

    def stop(self) -> None:
        async def down() -> None:
            await self._client.close()
            await self._runner.cleanup()

        self.thread.run(down())
        self.thread.stop()


def start(tmp: Path) -> SmsPeer:
    """Start the SMS peer (the ``peers`` fixture calls this)."""
    return SmsPeer()
