"""The e-mail and SMS providers against real protocol peers on loopback: every answer a
provider documents is mapped, and the messages carry what customers and carriers rely on."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import dkim
import pytest

from services.dispatch.channels import email as email_channel
from services.dispatch.channels import sms as sms_channel
from services.dispatch.channels.base import Outgoing
from services.dispatch.channels.email import SmtpProvider, SmtpTarget
from services.dispatch.channels.sms import SmsProvider, parse_status_callback, segments
from shared.contracts.bus import Address, DispatchRequested
from shared.links import LinkSigner
from shared.settings import Settings
from tests.helpers import eventually
from tests.peers.base import Peer
from tests.peers.sms import SmsPeer
from tests.peers.smtp import SmtpPeer

LINKS = LinkSigner("provider-test-link-secret-0123456789", "https://go.kairos.test")
# Nobody listens there: the SMS peer's status callbacks fail fast, the test reads what it sent.
PUBLIC_URL = "http://127.0.0.1:9"


def _settings(env: dict[str, str], **extra: Any) -> Settings:
    fields = {k.removeprefix("KAIROS_").lower(): v for k, v in env.items()}
    return Settings(**{**fields, "public_url": PUBLIC_URL, **extra})


@pytest.fixture(scope="module")
def smtp_peer(peers: dict[str, Peer]) -> SmtpPeer:
    peer = peers["smtp"]
    assert isinstance(peer, SmtpPeer)
    return peer


@pytest.fixture(scope="module")
def sms_peer(peers: dict[str, Peer]) -> SmsPeer:
    peer = peers["sms"]
    assert isinstance(peer, SmsPeer)
    return peer


@pytest.fixture
async def mailer(smtp_peer: SmtpPeer) -> AsyncIterator[SmtpProvider]:
    provider = email_channel.from_settings(_settings(smtp_peer.env))
    assert provider is not None
    await provider.start()
    yield provider
    await provider.close()


@pytest.fixture
async def texter(sms_peer: SmsPeer) -> AsyncIterator[SmsProvider]:
    provider = sms_channel.from_settings(_settings(sms_peer.env))
    assert provider is not None
    await provider.start()
    yield provider
    await provider.close()


def _mail(to: str, content: dict[str, str], tracking_id: str | None = None) -> Outgoing:
    req = DispatchRequested(
        tracking_id=tracking_id or f"tr-{uuid.uuid4().hex[:12]}",
        idempotency_key="k",
        customer_id="c-1",
        campaign_id="cmp-1",
        channel="email",
        address=Address(email=to),
        content=content,
    )
    return Outgoing(req, LINKS)


def _sms(to: str, text: str) -> Outgoing:
    req = DispatchRequested(
        tracking_id=f"tr-{uuid.uuid4().hex[:12]}",
        idempotency_key="k",
        customer_id="c-1",
        campaign_id="cmp-1",
        channel="sms",
        address=Address(msisdn=to),
        content={"text": text},
    )
    return Outgoing(req, LINKS)


def _token(url: str, kind: str) -> str:
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == LINKS.base_url
    prefix = f"/{kind}/"
    assert parts.path.startswith(prefix), url
    return parts.path[len(prefix) :]


def _addr() -> str:
    return f"u{uuid.uuid4().hex[:10]}@customers.test"


HTML = (
    "<html><body><h1>Roaming</h1>"
    '<p><a href="https://shop.test/eu?plan=1&amp;src=mail">Book the EU pack</a>'
    " or <a class='x' href='https://shop.test/help'>help</a>,"
    ' write to <a href="mailto:care@shop.test">care</a>.</p></body></html>'
)


# -- e-mail ---------------------------------------------------------------------------
async def test_email_is_multipart_tracked_unsubscribable_and_signed(
    mailer: SmtpProvider, smtp_peer: SmtpPeer
) -> None:
    to = _addr()
    out = _mail(to, {"subject": "Your EU pack", "html": HTML, "text": "Book it now"})
    result = await mailer.send(out)
    assert result.kind == "sent", result
    tid = out.request.tracking_id
    assert result.provider_id == f"<{tid}@mail.kairos.test>"
    (mail,) = await eventually(lambda: _async(smtp_peer.to(to)), lambda m: len(m) == 1)
    assert mail.mail_from == "offers@mail.kairos.test"
    assert mail.message.get_content_type() == "multipart/alternative"
    h = mail.headers
    assert h["Subject"] == "Your EU pack"
    assert h["From"] == "Kairos <offers@mail.kairos.test>"
    assert h["To"] == to
    assert h["Message-ID"] == f"<{tid}@mail.kairos.test>"
    assert mail.text.strip() == "Book it now"

    # RFC 8058 one-click unsubscribe: a signed link for this message and channel.
    unsubscribe = h["List-Unsubscribe"]
    assert unsubscribe.startswith("<") and unsubscribe.endswith(">")
    link = LINKS.verify("u", _token(unsubscribe[1:-1], "u"))
    assert (link.tracking_id, link.channel) == (tid, "email")
    assert h["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"

    # Every web link goes through a signed click link to the original address; mailto stays.
    hrefs = re.findall(r"""href=["']([^"']+)["']""", mail.html)
    assert len(hrefs) == 3
    clicks = [LINKS.verify("t", _token(h.replace("&amp;", "&"), "t")) for h in hrefs[:2]]
    assert [c.url for c in clicks] == [
        "https://shop.test/eu?plan=1&src=mail",
        "https://shop.test/help",
    ]
    assert {(c.tracking_id, c.channel) for c in clicks} == {(tid, "email")}
    assert hrefs[2] == "mailto:care@shop.test"
    (pixel,) = re.findall(r'<img src="([^"]+)" width="1" height="1"', mail.html)
    assert LINKS.verify("o", _token(pixel, "o")).tracking_id == tid
    assert mail.html.index(pixel) < mail.html.index("</body>")

    # DKIM verifies with the published key, over the headers that matter for one-click.
    assert dkim.verify(mail.raw, dnsfunc=smtp_peer.dns)
    signed = re.search(rb"h=([^;]+);", mail.raw.replace(b"\r\n", b"").replace(b" ", b""))
    assert signed is not None
    assert set(signed.group(1).lower().split(b":")) >= {
        b"from",
        b"to",
        b"subject",
        b"message-id",
        b"list-unsubscribe",
        b"list-unsubscribe-post",
    }
    tampered = mail.raw.replace(b"Your EU pack", b"Your EU deal")
    assert not dkim.verify(tampered, dnsfunc=smtp_peer.dns)


async def _async(value: Any) -> Any:
    return value


async def test_email_fallbacks_from_title_and_body(
    mailer: SmtpProvider, smtp_peer: SmtpPeer
) -> None:
    to = _addr()
    result = await mailer.send(_mail(to, {"title": "Hello <you>", "body": "Tom & Jerry\nline 2"}))
    assert result.kind == "sent", result
    (mail,) = await eventually(lambda: _async(smtp_peer.to(to)), lambda m: len(m) == 1)
    assert mail.headers["Subject"] == "Hello <you>"
    assert mail.text.strip() == "Tom & Jerry\nline 2"
    assert "Tom &amp; Jerry<br>" in mail.html
    assert "/o/" in mail.html  # the open pixel is there even without links


async def test_email_refusals_are_classified(mailer: SmtpProvider, smtp_peer: SmtpPeer) -> None:
    gone, busy, fine = _addr(), _addr(), _addr()
    smtp_peer.answer(gone, 550, "5.1.1 no such user")
    smtp_peer.answer(busy, 451, "4.3.0 try again later", times=1)

    bounced = await mailer.send(_mail(gone, {"subject": "s", "text": "t"}))
    assert bounced.kind == "bounced"
    assert bounced.reason == "550 5.1.1 no such user"
    retry = await mailer.send(_mail(busy, {"subject": "s", "text": "t"}))
    assert retry.kind == "retry"
    assert retry.reason is not None and retry.reason.startswith("451")
    # The refused transactions were reset: the same pool delivers the next ones.
    assert (await mailer.send(_mail(busy, {"subject": "s", "text": "t"}))).kind == "sent"
    assert (await mailer.send(_mail(fine, {"subject": "s", "text": "t"}))).kind == "sent"
    assert smtp_peer.to(gone) == []
    assert len(smtp_peer.to(busy)) == 1


async def test_email_wrong_password_fails_fast_with_an_actionable_log(
    smtp_peer: SmtpPeer, caplog: pytest.LogCaptureFixture
) -> None:
    url = smtp_peer.env["KAIROS_SMTP_URL"].replace("s3cret", "wrong")
    provider = email_channel.from_settings(_settings(smtp_peer.env, smtp_url=url))
    assert provider is not None
    with pytest.raises(RuntimeError, match="KAIROS_SMTP_URL"):
        await provider.start()
    with caplog.at_level(logging.ERROR, logger="kairos.dispatch.email"):
        result = await provider.send(_mail(_addr(), {"subject": "s", "text": "t"}))
    assert result.kind == "failed"
    assert result.reason is not None and result.reason.startswith("535")
    assert any("KAIROS_SMTP_URL" in r.getMessage() for r in caplog.records)
    await provider.close()


async def test_email_pool_reuses_connections_and_reconnects(smtp_peer: SmtpPeer) -> None:
    provider = email_channel.from_settings(_settings(smtp_peer.env, smtp_connections=2))
    assert provider is not None
    await provider.start()
    try:
        before = smtp_peer.connections
        to = _addr()
        results = await asyncio.gather(
            *(provider.send(_mail(to, {"subject": f"n{i}", "text": "t"})) for i in range(30))
        )
        assert {r.kind for r in results} == {"sent"}
        assert smtp_peer.connections - before <= 2  # 30 messages over at most two sessions
        assert len(smtp_peer.to(to)) == 30

        opened = smtp_peer.connections
        smtp_peer.drop_connections()  # the server closes idle sessions
        again = await provider.send(_mail(to, {"subject": "after", "text": "t"}))
        assert again.kind == "sent", again
        assert smtp_peer.connections == opened + 1  # one new session, the message not lost
        assert len(smtp_peer.to(to)) == 31
    finally:
        await provider.close()


def test_smtp_url_forms() -> None:
    t = SmtpTarget.parse("smtp://u%40x:p%3Aw@mail.test:2525")
    assert (t.host, t.port, t.username, t.password, t.tls) == (
        "mail.test",
        2525,
        "u@x",
        "p:w",
        "starttls",
    )
    assert SmtpTarget.parse("smtps://mail.test").tls == "implicit"
    assert SmtpTarget.parse("smtps://mail.test").port == 465
    assert SmtpTarget.parse("smtp://mail.test?starttls=false").tls == "none"
    with pytest.raises(ValueError, match="KAIROS_SMTP_URL"):
        SmtpTarget.parse("http://mail.test")


# -- SMS ------------------------------------------------------------------------------
def _number() -> str:
    return "+4915" + str(uuid.uuid4().int)[:9]


async def test_sms_sent_with_signed_callback_and_status_reports(
    texter: SmsProvider, sms_peer: SmsPeer
) -> None:
    to = _number()
    out = _sms(to, "Your EU pack is ready: reply 1 to book")
    result = await texter.send(out)
    assert result.kind == "sent", result
    assert result.provider_id is not None and result.provider_id.startswith("SM")
    assert result.segments == 1
    (form,) = [f for f in sms_peer.received if f["To"] == to]
    assert form["From"] == "+15005550006"
    assert form["Body"] == "Your EU pack is ready: reply 1 to book"
    callback = form["StatusCallback"]
    assert callback.startswith(f"{PUBLIC_URL}/callbacks/sms/")
    link = LINKS.verify("c", callback.rsplit("/", 1)[1])
    assert (link.tracking_id, link.channel) == (out.request.tracking_id, "sms")

    reports = await eventually(
        lambda: _async([f for u, f, _ in sms_peer.callbacks if f["To"] == to]),
        lambda r: len(r) == 2,
    )
    assert {r["MessageSid"] for r in reports} == {result.provider_id}
    assert [parse_status_callback(r) for r in reports] == [("sent", None), ("delivered", None)]


async def test_sms_undelivered_reports_the_carrier_error(
    texter: SmsProvider, sms_peer: SmsPeer
) -> None:
    to = _number()
    sms_peer.undeliverable(to, 30003, "Unreachable destination handset")
    assert (await texter.send(_sms(to, "hi"))).kind == "sent"
    reports = await eventually(
        lambda: _async([f for u, f, _ in sms_peer.callbacks if f["To"] == to]),
        lambda r: len(r) == 2,
    )
    assert parse_status_callback(reports[-1]) == (
        "failed",
        "30003 Unreachable destination handset",
    )


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (400, 21211, {"kind": "failed", "opted_out": False}),
        (400, 21610, {"kind": "failed", "opted_out": True}),
        (400, 21408, {"kind": "failed", "opted_out": False}),
        (503, None, {"kind": "retry", "throttled": False}),
        (500, None, {"kind": "retry", "throttled": False}),
    ],
)
async def test_sms_answers_are_classified(
    texter: SmsProvider, sms_peer: SmsPeer, status: int, code: int | None, expected: dict[str, Any]
) -> None:
    to = _number()
    sms_peer.answer(to, status, code, f"scripted {code}", times=1)
    result = await texter.send(_sms(to, "hi"))
    assert {k: getattr(result, k) for k in expected} == expected
    if code is not None:
        assert result.reason == f"{code} scripted {code}"
    assert (await texter.send(_sms(to, "hi"))).kind == "sent"  # the script was used once


async def test_sms_throttled_honours_retry_after(texter: SmsProvider, sms_peer: SmsPeer) -> None:
    to = _number()
    sms_peer.answer(to, 429, 20429, "Too Many Requests", retry_after="7", times=1)
    result = await texter.send(_sms(to, "hi"))
    assert (result.kind, result.throttled, result.retry_after) == ("retry", True, 7.0)


async def test_sms_wrong_token_fails_with_an_actionable_log(
    sms_peer: SmsPeer, caplog: pytest.LogCaptureFixture
) -> None:
    provider = sms_channel.from_settings(_settings(sms_peer.env, sms_token="wrong"))
    assert provider is not None
    await provider.start()
    try:
        with caplog.at_level(logging.ERROR, logger="kairos.dispatch.sms"):
            result = await provider.send(_sms(_number(), "hi"))
        assert result.kind == "failed"
        assert result.reason == "20003 Authenticate"
        assert any("KAIROS_SMS_TOKEN" in r.getMessage() for r in caplog.records)
    finally:
        await provider.close()


async def test_sms_unreachable_api_is_retried() -> None:
    provider = SmsProvider(
        url="http://127.0.0.1:9", account="AC1", token="t", sender="+1", public_url=PUBLIC_URL
    )
    await provider.start()
    try:
        assert (await provider.send(_sms(_number(), "hi"))).kind == "retry"
    finally:
        await provider.close()


async def test_sms_counts_ucs2_segments(texter: SmsProvider) -> None:
    result = await texter.send(_sms(_number(), "Привет! " * 10))  # 80 UCS-2 characters
    assert (result.kind, result.segments) == ("sent", 2)


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("", 1),
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("Ça coûte 5€" + "a" * 140, 3),  # û is not GSM-7: UCS-2, 151 units in parts of 67
        ("Äpfel für 5€ " + "b" * 146, 1),  # GSM-7 with € (2 septets): 160
        ("Äpfel für 5€ " + "b" * 147, 2),
        ("€" * 80, 1),  # 160 septets
        ("€" * 81, 2),
        ("aa" + "€" * 152, 3),  # 306 septets, but an escape pair is never split across parts
        ("Я" * 70, 1),
        ("Я" * 71, 2),
        ("Я" * 134, 2),
        ("Я" * 135, 3),
        ("😀" * 35, 1),  # 70 UTF-16 units
        ("😀" * 36, 2),
    ],
)
def test_segments(text: str, parts: int) -> None:
    assert segments(text) == parts


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        ({"MessageStatus": "queued"}, ("ignore", None)),
        ({"MessageStatus": "sending"}, ("ignore", None)),
        ({"MessageStatus": "sent"}, ("sent", None)),
        ({"MessageStatus": "delivered"}, ("delivered", None)),
        ({"MessageStatus": "undelivered", "ErrorCode": "30005"}, ("failed", "30005")),
        ({"MessageStatus": "failed", "ErrorCode": "30008"}, ("failed", "30008")),
        ({"MessageStatus": "failed"}, ("failed", "failed")),
        ({"SmsStatus": "delivered"}, ("delivered", None)),
        ({}, ("ignore", None)),
    ],
)
def test_parse_status_callback(form: dict[str, str], expected: tuple[str, str | None]) -> None:
    assert parse_status_callback(form) == expected


def test_dkim_canonicalization_agrees_with_dkimpy(smtp_peer: SmtpPeer) -> None:
    signer = email_channel.DkimSigner(
        smtp_peer.dkim_key_file.read_bytes(), "k1", "mail.kairos.test"
    )
    raw = (
        b"From: Kairos <offers@mail.kairos.test>\r\n"
        b"To:   someone@customers.test  \r\n"
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= and a\r\n\t folded\t  line\r\n"
        b"Message-ID: <x@mail.kairos.test>\r\n"
        b"List-Unsubscribe: <https://go.kairos.test/u/abc>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        b"X-Not-Signed: 1\r\n"
        b"\r\n"
        b"Body  with \t spaces   \r\n\r\n.leading dot\r\n\r\n\r\n"
    )
    signed = signer.sign(raw)
    assert dkim.verify(signed, dnsfunc=smtp_peer.dns)
    assert not dkim.verify(signed.replace(b"leading dot", b"leading dog"), dnsfunc=smtp_peer.dns)
    # Relaxed: whitespace changes and re-folding in transit do not break it.
    moved = signed.replace(b"Body  with", b"Body with").replace(b"\t folded", b" folded")
    assert dkim.verify(moved, dnsfunc=smtp_peer.dns)
    assert dkim.verify(signer.sign(b"From: a@mail.kairos.test\r\n\r\n"), dnsfunc=smtp_peer.dns)


async def test_email_without_starttls_is_refused_with_an_actionable_log(
    smtp_peer: SmtpPeer, caplog: pytest.LogCaptureFixture
) -> None:
    url = smtp_peer.env["KAIROS_SMTP_URL"] + "?starttls=false"
    provider = email_channel.from_settings(_settings(smtp_peer.env, smtp_url=url))
    assert provider is not None
    to = _addr()
    with caplog.at_level(logging.ERROR, logger="kairos.dispatch.email"):
        result = await provider.send(_mail(to, {"subject": "s", "text": "t"}))
    await provider.close()
    assert result.kind == "failed", result
    assert any("KAIROS_SMTP_URL" in r.getMessage() for r in caplog.records)
    assert smtp_peer.to(to) == []  # credentials never went over a plain connection


async def test_email_unreachable_server_is_retried() -> None:
    provider = SmtpProvider(SmtpTarget.parse("smtp://u:p@127.0.0.1:9"), sender="a@mail.test")
    await provider.start()  # logs, does not raise: the server may come up later
    result = await provider.send(_mail(_addr(), {"subject": "s", "text": "t"}))
    await provider.close()
    assert result.kind == "retry"
    assert result.reason is not None and result.reason.startswith("SMTP connection")


async def test_a_realtime_sms_never_queues_behind_a_batch_holding_every_connection() -> None:
    """A batch run keeps a pool's worth of sends in flight; a realtime SMS (an OTP) goes out
    on its own pool meanwhile. A loopback API that holds the batch's requests until told."""
    from aiohttp import web

    release = asyncio.Event()
    held: list[str] = []

    async def messages(request: web.Request) -> web.Response:
        form = await request.post()
        if form["Body"] == "batch":
            held.append(str(form["To"]))
            await release.wait()
        return web.json_response({"sid": f"SM{uuid.uuid4().hex}", "status": "queued"}, status=201)

    app = web.Application()
    app.router.add_post("/2010-04-01/Accounts/AC1/Messages.json", messages)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    provider = SmsProvider(
        url=f"http://127.0.0.1:{port}",
        account="AC1",
        token="t",
        sender="+1",
        public_url=PUBLIC_URL,
        connections=2,
    )
    await provider.start()
    batch: list[asyncio.Task[Any]] = []
    try:
        for _ in range(3):  # more than the pool holds: one waits for a connection
            out = _sms(_number(), "batch")
            out.request.lane = "batch"
            batch.append(asyncio.create_task(provider.send(out)))

        async def holding() -> int:
            return len(held)

        await eventually(holding, lambda n: n == 2)
        realtime = await asyncio.wait_for(provider.send(_sms(_number(), "your code 1234")), 5)
        assert realtime.kind == "sent", realtime
        assert not any(t.done() for t in batch)  # still held: the realtime one did not wait
        release.set()
        assert [r.kind for r in await asyncio.gather(*batch)] == ["sent"] * 3
    finally:
        release.set()
        await asyncio.gather(*batch, return_exceptions=True)
        await provider.close()
        await runner.cleanup()
