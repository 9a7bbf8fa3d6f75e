"""The local outbox: where a channel's messages go when no provider is configured (the
embedded default). The message is kept in dispatch's table, marked delivered, and
``kairos outbox`` prints it."""

from __future__ import annotations

from services.dispatch.channels.base import Outgoing, Provider, Result


class LocalOutbox(Provider):
    """Delivers to dispatch's own table: nothing leaves the machine."""

    name = "local"

    async def send(self, out: Outgoing) -> Result:
        return Result("delivered", provider_id=f"local-{out.request.tracking_id}")
