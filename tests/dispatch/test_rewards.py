"""Rewards through the running suite: a ``response.recorded`` on the bus is granted once at
the bonus system's webhook, read and revoked through the gateway, and erased with the profile."""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from shared.bus import Bus
from shared.contracts.bus import ProfileErased, ResponseRecorded, Reward
from shared.events import iso, utcnow
from shared.stack import Stack
from tests.conftest import auth
from tests.helpers import eventually
from tests.peers.base import Peer
from tests.peers.rewards import SECRET, RewardsPeer


@pytest.fixture(scope="module")
def bonus(peers: dict[str, Peer]) -> RewardsPeer:
    peer = peers["rewards"]
    assert isinstance(peer, RewardsPeer)
    return peer


@pytest.fixture(scope="module")
async def bus(stack: Stack) -> AsyncIterator[Bus]:
    b = Bus(stack.env["KAIROS_NATS_URL"], prefix=stack.env["KAIROS_BUS_PREFIX"], source="tests")
    await b.connect(ensure_streams=False)
    yield b
    await b.close()


def _tid() -> str:
    return f"tr-{uuid.uuid4().hex[:16]}"


async def _respond(
    bus: Bus,
    tracking_id: str,
    customer_id: str,
    *,
    outcome: str = "accepted",
    reward: Reward | None = None,
    control: bool = False,
    event_id: str | None = None,
) -> None:
    rec = ResponseRecorded(
        tracking_id=tracking_id,
        customer_id=customer_id,
        campaign_id="cmp-rewards",
        offer_id="offer-bonus",
        outcome=outcome,  # type: ignore[arg-type]
        time=iso(utcnow()),
        control=control,
        reward=reward if reward is not None else Reward(type="bonus_points", amount=500),
    )
    subject, ev = rec.to_event(source="kairos/feedback", id_=event_id or rec.event_id_())
    await bus.publish(subject, ev)


async def _reward(gw: httpx.AsyncClient, tracking_id: str) -> httpx.Response:
    return await gw.get(f"/v1/rewards/{tracking_id}")


async def _state(gw: httpx.AsyncClient, tracking_id: str) -> str | None:
    r = await _reward(gw, tracking_id)
    return r.json()["state"] if r.status_code == 200 else None


async def _settled(gw: httpx.AsyncClient, bus: Bus, cid: str) -> None:
    """Wait until everything published before has been handled: a fresh grant published after
    it is granted (one durable consumer handles its batches in order)."""
    marker = _tid()
    await _respond(bus, marker, cid)
    await eventually(lambda: _state(gw, marker), lambda s: s == "granted", timeout=20)


async def test_grant_once_read_and_revoke_once(
    gw: httpx.AsyncClient, bus: Bus, bonus: RewardsPeer, cid: str
) -> None:
    tid = _tid()
    await _respond(bus, tid, cid, reward=Reward(type="bonus_points", amount=500))
    r = await eventually(
        lambda: _reward(gw, tid), lambda r: r.status_code == 200 and r.json()["state"] == "granted"
    )
    doc = r.json()
    assert doc["customer_id"] == cid
    assert (doc["type"], doc["amount"], doc["campaign_id"]) == ("bonus_points", 500, "cmp-rewards")
    assert doc["granted_at"] is not None
    assert [(a["action"], a["status"]) for a in doc["attempts"]] == [("grant", 200)]

    (grant,) = bonus.for_tracking(tid)
    assert grant.body == {
        "grant_id": doc["grant_id"],
        "tracking_id": tid,
        "customer_id": cid,
        "type": "bonus_points",
        "amount": 500,
        "action": "grant",
    }
    assert grant.key == doc["grant_id"]
    # The documented scheme: t=<unix>,v1=hex(HMAC-SHA256(secret, "<t>." + body)).
    t, v1 = (part.split("=", 1)[1] for part in grant.signature.split(","))
    mac = hmac.new(SECRET.encode(), f"{t}.".encode() + grant.raw, hashlib.sha256).hexdigest()
    assert v1 == mac
    assert abs(int(t) - time.time()) < 120

    # A redelivered response, and the conversion that follows, grant nothing again.
    await _respond(bus, tid, cid, event_id=f"redelivered-{uuid.uuid4().hex}")
    await _respond(bus, tid, cid, outcome="converted")
    await _settled(gw, bus, cid)
    assert len(bonus.for_tracking(tid)) == 1
    assert bonus.requests_for(tid) == 1  # not even a replayed request

    revoked = await gw.post(f"/v1/rewards/{tid}/revoke")
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["state"] == "revoked"
    assert revoked.json()["revoked_at"] is not None
    again = await gw.post(f"/v1/rewards/{tid}/revoke")
    assert again.status_code == 200
    assert again.json() == revoked.json()
    booked = bonus.for_tracking(tid)
    assert [b.action for b in booked] == ["grant", "revoke"]
    assert booked[1].key != booked[0].key  # its own Idempotency-Key
    assert booked[1].body["grant_id"] == doc["grant_id"]
    assert bonus.requests_for(tid) == 2
    assert (await _state(gw, tid)) == "revoked"


async def test_transient_failure_is_retried_and_granted_once(
    gw: httpx.AsyncClient, bus: Bus, bonus: RewardsPeer, cid: str
) -> None:
    tid = _tid()
    bonus.answer(tid, 500, times=1)
    await _respond(bus, tid, cid)
    doc = (
        await eventually(
            lambda: _reward(gw, tid),
            lambda r: r.status_code == 200 and r.json()["state"] == "granted",
            timeout=30,
        )
    ).json()
    assert [(a["action"], a["status"]) for a in doc["attempts"]] == [("grant", 500), ("grant", 200)]
    assert len(bonus.for_tracking(tid)) == 1
    assert bonus.requests_for(tid) == 2


async def test_permanent_refusal_fails_with_the_reason_and_cannot_be_revoked(
    gw: httpx.AsyncClient, bus: Bus, bonus: RewardsPeer, cid: str
) -> None:
    tid = _tid()
    bonus.answer(tid, 422, times=None)
    await _respond(bus, tid, cid)
    doc = (
        await eventually(
            lambda: _reward(gw, tid),
            lambda r: r.status_code == 200 and r.json()["state"] == "failed",
        )
    ).json()
    assert doc["reason"].startswith("422")
    assert bonus.for_tracking(tid) == []
    r = await gw.post(f"/v1/rewards/{tid}/revoke")
    assert r.status_code == 409
    assert r.headers["content-type"] == "application/problem+json"
    assert "failed" in r.json()["detail"]


async def test_only_accepted_or_converted_targets_earn_a_reward(
    gw: httpx.AsyncClient, bus: Bus, bonus: RewardsPeer, cid: str
) -> None:
    clicked, control = _tid(), _tid()
    await _respond(bus, clicked, cid, outcome="clicked")
    await _respond(bus, control, cid, control=True)
    await _settled(gw, bus, cid)
    for tid in (clicked, control):
        assert (await _reward(gw, tid)).status_code == 404
        assert bonus.requests_for(tid) == 0


async def test_unknown_rewards_and_scopes(gw: httpx.AsyncClient, stack: Stack) -> None:
    tid = _tid()
    for r in (await gw.get(f"/v1/rewards/{tid}"), await gw.post(f"/v1/rewards/{tid}/revoke")):
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/problem+json"
    assert (await gw.get("/v1/rewards/bad id!")).status_code in (404, 422)
    async with httpx.AsyncClient(base_url=stack.url("gateway")) as c:
        assert (await c.get(f"/v1/rewards/{tid}")).status_code == 401
        # "nothing" holds reports:read only: may read, may not revoke.
        assert (await c.get(f"/v1/rewards/{tid}", headers=auth("nothing"))).status_code == 404
        r = await c.post(f"/v1/rewards/{tid}/revoke", headers=auth("nothing"))
        assert r.status_code == 403
        r = await c.get(f"/v1/rewards/{tid}", headers=auth("marketer"))
        assert r.status_code == 403


async def test_erasure_leaves_nothing_personal(
    gw: httpx.AsyncClient, bus: Bus, bonus: RewardsPeer, cid: str
) -> None:
    tid = _tid()
    await _respond(bus, tid, cid)
    await eventually(lambda: _state(gw, tid), lambda s: s == "granted")
    subject, ev = ProfileErased(customer_id=cid, ids=[cid]).to_event(source="kairos/profile")
    await bus.publish(subject, ev)
    doc = (
        await eventually(lambda: _reward(gw, tid), lambda r: r.json()["customer_id"] != cid)
    ).json()
    assert doc["customer_id"].startswith("erased:")
    assert cid not in str(doc)
    assert doc["state"] == "granted" and doc["amount"] == 500  # reports keep the counts
    assert all(a["answer"] is None for a in doc["attempts"])
