"""Which provider client serves which channel (and, for push, which platform), built from
the settings once per process. A channel whose provider is not configured uses the local
outbox, so the embedded default shows what would have been sent."""

from __future__ import annotations

import importlib
import logging
from typing import ClassVar

from services.dispatch.channels.base import Provider
from services.dispatch.channels.local import LocalOutbox
from shared.settings import Settings

log = logging.getLogger("kairos.dispatch.providers")

# provider name → module in services.dispatch.channels (each has from_settings(settings)).
MODULES = {"apns": "apns", "fcm": "fcm", "webpush": "webpush", "smtp": "email", "sms": "sms"}


class Providers:
    """The configured provider clients of this process."""

    CHANNELS: ClassVar[tuple[str, ...]] = ("push", "email", "sms")
    PLATFORM: ClassVar[dict[str, str]] = {"ios": "apns", "android": "fcm", "web": "webpush"}
    CHANNEL: ClassVar[dict[str, str]] = {"email": "smtp", "sms": "sms"}

    def __init__(self, clients: dict[str, Provider]) -> None:
        self.clients = clients
        self.local = LocalOutbox()

    @classmethod
    def from_settings(cls, settings: Settings) -> Providers:
        """Every provider whose settings are present; the rest deliver locally."""
        clients: dict[str, Provider] = {}
        for name, module in MODULES.items():
            try:
                mod = importlib.import_module(f"services.dispatch.channels.{module}")
            except ModuleNotFoundError:  # MERGE: the provider modules land with their branches
                continue
            client = mod.from_settings(settings)
            if client is not None:
                clients[name] = client
        log.info("providers: %s; local outbox for the rest", ", ".join(sorted(clients)) or "none")
        return cls(clients)

    async def start(self) -> None:
        """Open every client; a wrong credential fails here with a message a person can act on."""
        for client in self.clients.values():
            await client.start()

    async def close(self) -> None:
        for client in self.clients.values():
            try:
                await client.close()
            except Exception as exc:  # closing is best effort
                log.warning("closing %s: %s", client.name, exc)

    def for_platform(self, platform: str) -> Provider:
        """The push provider of a device's platform."""
        return self.clients.get(self.PLATFORM.get(platform, ""), self.local)

    def for_channel(self, channel: str) -> Provider:
        """The provider of email or SMS."""
        return self.clients.get(self.CHANNEL.get(channel, ""), self.local)

    def names(self, channel: str) -> list[str]:
        """The providers a channel may use (for throttles)."""
        if channel == "push":
            return [p for p in self.PLATFORM.values() if p in self.clients]
        name = self.CHANNEL.get(channel)
        return [name] if name in self.clients else []
