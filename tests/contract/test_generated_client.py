"""A client generated from the gateway's OpenAPI document (openapi-python-client, as a
customer's developer would) works against the running stack: it sets up an offer and a
campaign at the ``call-center`` touchpoint, makes a decision and posts an event, and reads
each answer into the document's models, errors as ``Problem``."""

from __future__ import annotations

import importlib
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from shared.stack import Stack
from tests.contract.conftest import admin_key, missing_tool, run, tool
from tests.helpers import eventually

PACKAGE = "kairos_client"


@pytest.fixture(scope="module")
def client_pkg(contract_doc: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    generator = tool("openapi-python-client", Path(sys.executable).parent / "openapi-python-client")
    if generator is None:
        missing_tool("openapi-python-client")
    assert generator is not None
    out = tmp_path_factory.mktemp("generated")
    result = run(
        [
            generator,
            "generate",
            "--path",
            str(contract_doc),
            "--meta",
            "none",
            "--output-path",
            str(out / PACKAGE),
        ],
        timeout=300,
        cwd=out,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Only the NDJSON import and the GIF pixel are beyond the generator's media types.
    skipped = [line for line in result.stdout.splitlines() if "will not be generated" in line]
    assert all("customers:import" in line for line in skipped), result.stdout
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def _api(pkg: Any, tag: str, op: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.api.{tag}.{op}")


def _model(pkg: Any, name: str) -> Any:
    return getattr(importlib.import_module(f"{PACKAGE}.models"), name)


async def test_generated_client_decides_and_posts_an_event(
    client_pkg: Any, contract_stack: Stack
) -> None:
    pkg = client_pkg
    suffix = uuid.uuid4().hex[:8]
    cid, offer_id, campaign_id = f"c-gen-{suffix}", f"off-gen-{suffix}", f"cmp-gen-{suffix}"
    client = pkg.AuthenticatedClient(
        base_url=contract_stack.url("gateway"), token=admin_key(), raise_on_unexpected_status=True
    )
    async with client:
        put = await _api(pkg, "customers", "put_customer").asyncio_detailed(
            customer_id=cid,
            client=client,
            body=_model(pkg, "CustomerPut").from_dict(
                {"attributes": {"plan": "prepaid"}, "consents": {"push": True}}
            ),
        )
        assert put.status_code == 200, put.content
        assert put.parsed.customer_id == cid

        offer = await _api(pkg, "catalog", "put_offer").asyncio_detailed(
            offer_id=offer_id,
            client=client,
            body=_model(pkg, "OfferPut").from_dict(
                {"name": "Call-center bonus", "content": {"default": {"title": "10% off"}}}
            ),
        )
        assert offer.status_code == 200, offer.content
        campaign = await _api(pkg, "catalog", "put_campaign").asyncio_detailed(
            campaign_id=campaign_id,
            client=client,
            body=_model(pkg, "CampaignPut").from_dict(
                {
                    "name": "Generated-client campaign",
                    "type": "realtime",
                    "touchpoints": ["call-center"],
                    "treatments": [{"id": "A", "offer": offer_id}],
                    "approval_required": False,
                }
            ),
        )
        assert campaign.status_code == 200, campaign.content
        active = await _api(pkg, "catalog", "activate").asyncio_detailed(
            campaign_id=campaign_id, client=client
        )
        assert active.status_code == 200, active.content
        assert active.parsed.state.value == "active"

        decide = _api(pkg, "catalog", "decide")
        request = _model(pkg, "DecisionRequest").from_dict(
            {"customer_id": cid, "touchpoint": "call-center", "limit": 1}
        )

        async def decision() -> Any:
            return await decide.asyncio_detailed(client=client, body=request, dry_run=True)

        answer = await eventually(decision, lambda r: r.status_code == 200 and r.parsed.offers)
        typed = answer.parsed
        assert type(typed).__name__ == "DecisionResponse"
        assert typed.customer_id == cid and typed.touchpoint == "call-center"
        assert [(o.campaign_id, o.offer_id) for o in typed.offers] == [(campaign_id, offer_id)]
        assert typed.offers[0].content.additional_properties["title"] == "10% off"

        # A refusal comes back as the document's Problem, naming the field.
        bad = await decide.asyncio_detailed(
            client=client,
            body=_model(pkg, "DecisionRequest").from_dict(
                {"customer_id": cid, "touchpoint": "Call Center"}
            ),
        )
        assert bad.status_code == 422
        assert type(bad.parsed).__name__ == "Problem"
        assert bad.parsed.status == 422 and "touchpoint" in str(bad.parsed.errors[0].loc)

        posted = await _api(pkg, "events", "post_events").asyncio_detailed(
            client=client,
            body=_model(pkg, "EventIn").from_dict({"type": "app.opened", "customer_id": cid}),
        )
        assert posted.status_code == 202, posted.content
        assert posted.parsed.accepted == 1 and len(posted.parsed.ids) == 1

        view = _api(pkg, "customers", "customer_view")

        async def counters() -> dict[str, Any]:
            got = await view.asyncio_detailed(customer_id=cid, client=client)
            assert got.status_code == 200, got.content
            return dict(got.parsed.counters.to_dict())

        seen = await eventually(counters, lambda c: "app.opened" in c)
        assert seen["app.opened"]["1d"] == 1
