"""E-mail over SMTP (aiosmtplib): a small pool of reused, authenticated STARTTLS connections,
multipart text + HTML with tracked links, an open pixel, RFC 8058 one-click unsubscribe and
an optional DKIM signature."""

from __future__ import annotations

import asyncio
import html
import logging
import re
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate, parseaddr
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib
import dkim

from services.dispatch.channels.base import Outgoing, Provider, Result
from shared.settings import Settings

log = logging.getLogger("kairos.dispatch.email")

# Lines up to SMTP's limit (RFC 5322: 998): signed URLs are longer than 78 characters and
# must not be folded into encoded words, which some clients then fail to open.
POLICY = SMTP_POLICY.clone(max_line_length=998)
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
    """Signs a rendered message with one RSA key (relaxed/relaxed, SHA-256)."""

    def __init__(self, key: bytes, selector: str, domain: str) -> None:
        self.key = key
        self.selector = selector.encode()
        self.domain = domain.encode()

    def sign(self, raw: bytes) -> bytes:
        """The message with its ``DKIM-Signature`` header prepended."""
        header: bytes = dkim.sign(
            raw,
            self.selector,
            self.domain,
            self.key,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=DKIM_HEADERS,
        )
        return header + raw


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


def render(out: Outgoing, sender: str, domain: str) -> tuple[str, bytes]:
    """(Message-ID, the message as bytes) for one send."""
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
    msg = EmailMessage(policy=POLICY)
    msg["From"] = sender
    msg["To"] = req.address.email if req.address and req.address.email else ""
    msg["Subject"] = subject
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = message_id
    msg["List-Unsubscribe"] = f"<{out.links.url('u', req.tracking_id, channel='email')}>"
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg.set_content(text)
    msg.add_alternative(rewrite_links(body_html, out), subtype="html")
    return message_id, msg.as_bytes()


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
        if client is None:
            client = self._client()
            self._clients.append(client)
        if not client.is_connected:
            client.close()
            await client.connect()
        return client

    async def send(self, out: Outgoing) -> Result:
        """Render, sign and send one e-mail over a pooled connection."""
        addr = out.request.address
        if addr is None or not addr.email:
            return Result("failed", reason="no e-mail address for this customer")
        message_id, raw = render(out, self.sender, self.domain)
        if self.dkim is not None:
            # RSA signing takes milliseconds of CPU: keep it off the event loop.
            raw = await asyncio.to_thread(self.dkim.sign, raw)
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
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPConnectError, OSError) as exc:
                self._drop(client)
                client = None
                if attempt == 2:
                    return Result("retry", reason=f"SMTP connection: {exc}")
                continue
            except aiosmtplib.SMTPTimeoutError as exc:
                self._drop(client)
                return Result("retry", reason=f"SMTP timeout: {exc}")
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
