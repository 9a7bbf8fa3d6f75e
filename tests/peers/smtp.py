"""An SMTP server on loopback (aiosmtpd): STARTTLS and AUTH required, answers per recipient
on command, records every message it accepted; also the DKIM key the suite signs with."""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import threading
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.peers.base import LoopThread, make_tls

# aiosmtpd warns about its own deprecated Session.login_data on every AUTH.
logging.getLogger("mail.log").setLevel(logging.ERROR)
USER, PASSWORD = "kairos", "s3cret:pass"
SENDER = "Kairos <offers@mail.kairos.test>"
DKIM_SELECTOR, DKIM_DOMAIN = "k1", "mail.kairos.test"


@dataclass
class Mail:
    """One accepted message, parsed."""

    mail_from: str
    rcpt_to: list[str]
    raw: bytes
    message: EmailMessage = field(init=False)

    def __post_init__(self) -> None:
        parsed = message_from_bytes(self.raw, policy=default_policy)
        assert isinstance(parsed, EmailMessage)
        self.message = parsed

    @property
    def headers(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.message.items()}

    def part(self, subtype: str) -> str:
        body = self.message.get_body(preferencelist=(subtype,))
        assert body is not None and isinstance(body, EmailMessage), f"no text/{subtype} part"
        content: str = body.get_content()
        return content.replace("\r\n", "\n")

    @property
    def text(self) -> str:
        return self.part("plain")

    @property
    def html(self) -> str:
        return self.part("html")


class _Handler:
    def __init__(self, peer: SmtpPeer) -> None:
        self.peer = peer

    async def handle_RCPT(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        answer = self.peer._answer_for(address)
        if answer is not None:
            return answer
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        raw = envelope.original_content or envelope.content
        assert isinstance(raw, bytes)
        with self.peer._lock:
            # Parsing is deferred to ``received``: the benchmark sends thousands per second.
            self.peer._raw.append((str(envelope.mail_from), list(envelope.rcpt_tos), raw))
        return "250 2.0.0 queued"


def _authenticator(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == USER.encode()
        and auth_data.password == PASSWORD.encode()
    )
    return AuthResult(success=ok, handled=False)


class SmtpPeer:
    """The started server: ``env`` points dispatch at it; ``answer`` scripts refusals."""

    def __init__(self, tmp: Path) -> None:
        self.tls = make_tls(tmp / "tls")
        self._lock = threading.Lock()
        self._raw: list[tuple[str, list[str], bytes]] = []
        self._parsed: list[Mail] = []
        self._answers: dict[str, tuple[str, int | None]] = {}
        self._sessions: set[SMTP] = set()
        self.connections = 0  # sessions opened since start (pool reuse is visible here)
        self.thread = LoopThread("peer-smtp")
        self.server: asyncio.Server = self.thread.run(self._serve())
        self.port = self.server.sockets[0].getsockname()[1]
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.dkim_key_file = tmp / "dkim.pem"
        self.dkim_key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.dkim_txt = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
        self.env = {
            "KAIROS_SMTP_URL": f"smtp://{USER}:{PASSWORD.replace(':', '%3A')}@127.0.0.1:{self.port}",
            "KAIROS_SMTP_CA_FILE": str(self.tls.ca_file),
            "KAIROS_EMAIL_FROM": SENDER,
            "KAIROS_DKIM_KEY_FILE": str(self.dkim_key_file),
            "KAIROS_DKIM_SELECTOR": DKIM_SELECTOR,
            "KAIROS_DKIM_DOMAIN": DKIM_DOMAIN,
        }

    async def _serve(self) -> asyncio.Server:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        handler = _Handler(self)

        def factory() -> SMTP:
            smtp = SMTP(
                handler,
                hostname="localhost",
                tls_context=ctx,
                require_starttls=True,
                auth_required=True,
                authenticator=_authenticator,
            )
            self.connections += 1
            self._sessions.add(smtp)
            return smtp

        return await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)

    def _answer_for(self, address: str) -> str | None:
        with self._lock:
            found = self._answers.get(address.lower())
            if found is None:
                return None
            reply, times = found
            if times is not None:
                if times <= 1:
                    del self._answers[address.lower()]
                else:
                    self._answers[address.lower()] = (reply, times - 1)
            return reply

    def answer(self, address: str, code: int, text: str, *, times: int | None = None) -> None:
        """Answer RCPT TO ``address`` with ``code text`` (``times`` times, else always)."""
        with self._lock:
            self._answers[address.lower()] = (f"{code} {text}", times)

    def drop_connections(self) -> None:
        """Close every open session from the server side (as an idle timeout would)."""

        async def close() -> None:
            for smtp in list(self._sessions):
                if smtp.transport is not None:
                    smtp.transport.close()
            self._sessions.clear()

        self.thread.run(close())

    @property
    def received(self) -> list[Mail]:
        """Every accepted message, in arrival order."""
        with self._lock:
            while len(self._parsed) < len(self._raw):
                self._parsed.append(Mail(*self._raw[len(self._parsed)]))
            return list(self._parsed)

    def count(self) -> int:
        with self._lock:
            return len(self._raw)

    def to(self, address: str) -> list[Mail]:
        """The messages accepted for one recipient."""
        return [m for m in self.received if address in m.rcpt_to]

    def dns(self, name: bytes, timeout: int = 5) -> bytes | None:
        """A DKIM DNS lookup (``dnsfunc`` of ``dkim.verify``) answering our selector."""
        if name.rstrip(b".") == f"{DKIM_SELECTOR}._domainkey.{DKIM_DOMAIN}".encode():
            return self.dkim_txt
        return None

    def stop(self) -> None:
        self.thread.loop.call_soon_threadsafe(self.server.close)
        self.thread.stop()


def start(tmp: Path) -> SmtpPeer:
    """Start the SMTP peer (the ``peers`` fixture calls this)."""
    return SmtpPeer(tmp)
