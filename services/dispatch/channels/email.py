"""E-mail over SMTP (aiosmtplib): a small pool of reused, authenticated STARTTLS connections,
multipart text + HTML with tracked links, an open pixel, RFC 8058 one-click unsubscribe and
an optional DKIM signature."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import html
import logging
import re
import ssl
import time
import uuid
from dataclasses import dataclass
from email.header import Header
from email.utils import formataddr, formatdate, parseaddr
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from services.dispatch.channels.base import Outgoing, Provider, Result
from shared.settings import Settings

log = logging.getLogger("kairos.dispatch.email")

DKIM_HEADERS = [
    b"From",
    b"To",
    b"Subject",
    b"Message-ID",
    b"List-Unsubscribe",
    b"List-Unsubscribe-Post",
]
HREF = re.compile(r"""(<a\b[^>]*?\bhref\s*=\s*)(["'])(.*?)\2""", re.IGNORECASE | re.DOTALL)
TAG = re.compile(r"<[^>]+>")
BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)


@dataclass(frozen=True)
class SmtpTarget:
    """Where and how to connect, from ``KAIROS_SMTP_URL``."""

    host: str
    port: int
    username: str | None
    password: str | None
    tls: str  # "starttls" | "implicit" | "none"

    @classmethod
    def parse(cls, url: str) -> SmtpTarget:
        """``smtp://user:pass@host:587`` (STARTTLS), ``smtps://…:465``, ``?starttls=false``."""
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError(f"KAIROS_SMTP_URL must look like smtp://user:pass@host:587: {url!r}")
        query = parse_qs(parts.query)
        plain = query.get("starttls", ["true"])[0].lower() in ("false", "0", "no")
        tls = "implicit" if parts.scheme == "smtps" else "none" if plain else "starttls"
        return cls(
            host=parts.hostname,
            port=parts.port or (465 if tls == "implicit" else 587),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            tls=tls,
        )


class DkimSigner:
    """DKIM (RFC 6376) with one RSA key: relaxed/relaxed, SHA-256, over ``DKIM_HEADERS``.

    Written here over OpenSSL rather than with ``dkim.sign``: dkimpy does the RSA step in
    pure Python (6–17 ms of CPU per message, holding the GIL, so a thread does not help),
    which capped a replica near 100 signed e-mails/s; OpenSSL signs in ~0.4 ms. The tests
    verify every signature with dkimpy.
    """

    def __init__(self, key: bytes, selector: str, domain: str) -> None:
        loaded = serialization.load_pem_private_key(key, password=None)
        if not isinstance(loaded, rsa.RSAPrivateKey):
            raise ValueError("KAIROS_DKIM_KEY_FILE must hold an RSA private key (PEM)")
        self.key = loaded
        self.selector = selector.encode()
        self.domain = domain.encode()

    def sign(self, raw: bytes, *, now: int | None = None) -> bytes:
        """The message with its ``DKIM-Signature`` header prepended."""
        head, sep, body = raw.partition(b"\r\n\r\n")
        headers = _parse_headers(head)
        signed = [n for n in DKIM_HEADERS if n.lower() in headers]
        body_hash = hashlib.sha256(_relaxed_body(body if sep else b"")).digest()
        value = b"; ".join(
            (
                b"v=1",
                b"a=rsa-sha256",
                b"c=relaxed/relaxed",
                b"d=" + self.domain,
                b"s=" + self.selector,
                b"t=%d" % (now if now is not None else int(time.time())),
                b"h=" + b":".join(signed),
                b"bh=" + base64.b64encode(body_hash),
                b"b=",
            )
        )
        data = b"".join(_relaxed_header(n, headers[n.lower()]) + b"\r\n" for n in signed)
        data += _relaxed_header(b"DKIM-Signature", b" " + value)
        mac = self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        return b"DKIM-Signature: " + value + base64.b64encode(mac) + b"\r\n" + raw


WSP = re.compile(rb"[ \t]+")


def _parse_headers(head: bytes) -> dict[bytes, bytes]:
    """Header name (lower case) → raw value; the last one of a name wins, as DKIM signs it
    bottom-up (the messages rendered here have each header once)."""
    found: dict[bytes, bytes] = {}
    name = b""
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and name:
            found[name] += b"\r\n" + line
            continue
        key, _, value = line.partition(b":")
        name = key.strip().lower()
        found[name] = value
    return found


def _relaxed_header(name: bytes, value: bytes) -> bytes:
    """RFC 6376 3.4.2: lower-case name, unfolded value, runs of whitespace as one space."""
    value = WSP.sub(b" ", value.replace(b"\r\n", b"")).strip(b" ")
    return name.strip().lower() + b":" + value


def _relaxed_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4: whitespace runs as one space, none at line ends, no trailing empty
    lines, and a final CRLF unless the body is empty."""
    lines = [WSP.sub(b" ", line).rstrip(b" ") for line in body.split(b"\r\n")]
    while lines and not lines[-1]:
        lines.pop()
    return b"\r\n".join(lines) + b"\r\n" if lines else b""


def rewrite_links(body: str, out: Outgoing) -> str:
    """Every http(s) link of the HTML through a signed click link, and an open pixel."""
    tid = out.request.tracking_id

    def swap(m: re.Match[str]) -> str:
        href = html.unescape(m.group(3).strip())
        if not href.lower().startswith(("http://", "https://")):
            return m.group(0)  # mailto:, tel:, #anchors stay as written
        tracked = out.links.url("t", tid, channel="email", url=href)
        return f"{m.group(1)}{m.group(2)}{html.escape(tracked)}{m.group(2)}"

    rewritten = HREF.sub(swap, body)
    pixel = (
        f'<img src="{html.escape(out.links.url("o", tid, channel="email"))}" width="1" '
        'height="1" alt="" style="display:none">'
    )
    found = list(BODY_END.finditer(rewritten))
    if found:
        at = found[-1].start()
        return rewritten[:at] + pixel + rewritten[at:]
    return rewritten + pixel


def _header(value: str) -> str:
    """A header value on one line (no CR/LF: no header injection), RFC 2047 if not ASCII."""
    value = " ".join(value.split())
    if value.isascii():
        return value
    return Header(value, "utf-8").encode(linesep="\r\n")


def _qp(text: str) -> bytes:
    """UTF-8 quoted-printable body with CRLF line ends (``=`` is always escaped by it, so a
    boundary starting with ``=_`` can never occur in a body)."""
    data = text.replace("\r\n", "\n").replace("\r", "\n").encode()
    return binascii.b2a_qp(data, istext=True).replace(b"\n", b"\r\n")


def render(out: Outgoing, sender: str, domain: str) -> tuple[str, bytes]:
    """(Message-ID, the message as bytes) for one send.

    Written out by hand rather than with ``email.message``: that package spends ~2 ms per
    message on policy machinery, which alone would cap a replica at a few hundred e-mails/s.
    The layout is the plain multipart/alternative every client reads."""
    req = out.request
    c = req.content
    subject = c.get("subject") or c.get("title") or ""
    text = c.get("text") or c.get("body")
    body_html = c.get("html")
    if text is None:
        text = html.unescape(TAG.sub("", body_html or "")).strip()
    if body_html is None:
        body_html = "<p>" + html.escape(text).replace("\n", "<br>\n") + "</p>"
    message_id = f"<{req.tracking_id}@{domain}>"
    to = req.address.email if req.address and req.address.email else ""
    unsubscribe = out.links.url("u", req.tracking_id, channel="email")
    boundary = "=_k" + uuid.uuid4().hex
    head = (
        f"From: {_from_header(sender)}\r\n"
        f"To: {_header(to)}\r\n"
        f"Subject: {_header(subject)}\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        f"Message-ID: {message_id}\r\n"
        f"List-Unsubscribe: <{unsubscribe}>\r\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n'
        "\r\n"
    )
    part = (
        '--{b}\r\nContent-Type: text/{t}; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    )
    raw = b"".join(
        (
            head.encode(),
            part.format(b=boundary, t="plain").encode(),
            _qp(text),
            b"\r\n",
            part.format(b=boundary, t="html").encode(),
            _qp(rewrite_links(body_html, out)),
            f"\r\n--{boundary}--\r\n".encode(),
        )
    )
    return message_id, raw


@functools.lru_cache(maxsize=8)
def _from_header(sender: str) -> str:
    name, address = parseaddr(sender)
    return formataddr((name, address), charset="utf-8")


def _reply(exc: aiosmtplib.SMTPResponseException) -> str:
    return f"{exc.code} {exc.message}".strip()


class SmtpProvider(Provider):
    """SMTP client with ``connections`` reused connections (reconnects when one drops)."""

    name = "smtp"

    def __init__(
        self,
        target: SmtpTarget,
        *,
        sender: str,
        ca_file: Path | None = None,
        connections: int = 4,
        dkim_signer: DkimSigner | None = None,
        timeout: float = 15.0,
    ) -> None:
        self.target = target
        self.sender = sender
        self.envelope_from = parseaddr(sender)[1]
        if "@" not in self.envelope_from:
            raise ValueError(f"KAIROS_EMAIL_FROM needs an address: {sender!r}")
        self.domain = self.envelope_from.rsplit("@", 1)[1]
        self.size = connections
        self.dkim = dkim_signer
        self.timeout = timeout
        self._tls: ssl.SSLContext | None = None
        if target.tls != "none":
            self._tls = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._idle: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue()
        self._slots = asyncio.Semaphore(connections)
        self._clients: list[aiosmtplib.SMTP] = []

    def _client(self) -> aiosmtplib.SMTP:
        t = self.target
        return aiosmtplib.SMTP(
            hostname=t.host,
            port=t.port,
            username=t.username,
            password=t.password,
            use_tls=t.tls == "implicit",
            start_tls=True if t.tls == "starttls" else False,
            tls_context=self._tls,
            local_hostname=self.domain,  # else getfqdn(): a blocking DNS lookup
            timeout=self.timeout,
        )

    async def start(self) -> None:
        """Open one connection to check the address and credentials early."""
        try:
            client = await self._connected(None)
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise RuntimeError(self._auth_help(exc)) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            log.warning("SMTP server %s not reachable yet: %s", self.target.host, exc)
            return
        self._idle.put_nowait(client)

    async def close(self) -> None:
        for client in self._clients:
            if client.is_connected:
                try:
                    await asyncio.wait_for(client.quit(), 2)
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    client.close()
        self._clients.clear()

    def _auth_help(self, exc: aiosmtplib.SMTPResponseException) -> str:
        return (
            f"SMTP server {self.target.host}:{self.target.port} refused the login of "
            f"{self.target.username!r} ({_reply(exc)}): fix the user and password in "
            "KAIROS_SMTP_URL (percent-encode special characters)"
        )

    async def _connected(self, client: aiosmtplib.SMTP | None) -> aiosmtplib.SMTP:
        """``client`` if still connected, else a new authenticated connection."""
        if client is not None and client.is_connected:
            return client
        self._drop(client)
        fresh = self._client()
        try:
            await fresh.connect()
        except BaseException:
            fresh.close()
            raise
        self._clients.append(fresh)
        return fresh

    async def send(self, out: Outgoing) -> Result:
        """Render, sign and send one e-mail over a pooled connection."""
        addr = out.request.address
        if addr is None or not addr.email:
            return Result("failed", reason="no e-mail address for this customer")
        message_id, raw = render(out, self.sender, self.domain)
        if self.dkim is not None:
            raw = self.dkim.sign(raw)  # ~0.4 ms in OpenSSL: a thread hop would cost as much
        # At most ``connections`` sends at once, each on an idle connection or a new one.
        async with self._slots:
            client = self._idle.get_nowait() if not self._idle.empty() else None
            return await self._send(client, addr.email, raw, message_id)

    async def _send(
        self,
        client: aiosmtplib.SMTP | None,
        to: str,
        raw: bytes,
        message_id: str,
    ) -> Result:
        # A pooled connection the server closed while idle fails on first use: one reconnect.
        for attempt in (1, 2):
            try:
                client = await self._connected(client)
                _, reply = await client.sendmail(self.envelope_from, [to], raw)
            except aiosmtplib.SMTPAuthenticationError as exc:
                log.error(self._auth_help(exc))
                self._drop(client)
                return Result("failed", reason=_reply(exc), answer={"code": exc.code})
            except aiosmtplib.SMTPTimeoutError as exc:
                # Not re-sent at once: the server may have taken the message and be slow to
                # say so; the sender's backoff decides.
                self._drop(client)
                return Result("retry", reason=f"SMTP timeout: {exc}")
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPConnectError, OSError) as exc:
                self._drop(client)
                client = None
                if attempt == 2:
                    return Result("retry", reason=f"SMTP connection: {exc}")
                continue
            except aiosmtplib.SMTPRecipientsRefused as exc:
                first = exc.recipients[0]
                await self._reset(client)
                return self._classify(first.code, _reply(first))
            except aiosmtplib.SMTPSenderRefused as exc:
                await self._reset(client)
                if exc.code >= 500:
                    log.error("SMTP server refused the sender %s: %s", exc.sender, _reply(exc))
                    return Result("failed", reason=_reply(exc), answer={"code": exc.code})
                return Result("retry", reason=_reply(exc), answer={"code": exc.code})
            except aiosmtplib.SMTPResponseException as exc:
                await self._reset(client)
                return self._classify(exc.code, _reply(exc))
            except aiosmtplib.SMTPException as exc:
                # No reply code: the server lacks what the URL asks for (STARTTLS, AUTH).
                log.error(
                    "SMTP server %s cannot be used as KAIROS_SMTP_URL says (%s): use "
                    "smtps:// for implicit TLS, or check that it offers STARTTLS and AUTH",
                    self.target.host,
                    exc,
                )
                self._drop(client)
                return Result("failed", reason=f"SMTP: {exc}")
            assert client is not None
            self._idle.put_nowait(client)
            return Result(
                "sent",
                provider_id=message_id,
                answer={"code": 250, "message": reply[:200]},
            )
        raise AssertionError("unreachable")

    def _classify(self, code: int, reply: str) -> Result:
        if code >= 500:
            return Result("bounced", reason=reply, answer={"code": code})
        return Result("retry", reason=reply, answer={"code": code})

    async def _reset(self, client: aiosmtplib.SMTP | None) -> None:
        """After a refused transaction: RSET and keep the connection, or drop it."""
        if client is None:
            return
        try:
            await client.rset()
        except (aiosmtplib.SMTPException, OSError):
            self._drop(client)
            return
        self._idle.put_nowait(client)

    def _drop(self, client: aiosmtplib.SMTP | None) -> None:
        if client is None:
            return
        client.close()
        if client in self._clients:
            self._clients.remove(client)


def _dkim_from(settings: Settings) -> DkimSigner | None:
    s = settings
    if not (s.dkim_key_file and s.dkim_selector and s.dkim_domain):
        if s.dkim_key_file or s.dkim_selector or s.dkim_domain:
            log.warning("DKIM needs KAIROS_DKIM_KEY_FILE, _SELECTOR and _DOMAIN; not signing")
        return None
    return DkimSigner(Path(s.dkim_key_file).read_bytes(), s.dkim_selector, s.dkim_domain)


def from_settings(settings: Settings) -> SmtpProvider | None:
    """The SMTP provider when ``KAIROS_SMTP_URL`` is set, else None (local outbox)."""
    if not settings.smtp_url:
        return None
    return SmtpProvider(
        SmtpTarget.parse(settings.smtp_url),
        sender=settings.email_from,
        ca_file=settings.smtp_ca_file,
        connections=settings.smtp_connections,
        dkim_signer=_dkim_from(settings),
    )
