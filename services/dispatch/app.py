"""Dispatch service: delivers every decided message through its provider, exactly once to
the customer, and reports each outcome on the bus."""

from __future__ import annotations

from fastapi import FastAPI

from services.dispatch import rewards, store
from services.dispatch.endpoints import router
from services.dispatch.intake import Intake
from services.dispatch.providers import Providers
from services.dispatch.ratelimit import RateLimiter, parse_limits
from services.dispatch.sender import Sender
from shared import metrics
from shared.bus import Consumer, bulk_gather_s
from shared.contracts.bus import CHANNELS
from shared.links import signer_from
from shared.privacy import any_customer
from shared.service import Runtime, create_service_app
from shared.settings import Settings


async def _setup(rt: Runtime) -> None:
    assert rt.db is not None
    cfg = rt.settings
    providers = Providers.from_settings(cfg)
    await providers.start()
    rt.closers.append(providers.close)
    links = signer_from(cfg)
    sender = Sender(
        rt.db,
        providers,
        RateLimiter(rt.redis, rt.keys, parse_limits(cfg.dispatch_rate_limits)),
        links,
        owner=cfg.instance_id,
        concurrency=cfg.dispatch_concurrency,
        max_age_s=cfg.dispatch_max_age_s,
        retention_days=cfg.dispatch_retention_days,
    )
    intake = Intake(rt.db, sender, pseudonym_key=cfg.link_signer_secret())
    rt.extras.update(providers=providers, sender=sender, intake=intake, links=links)
    if cfg.run_consumers:
        rt.consumers += [
            # Two lanes from the stream on: realtime requests are taken in by their own
            # consumer, whatever backlog a batch run has left in the other.
            Consumer(
                rt.bus,
                "dispatch-requests",
                [any_customer("dispatch.requested.*")],
                "DISPATCH",
                intake.handle,
                batch=cfg.consumer_batch,
                max_deliver=cfg.consumer_max_deliver,
            ),
            Consumer(
                rt.bus,
                "dispatch-requests-batch",
                [any_customer("dispatch.requested.*.batch")],
                "DISPATCH",
                intake.handle,
                batch=cfg.consumer_batch,
                max_deliver=cfg.consumer_max_deliver,
                gather_s=bulk_gather_s(),
            ),
            Consumer(
                rt.bus,
                "dispatch-receipts",
                ["dispatch.receipt.>"],
                "DISPATCH",
                intake.receipts,
                batch=cfg.consumer_batch,
                max_deliver=cfg.consumer_max_deliver,
                gather_s=bulk_gather_s(),
            ),
            Consumer(
                rt.bus,
                "dispatch-erasure",
                [any_customer("profile.erased")],
                "PROFILE",
                intake.erase,
                max_deliver=cfg.consumer_max_deliver,
            ),
        ]
        rt.background += sender.tasks()
    await rewards.setup(rt)

    async def backlog() -> None:
        db = rt.db
        assert db is not None
        async with db.sessions() as session:
            metrics.set_backlog(await store.backlog(session), CHANNELS)

    metrics.add_sampler(rt, backlog)
    for c in rt.consumers:
        await c.start()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The dispatch process."""
    return create_service_app(
        "dispatch",
        schema="dispatch",
        routers=[router, rewards.router],
        setup=_setup,
        settings=settings,
    )
