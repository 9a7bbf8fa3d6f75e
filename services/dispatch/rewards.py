"""Rewards: an accepted or converted offer's reward is granted once per tracking id through
the bonus system's signed webhook, and can be revoked once.

Exactly once to the customer: the reward row is created and locked (``FOR UPDATE``) in one
transaction that also holds the webhook call, so two replicas or a redelivered response see
``granted`` and call nothing; a crash between the bonus system's answer and our commit is
covered by the ``Idempotency-Key`` (the retry is answered from the receiver's memory).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Path
from nats.aio.msg import Msg
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from services.dispatch.channels import rewards_client
from services.dispatch.channels.rewards_client import Action, Answer, RewardsClient, grant_id
from shared.bus import Consumer, TransientError
from shared.contracts import rewards as api
from shared.contracts.bus import ProfileErased, ResponseRecorded
from shared.db import Database
from shared.errors import Conflict, DomainError, NotFound, Unavailable
from shared.events import CloudEvent
from shared.privacy import any_customer, pseudonym
from shared.service import Runtime, runtime

log = logging.getLogger("kairos.dispatch.rewards")

router = APIRouter(tags=["rewards"])
GRANTED_ON = frozenset({"accepted", "converted"})
KEEP_ATTEMPTS = 20  # the newest answers are kept; older ones only count
PARALLEL = 8  # webhook calls at once per replica (each holds a row lock and a connection)
UNAVAILABLE = (OperationalError, InterfaceError, ConnectionError, TimeoutError)
COLUMNS = (
    "tracking_id, grant_id, customer_id, campaign_id, offer_id, type, amount, state, reason,"
    " attempts, created_at, updated_at, granted_at, revoked_at"
)


class BadGateway(DomainError):
    status = 502
    title = "Bad gateway"


def _now() -> datetime:
    return datetime.now(UTC)


class RewardRepository:
    """All SQL of ``dispatch.reward``."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def create(self, rec: ResponseRecorded) -> None:
        """The pending reward of a response, unless the tracking id has one already."""
        assert rec.reward is not None
        await self.session.execute(
            sa.text(
                "INSERT INTO dispatch.reward (tracking_id, grant_id, customer_id, campaign_id,"
                " offer_id, type, amount, state) VALUES (:t, :g, :c, :cmp, :o, :ty, :a, 'pending')"
                " ON CONFLICT (tracking_id) DO NOTHING"
            ),
            {
                "t": rec.tracking_id,
                "g": grant_id(rec.tracking_id),
                "c": rec.customer_id,
                "cmp": rec.campaign_id,
                "o": rec.offer_id,
                "ty": rec.reward.type,
                "a": rec.reward.amount,
            },
        )

    async def get(self, tracking_id: str, *, lock: bool = False) -> dict[str, Any] | None:
        sql = f"SELECT {COLUMNS} FROM dispatch.reward WHERE tracking_id = :t"
        row = (
            (
                await self.session.execute(
                    sa.text(sql + (" FOR UPDATE" if lock else "")), {"t": tracking_id}
                )
            )
            .mappings()
            .first()
        )
        return dict(row) if row is not None else None

    async def record(
        self,
        row: dict[str, Any],
        *,
        state: str,
        reason: str | None,
        attempt: dict[str, Any],
        stamp: str | None = None,
    ) -> dict[str, Any]:
        """Store the outcome of one webhook call; ``stamp`` is granted_at or revoked_at."""
        attempts = [*row["attempts"], attempt][-KEEP_ATTEMPTS:]
        stamp_sql = f", {stamp} = now()" if stamp in ("granted_at", "revoked_at") else ""
        new = (
            (
                await self.session.execute(
                    sa.text(
                        "UPDATE dispatch.reward SET state = :s, reason = :r,"
                        " attempts = CAST(:a AS jsonb), updated_at = now()"
                        f"{stamp_sql} WHERE tracking_id = :t RETURNING {COLUMNS}"
                    ).bindparams(sa.bindparam("a", type_=sa.JSON)),
                    {"s": state, "r": reason, "a": attempts, "t": row["tracking_id"]},
                )
            )
            .mappings()
            .one()
        )
        return dict(new)

    async def pseudonymise(self, ids: Sequence[str], pseudonym: str) -> int:
        """Replace an erased customer's id and drop the bonus system's answers (they may
        echo personal data); the counts and amounts stay for reports."""
        result = await self.session.execute(
            sa.text(
                "UPDATE dispatch.reward SET customer_id = :p, updated_at = now(),"
                " attempts = (SELECT coalesce(jsonb_agg(a - 'answer'), '[]'::jsonb)"
                "             FROM jsonb_array_elements(attempts) a)"
                " WHERE customer_id = ANY(:ids)"
            ),
            {"p": pseudonym, "ids": list(ids)},
        )
        return int(getattr(result, "rowcount", 0) or 0)


def _payload(row: dict[str, Any], action: Action) -> dict[str, Any]:
    return {
        "grant_id": row["grant_id"],
        "tracking_id": row["tracking_id"],
        "customer_id": row["customer_id"],
        "type": row["type"],
        "amount": row["amount"],
        "action": action,
    }


def _attempt(answer: Answer, action: Action) -> dict[str, Any]:
    return answer.record(action, _now().isoformat())


class Rewards:
    """Grants (from ``response.recorded``), revokes (the API) and erasure of rewards."""

    def __init__(
        self, db: Database, client: RewardsClient | None, *, pseudonym_key: str, max_age_s: float
    ) -> None:
        self.db = db
        self.client = client
        self.pseudonym_key = pseudonym_key
        self.max_age_s = max_age_s
        self._parallel = asyncio.Semaphore(PARALLEL)

    async def handle_responses(self, batch: Sequence[tuple[Msg, CloudEvent]]) -> list[Msg]:
        """Consumer handler: grant what earns a reward; transient failures come back later."""
        todo: list[tuple[Msg, ResponseRecorded]] = []
        for msg, ev in batch:
            try:
                rec = ResponseRecorded.parse(ev)
            except ValidationError as exc:
                log.error("response.recorded %s is malformed, skipped: %s", ev.id, exc)
                continue
            if rec.outcome in GRANTED_ON and rec.reward is not None and not rec.control:
                todo.append((msg, rec))

        async def one(msg: Msg, rec: ResponseRecorded) -> Msg | None:
            async with self._parallel:
                return msg if await self.grant(rec) else None

        try:
            results = await asyncio.gather(*(one(m, r) for m, r in todo))
        except UNAVAILABLE as exc:  # the database is down: retry, never dead-letter a grant
            raise TransientError(f"rewards: {type(exc).__name__}: {exc}") from exc
        return [m for m in results if m is not None]

    async def grant(self, rec: ResponseRecorded) -> bool:
        """Grant the reward of one response once; True when it must be tried again later."""
        assert self.client is not None
        async with self.db.transaction() as uow:
            repo = RewardRepository(uow.session)
            await repo.create(rec)
            row = await repo.get(rec.tracking_id, lock=True)
            if row is None or row["state"] != "pending":
                return False  # granted, revoked or failed before: a redelivery
            answer = await self.client.call(_payload(row, "grant"))
            attempt = _attempt(answer, "grant")
            if answer.outcome == "ok":
                await repo.record(
                    row, state="granted", reason=None, attempt=attempt, stamp="granted_at"
                )
                return False
            reason = f"{answer.status or 'no answer'}: {answer.detail}"[:500]
            age = (_now() - row["created_at"]).total_seconds()
            if answer.outcome == "permanent" or age > self.max_age_s:
                if answer.outcome == "transient":
                    reason = f"gave up after {age:.0f}s; last answer {reason}"
                log.warning("reward %s failed: %s", row["grant_id"], reason)
                await repo.record(row, state="failed", reason=reason, attempt=attempt)
                return False
            await repo.record(row, state="pending", reason=reason, attempt=attempt)
            return True

    async def get(self, tracking_id: str) -> dict[str, Any]:
        """The reward of a tracking id; 404 if none."""
        async with self.db.transaction() as uow:
            row = await RewardRepository(uow.session).get(tracking_id)
        if row is None:
            raise NotFound(f"No reward for tracking id {tracking_id!r}.")
        return row

    async def revoke(self, tracking_id: str) -> dict[str, Any]:
        """Revoke a granted reward once; revoking it again answers the same, calls nothing."""
        failure: DomainError | None = None
        async with self.db.transaction() as uow:
            repo = RewardRepository(uow.session)
            row = await repo.get(tracking_id, lock=True)
            if row is None:
                raise NotFound(f"No reward for tracking id {tracking_id!r}.")
            if row["state"] == "revoked":
                return row
            if row["state"] != "granted":
                raise Conflict(
                    f"The reward is {row['state']}; only a granted reward can be revoked."
                )
            if self.client is None:
                raise Unavailable("No rewards webhook is configured (KAIROS_REWARDS_URL).")
            answer = await self.client.call(_payload(row, "revoke"))
            attempt = _attempt(answer, "revoke")
            if answer.outcome == "ok":
                return await repo.record(
                    row, state="revoked", reason=None, attempt=attempt, stamp="revoked_at"
                )
            # Keep the attempt (it is the audit trail) and tell the caller what happened.
            await repo.record(row, state="granted", reason=row["reason"], attempt=attempt)
            said = f"{answer.status or 'no answer'}: {answer.detail}"[:300]
            if answer.outcome == "transient":
                failure = Unavailable(f"The bonus system did not revoke it ({said}); retry.")
            else:
                failure = BadGateway(f"The bonus system refused the revoke ({said}).")
        raise failure

    def pseudonym(self, customer_id: str) -> str:
        """The erased customer's stand-in (shared.privacy: the same in every service)."""
        return pseudonym(self.pseudonym_key, customer_id)

    async def handle_erased(self, batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
        """Consumer handler of ``profile.erased``: nothing personal stays in the table."""
        try:
            await self._erase(batch)
        except UNAVAILABLE as exc:
            raise TransientError(f"rewards erasure: {type(exc).__name__}: {exc}") from exc

    async def _erase(self, batch: Sequence[tuple[Msg, CloudEvent]]) -> None:
        async with self.db.transaction() as uow:
            repo = RewardRepository(uow.session)
            for _, ev in batch:
                try:
                    erased = ProfileErased.parse(ev)
                except ValidationError as exc:
                    log.error("profile.erased %s is malformed, skipped: %s", ev.id, exc)
                    continue
                ids = sorted({erased.customer_id, *erased.ids})
                await repo.pseudonymise(ids, self.pseudonym(erased.customer_id))


def _rewards(rt: Annotated[Runtime, Depends(runtime)]) -> Rewards:
    rewards: Rewards = rt.extras["rewards"]
    return rewards


RewardsDep = Annotated[Rewards, Depends(_rewards)]
TrackingId = Annotated[str, Path(pattern=api.TRACKING_ID_PATTERN)]


@router.get("/v1/rewards/{tracking_id}", response_model=api.Reward)
async def get_reward(tracking_id: TrackingId, rewards: RewardsDep) -> dict[str, Any]:
    """The reward granted for a contact and its state."""
    return await rewards.get(tracking_id)


@router.post("/v1/rewards/{tracking_id}/revoke", response_model=api.Reward)
async def revoke_reward(tracking_id: TrackingId, rewards: RewardsDep) -> dict[str, Any]:
    """Revoke a granted reward (once; again answers the same)."""
    return await rewards.revoke(tracking_id)


async def setup(rt: Runtime) -> None:
    """Wire rewards into the dispatch process: its state and its two durable consumers."""
    assert rt.db is not None
    cfg = rt.settings
    client = rewards_client.from_settings(cfg)
    rewards = Rewards(
        rt.db, client, pseudonym_key=cfg.link_signer_secret(), max_age_s=cfg.dispatch_max_age_s
    )
    rt.extras["rewards"] = rewards
    if client is not None:
        rt.closers.append(client.close)
    if not cfg.run_consumers:
        return
    if client is None:
        log.info("rewards are not granted: KAIROS_REWARDS_URL is not set")
    else:
        rt.consumers.append(
            Consumer(
                rt.bus,
                "dispatch-rewards",
                [any_customer("response.recorded")],
                "RESPONSE",
                rewards.handle_responses,
                batch=100,
                max_deliver=cfg.consumer_max_deliver,
                nak_delay_s=3.0,  # a bonus system answering 5xx is retried every few seconds
            )
        )
    rt.consumers.append(
        Consumer(
            rt.bus,
            "dispatch-rewards-erasure",
            [any_customer("profile.erased")],
            "PROFILE",
            rewards.handle_erased,
            max_deliver=cfg.consumer_max_deliver,
        )
    )
