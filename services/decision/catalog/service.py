"""Catalog use cases: offers, campaigns, and the campaign lifecycle with four-eyes approval.

Services never commit: callers pass a unit of work. Every change is announced as
``catalog.changed`` through the outbox, so every decision replica reloads it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from services.decision import templating
from services.decision.catalog.repository import CampaignRepository, OfferRepository
from services.decision.models import Campaign, CampaignTransition, Offer
from shared import rules
from shared.contracts import catalog as api
from shared.contracts.bus import CatalogChanged
from shared.db import UnitOfWork
from shared.errors import Conflict, Forbidden, NotFound, Unprocessable

SOURCE = "kairos/decision"
EDITABLE = ("draft", "paused")
# action → (states it may start from, the state it leads to)
TRANSITIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "submit": (("draft",), "submitted"),
    "approve": (("submitted",), "approved"),
    "activate": (("approved", "paused"), "active"),
    "pause": (("active",), "paused"),
    "complete": (("active", "paused"), "completed"),
}


def changed(
    uow: UnitOfWork,
    kind: Literal["offer", "campaign", "contact_policy"],
    key: str,
    version: int,
    state: str | None = None,
) -> None:
    """Announce a catalog change (through the outbox): every replica reloads."""
    uow.emit(
        *CatalogChanged(kind=kind, id=key, version=version, state=state).to_event(source=SOURCE)
    )


def _rule(doc: Any, loc: list[str | int], *, event_props: bool = False) -> rules.Node:
    """A rule of a campaign field, or 422 naming the place inside it."""
    try:
        node = rules.parse(doc)
    except rules.RuleError as exc:
        steps = exc.loc.replace("[", ".").replace("]", "").split(".")[1:]
        where = [*loc, *(int(s) if s.isdigit() else s for s in steps)]
        raise Unprocessable(
            f"{'.'.join(str(x) for x in loc)}{exc.loc[4:]}: {exc.msg}",
            errors=[{"loc": where, "msg": exc.msg}],
        ) from exc
    if not event_props and rules.uses_event_props(node):
        raise Unprocessable(
            f"{'.'.join(str(x) for x in loc)}: 'prop' reads the firing event and is "
            "only allowed in trigger.where",
            errors=[{"loc": loc, "msg": "'prop' is only allowed in trigger.where"}],
        )
    return node


# -- offers ---------------------------------------------------------------------------------
def offer_view(o: Offer) -> api.Offer:
    return api.Offer(
        **o.body,
        offer_id=o.offer_id,
        version=o.version,
        created_at=o.created_at,
        updated_at=o.updated_at,
    )


async def put_offer(uow: UnitOfWork, *, offer_id: str, body: api.OfferPut, now: datetime) -> Offer:
    doc = body.model_dump(mode="json", exclude_none=True)
    try:
        templating.check(doc["content"])
    except templating.TemplateError as exc:
        where = ".".join(str(x) for x in exc.loc)
        raise Unprocessable(
            f"{where}: {exc.msg}", errors=[{"loc": exc.loc, "msg": exc.msg}]
        ) from exc
    repo = OfferRepository(uow.session)
    offer = await repo.get(offer_id, for_update=True)
    if offer is None:
        offer = repo.add(Offer(offer_id=offer_id, body=doc, created_at=now, updated_at=now))
    else:
        offer.body, offer.version, offer.updated_at = doc, offer.version + 1, now
    await uow.session.flush()
    changed(uow, "offer", offer_id, offer.version)
    return offer


async def get_offer(uow: UnitOfWork, offer_id: str) -> Offer:
    offer = await OfferRepository(uow.session).get(offer_id)
    if offer is None:
        raise NotFound(f"Offer '{offer_id}' does not exist.")
    return offer


# -- campaigns ------------------------------------------------------------------------------
def campaign_view(c: Campaign) -> api.Campaign:
    return api.Campaign(
        **c.body,
        campaign_id=c.campaign_id,
        state=c.state,  # type: ignore[arg-type]
        version=c.version,
        created_at=c.created_at,
        updated_at=c.updated_at,
        updated_by=c.updated_by,
    )


async def _validate_campaign(uow: UnitOfWork, body: api.CampaignPut) -> None:
    if body.audience is not None:
        _rule(body.audience, ["audience"])
    for i, t in enumerate(body.treatments):
        if t.tier is not None:
            _rule(t.tier, ["treatments", i, "tier"])
    ids = [t.id for t in body.treatments]
    for i, tid in enumerate(ids):
        if ids.index(tid) != i:
            raise Unprocessable(
                f"treatments[{i}].id: treatment '{tid}' appears twice",
                errors=[{"loc": ["treatments", i, "id"], "msg": "duplicate treatment id"}],
            )
    known = await OfferRepository(uow.session).existing([t.offer for t in body.treatments])
    for i, t in enumerate(body.treatments):
        if t.offer not in known:
            raise Unprocessable(
                f"treatments[{i}].offer: unknown offer '{t.offer}'; create it first",
                errors=[{"loc": ["treatments", i, "offer"], "msg": "unknown offer"}],
            )
    if body.type == "triggered":
        if body.trigger is None:
            raise Unprocessable(
                "trigger: a triggered campaign needs a trigger",
                errors=[{"loc": ["trigger"], "msg": "required for type 'triggered'"}],
            )
        if body.trigger.where is not None:
            _rule(body.trigger.where, ["trigger", "where"], event_props=True)
    elif body.trigger is not None:
        raise Unprocessable(
            f"trigger: only triggered campaigns have one (this one is '{body.type}')",
            errors=[{"loc": ["trigger"], "msg": "only for type 'triggered'"}],
        )
    if body.type == "realtime" and not body.touchpoints:
        raise Unprocessable(
            "touchpoints: a realtime campaign answers at one touchpoint at least",
            errors=[{"loc": ["touchpoints"], "msg": "required for type 'realtime'"}],
        )
    if body.type in ("triggered", "batch") and not body.channels and not body.touchpoints:
        raise Unprocessable(
            "channels: an outbound campaign needs at least one channel",
            errors=[{"loc": ["channels"], "msg": "required for outbound campaigns"}],
        )
    s = body.schedule
    if s.start and s.end and s.end <= s.start:
        raise Unprocessable(
            "schedule.end must be after schedule.start",
            errors=[{"loc": ["schedule", "end"], "msg": "must be after start"}],
        )


async def put_campaign(
    uow: UnitOfWork,
    *,
    campaign_id: str,
    body: api.CampaignPut,
    principal: str | None,
    now: datetime,
) -> Campaign:
    """Create a draft or replace a draft/paused campaign (others are 409)."""
    await _validate_campaign(uow, body)
    doc = body.model_dump(mode="json")
    repo = CampaignRepository(uow.session)
    camp = await repo.get(campaign_id, for_update=True)
    if camp is None:
        camp = repo.add(
            Campaign(
                campaign_id=campaign_id,
                body=doc,
                state="draft",
                created_at=now,
                updated_at=now,
                updated_by=principal,
            )
        )
        repo.record(
            CampaignTransition(
                campaign_id=campaign_id,
                from_state=None,
                to_state="draft",
                principal=principal,
                at=now,
            )
        )
    else:
        if camp.state not in EDITABLE:
            raise Conflict(
                f"Campaign '{campaign_id}' is {camp.state}; only draft and paused campaigns "
                "can be edited (pause it first).",
                errors=[{"loc": ["path", "campaign_id"], "msg": f"state is {camp.state}"}],
            )
        camp.body, camp.version = doc, camp.version + 1
        camp.updated_at, camp.updated_by = now, principal
    await uow.session.flush()
    changed(uow, "campaign", campaign_id, camp.version, state=camp.state)
    return camp


async def get_campaign(uow: UnitOfWork, campaign_id: str, *, for_update: bool = False) -> Campaign:
    camp = await CampaignRepository(uow.session).get(campaign_id, for_update=for_update)
    if camp is None:
        raise NotFound(f"Campaign '{campaign_id}' does not exist.")
    return camp


async def transition(
    uow: UnitOfWork, *, campaign_id: str, action: str, principal: str | None, now: datetime
) -> Campaign:
    """Move a campaign along its lifecycle; a wrong move is 409 naming the current state.

    The gateway lets only keys with ``campaigns:approve`` call approve; here the four-eyes
    rule is kept: the approver must not be the principal who submitted."""
    camp = await get_campaign(uow, campaign_id, for_update=True)
    starts, target = TRANSITIONS[action]
    approval = bool(camp.body.get("approval_required", True))
    if action == "activate" and camp.state == "draft" and not approval:
        starts = ("draft",)  # no approval needed: straight to active
    if action == "approve" and camp.state == "submitted":
        if principal is None or camp.submitted_by == principal:
            raise Forbidden(
                f"'{principal}' submitted this campaign; another principal must approve it."
            )
    if camp.state not in starts:
        hint = (
            " It needs approval: submit, then approve."
            if action == "activate" and camp.state == "draft"
            else ""
        )
        raise Conflict(
            f"Campaign '{campaign_id}' is {camp.state}; '{action}' needs it to be "
            f"{' or '.join(starts)}.{hint}",
            errors=[{"loc": ["path", "campaign_id"], "msg": f"state is {camp.state}"}],
        )
    if action == "submit":
        camp.submitted_by = principal
    previous = camp.state
    camp.state, camp.updated_at, camp.updated_by = target, now, principal
    CampaignRepository(uow.session).record(
        CampaignTransition(
            campaign_id=campaign_id,
            from_state=previous,
            to_state=target,
            principal=principal,
            at=now,
        )
    )
    await uow.session.flush()
    changed(uow, "campaign", campaign_id, camp.version, state=target)
    return camp


async def transitions(uow: UnitOfWork, campaign_id: str) -> api.TransitionList:
    camp = await get_campaign(uow, campaign_id)
    rows = await CampaignRepository(uow.session).transitions(campaign_id)
    return api.TransitionList(
        campaign_id=campaign_id,
        state=camp.state,  # type: ignore[arg-type]
        transitions=[
            api.Transition(
                from_state=t.from_state,  # type: ignore[arg-type]
                to_state=t.to_state,  # type: ignore[arg-type]
                principal=t.principal,
                at=t.at,
            )
            for t in rows
        ],
    )
