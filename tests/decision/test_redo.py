"""A page planned again (a resumed run, a redelivered event) counts what went out the first
time, on real Redis: the ledger is asked first, so a profile that changed in between (consent
withdrawn, number removed) does not turn a sent contact into a suppressed one."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from redis.asyncio import Redis

from services.decision.engine import Engine
from services.decision.outbound import tracking_id
from services.decision.pipeline.catalog import Catalog
from services.decision.pipeline.model import Offer, Policy, compile_campaign
from services.decision.policy.ledger import Ledger
from services.decision.runs.service import Runs
from shared.redis import Keys
from shared.stack import Stack


def _doc(cid: str, *, sms: bool) -> dict[str, Any]:
    return {
        "customer_id": cid,
        "attributes": {"first_name": cid},
        "consents": {"sms": sms},
        "identities": {"msisdn": "+4915" + str(abs(hash(cid)) % 10**7)},
    }


async def _project(redis: Redis, keys: Keys, doc: dict[str, Any]) -> None:
    await redis.hset(keys.profile(doc["customer_id"]), mapping={"v": 1, "p": orjson.dumps(doc)})


async def test_a_redone_page_counts_and_sends_what_the_ledger_holds(stack: Stack) -> None:
    redis = Redis.from_url(stack.env["KAIROS_REDIS_URL"])
    keys = Keys(f"{stack.env['KAIROS_REDIS_PREFIX']}-redo-{uuid.uuid4().hex[:6]}")
    engine = Engine(redis, keys, None, Ledger(redis, keys), explore=0.0)  # type: ignore[arg-type]
    offer = Offer("std", content={"default": {"text": "Hi {{ attributes.first_name }}"}})
    engine.set_catalog(Catalog(offers={"std": offer}, policy=Policy()))
    body = {
        "name": "r",
        "type": "batch",
        "channels": ["sms"],
        "treatments": [{"id": "A", "offer": "std"}],
    }
    camp = compile_campaign("cmp-redo", body, {}, lambda sid: lambda s: False)
    runs = Runs(engine, None, None, "", "me", None)  # type: ignore[arg-type]  # plan needs none
    members = ["c0", "c1", "c2"]
    try:
        for cid in members:
            await _project(redis, keys, _doc(cid, sms=True))

        async def plan(*, redo: bool) -> dict[str, tuple[str, str, list[str]]]:
            outs = await runs.plan(
                camp,
                members,
                {"run_id": "r-1"},
                lambda c: tracking_id("r-1", c),
                dry=False,
                redo=redo,
            )
            return {
                it.customer_id: (o.status, o.reason, [ev.id for _, ev in o.records])
                for it, o in outs
            }

        first = await plan(redo=False)
        assert {c: s for c, (s, _, _) in first.items()} == dict.fromkeys(members, "dispatched")
        # between the first plan and the redo, c0 withdraws consent and c1 loses the number
        await _project(redis, keys, _doc("c0", sms=False))
        gone = _doc("c1", sms=True)
        gone["identities"] = {}
        await _project(redis, keys, gone)
        # planned as new, the page would count them as suppressed though they were sent
        fresh = await plan(redo=False)
        assert (fresh["c0"][:2], fresh["c1"][:2]) == (
            ("suppressed", "consent"),
            ("suppressed", "unreachable"),
        )
        # planned as a redo, the ledger answers first: the same outcomes, the same message ids
        again = await plan(redo=True)
        assert again == first
        # and a customer never planned before still goes through every step
        await _project(redis, keys, _doc("c3", sms=False))
        members.append("c3")
        assert (await plan(redo=True))["c3"][:2] == ("suppressed", "consent")
    finally:
        await redis.aclose()
