"""The catalog through the gateway: offers with checked templates, campaigns validated
field by field, and the lifecycle with four-eyes approval and a readable history."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from shared.stack import Stack
from tests.conftest import auth

OFFER = {
    "name": "EU roaming pack",
    "value": 4.0,
    "link": "https://example.com/roam",
    "content": {
        "default": {"title": "Roam like home", "body": "Hi {{ attributes.first_name }}"},
        "sms": {"text": "Roam for 4 EUR/week, reply YES"},
    },
    "reward": {"type": "bonus_points", "amount": 500},
}


def _campaign(offer_id: str, **kw: Any) -> dict[str, Any]:
    return {
        "name": "Roaming welcome",
        "type": "realtime",
        "priority": 50,
        "audience": {"all": [{"tag": "value:gold"}, {"consent": "push"}]},
        "touchpoints": ["pos", "call_center"],
        "treatments": [{"id": "A", "offer": offer_id, "weight": 1}],
        "control_group": 0.1,
        "reentry": {"max": 1, "per": "30d"},
        "conversion": {"event": "roaming.pack_bought", "within": "3d"},
        **kw,
    }


@pytest.fixture
async def offer_id(gw: httpx.AsyncClient) -> str:
    oid = f"off-{uuid.uuid4().hex[:8]}"
    r = await gw.put(f"/v1/offers/{oid}", json=OFFER)
    assert r.status_code == 200, r.text
    return oid


async def test_offer_round_trip_and_versions(gw: httpx.AsyncClient, offer_id: str) -> None:
    got = (await gw.get(f"/v1/offers/{offer_id}")).json()
    assert got["content"]["default"]["body"] == "Hi {{ attributes.first_name }}"
    assert got["version"] == 1 and got["reward"] == {"type": "bonus_points", "amount": 500.0}
    r = await gw.put(f"/v1/offers/{offer_id}", json={**OFFER, "value": 5.0})
    assert r.json()["version"] == 2
    listed = (await gw.get("/v1/offers", params={"limit": 500})).json()["offers"]
    assert offer_id in {o["offer_id"] for o in listed}


async def test_a_template_error_is_caught_when_the_offer_is_saved(gw: httpx.AsyncClient) -> None:
    bad = {**OFFER, "content": {"default": {"title": "x", "body": "Hi {{ attributes.first_name "}}}
    r = await gw.put("/v1/offers/off-bad", json=bad)
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"] == ["content", "default", "body"]
    assert (await gw.get("/v1/offers/off-bad")).status_code == 404


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        (
            {"treatments": [{"id": "A", "offer": "off-missing", "weight": 1}]},
            ["treatments", 0, "offer"],
        ),
        (
            {"treatments": [{"id": "A", "offer": "OFFER", "weight": 0}]},
            ["treatments", 0, "weight"],
        ),
        ({"control_group": 0.7}, ["control_group"]),
        (
            {"audience": {"all": [{"attr": "age", "op": "equals", "value": 1}]}},
            ["audience", "all", 0, "op"],
        ),
        ({"touchpoints": []}, ["touchpoints"]),
        ({"reentry": {"max": 1, "per": "month"}}, ["reentry", "per"]),
        ({"colour": "red"}, ["colour"]),
    ],
)
async def test_malformed_campaigns_name_the_field(
    gw: httpx.AsyncClient, offer_id: str, change: dict[str, Any], loc: list[Any]
) -> None:
    body = _campaign(offer_id, **change)
    for t in body["treatments"]:
        if t["offer"] == "OFFER":
            t["offer"] = offer_id
    r = await gw.put(f"/v1/campaigns/cmp-bad-{uuid.uuid4().hex[:6]}", json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["errors"][0]["loc"] == loc


async def test_lifecycle_with_four_eyes(stack: Stack, offer_id: str) -> None:
    cid = f"cmp-{uuid.uuid4().hex[:8]}"
    base = stack.url("gateway")
    async with (
        httpx.AsyncClient(base_url=base, headers=auth("marketer")) as marketer,
        httpx.AsyncClient(base_url=base, headers=auth("approver")) as approver,
    ):
        r = await marketer.put(f"/v1/campaigns/{cid}", json=_campaign(offer_id))
        assert r.status_code == 200 and r.json()["state"] == "draft"

        r = await marketer.post(f"/v1/campaigns/{cid}/activate")
        assert r.status_code == 409 and "draft" in r.json()["detail"]
        r = await marketer.post(f"/v1/campaigns/{cid}/approve")
        assert r.status_code == 403  # no campaigns:approve scope

        assert (await approver.post(f"/v1/campaigns/{cid}/submit")).json()["state"] == "submitted"
        r = await approver.post(f"/v1/campaigns/{cid}/approve")
        assert r.status_code == 403 and "another principal" in r.json()["detail"]
        # The marketer may not approve, the approver submitted: resubmission by the marketer
        # is not possible either (already submitted) — approval needs a third principal.
        async with httpx.AsyncClient(base_url=base, headers=auth("admin")) as admin:
            r = await admin.post(f"/v1/campaigns/{cid}/approve")
            assert r.status_code == 200 and r.json()["state"] == "approved"
        r = await marketer.put(f"/v1/campaigns/{cid}", json=_campaign(offer_id, priority=90))
        assert r.status_code == 409 and "approved" in r.json()["detail"]
        assert (await marketer.post(f"/v1/campaigns/{cid}/activate")).json()["state"] == "active"
        assert (await marketer.post(f"/v1/campaigns/{cid}/pause")).json()["state"] == "paused"
        r = await marketer.put(f"/v1/campaigns/{cid}", json=_campaign(offer_id, priority=90))
        assert r.status_code == 200 and r.json()["priority"] == 90
        assert (await marketer.post(f"/v1/campaigns/{cid}/activate")).json()["state"] == "active"
        assert (await marketer.post(f"/v1/campaigns/{cid}/complete")).json()["state"] == "completed"
        r = await marketer.post(f"/v1/campaigns/{cid}/activate")
        assert r.status_code == 409 and "completed" in r.json()["detail"]

        history = (await marketer.get(f"/v1/campaigns/{cid}/transitions")).json()
        steps = [(t["from_state"], t["to_state"], t["principal"]) for t in history["transitions"]]
        assert steps == [
            (None, "draft", "test-marketer"),
            ("draft", "submitted", "test-approver"),
            ("submitted", "approved", "test-admin"),
            ("approved", "active", "test-marketer"),
            ("active", "paused", "test-marketer"),
            ("paused", "active", "test-marketer"),
            ("active", "completed", "test-marketer"),
        ]


async def test_no_approval_needed_goes_straight_to_active(
    gw: httpx.AsyncClient, offer_id: str
) -> None:
    cid = f"cmp-{uuid.uuid4().hex[:8]}"
    r = await gw.put(f"/v1/campaigns/{cid}", json=_campaign(offer_id, approval_required=False))
    assert r.status_code == 200
    assert (await gw.post(f"/v1/campaigns/{cid}/activate")).json()["state"] == "active"
