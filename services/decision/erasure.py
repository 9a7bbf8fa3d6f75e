"""``profile.erased`` in the decision service: its timers of the customer go (a timer holds the
customer id and the messages it will publish, addresses included). The ledger, contact-history
and propensity keys in Redis are removed by the profile's erasure consumer with the rest of
Redis; runs and campaigns hold counts only."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from nats.aio.msg import Msg
from pydantic import ValidationError

from shared.bus import Consumer, PoisonMessage, TransientError
from shared.contracts.bus import ProfileErased
from shared.db import is_transient
from shared.events import CloudEvent
from shared.privacy import any_customer
from shared.service import Runtime

log = logging.getLogger("kairos.decision.erasure")


async def erase(rt: Runtime, batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
    ids: list[str] = []
    for _, ev in batch:
        try:
            e = ProfileErased.parse(ev)
        except ValidationError as exc:
            raise PoisonMessage(f"not a profile.erased payload: {exc}") from exc
        ids += [e.customer_id, *e.ids]
    assert rt.db is not None
    try:
        async with rt.db.transaction() as uow:
            got = await uow.session.execute(
                sa.text("DELETE FROM decision.timer WHERE customer_id = ANY(CAST(:ids AS text[]))"),
                {"ids": sorted(set(ids))},
            )
    except Exception as exc:
        if is_transient(exc):
            raise TransientError(str(exc)) from exc
        raise
    n = int(got.rowcount or 0)  # type: ignore[attr-defined]
    if n:
        log.info("erasure: %d timers deleted", n)


def consumer(rt: Runtime) -> Consumer:
    async def handle(batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
        await erase(rt, batch)

    return Consumer(
        rt.bus,
        "decision-erasure",
        [any_customer("profile.erased")],
        "PROFILE",
        handle,
        batch=50,
        max_deliver=rt.settings.consumer_max_deliver,
    )
