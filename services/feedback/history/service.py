"""The history's service functions: contacts, deliveries, responses, conversions, erasure.

Services never commit: each runs inside the caller's unit of work, and every newly stored
response is announced as ``response.recorded`` through the outbox of that same transaction.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from services.feedback.history.repository import (
    ContactRow,
    Context,
    HistoryRepository,
    PartitionCache,
    ResponseRow,
)
from shared.contracts.bus import (
    ContactRecorded,
    DeliveryReported,
    ResponseReceived,
    ResponseRecorded,
    Reward,
)
from shared.db import Database, UnitOfWork
from shared.events import CloudEvent, iso
from shared.privacy import pseudonym
from shared.rules import parse_duration

SOURCE = "kairos/feedback"
TYPES_TTL_S = 2.0


# Two transactions that increment the same report rows can deadlock (a contact batch that
# also records conversions touches them in two statements); Postgres aborts one of them.
RETRYABLE_SQLSTATES = ("40P01", "40001")


def retryable(exc: BaseException) -> bool:
    """A deadlock or serialization failure: the same work succeeds when tried again."""
    orig = getattr(exc, "orig", None)
    state = getattr(orig, "sqlstate", None) or getattr(
        getattr(orig, "__cause__", None), "sqlstate", None
    )
    return state in RETRYABLE_SQLSTATES


def parse_time(text: str) -> datetime:
    """An RFC 3339 time as an aware datetime (naive times are UTC)."""
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


@dataclass
class State:
    """Per-process caches: partitions that exist, event types some conversion rule names."""

    secret: str = ""
    partitions: PartitionCache = field(default_factory=PartitionCache)
    types: dict[str, int] = field(default_factory=dict)
    types_loaded: float = 0.0
    any_erased: bool = True
    erased_checked: float = 0.0
    # Conversion types noted by a transaction not yet committed.
    pending: dict[str, int] = field(default_factory=dict)

    def learn(self) -> bool:
        """The transaction that noted ``pending`` types committed: use them from now on.
        Whether a type is new to this process."""
        new = any(t not in self.types for t in self.pending)
        for t, w in self.pending.items():
            self.types[t] = max(w, self.types.get(t, 0))
        self.pending.clear()
        return new

    async def pseudonymise(self, uow: UnitOfWork, customers: Sequence[str]) -> dict[str, str]:
        """Erased customers among these, with their pseudonyms (none is the usual answer,
        checked without hashing anything while nobody was ever erased)."""
        repo = HistoryRepository(uow.session)
        if time.monotonic() - self.erased_checked > TYPES_TTL_S:
            self.any_erased = await repo.any_erased()
            self.erased_checked = time.monotonic()
        if not self.any_erased or not customers:
            return {}
        names = {c: pseudonym(self.secret, c) for c in set(customers)}
        gone = await repo.erased(list(names.values()))
        return {c: p for c, p in names.items() if p in gone}

    async def conversion_types(self, uow: UnitOfWork) -> dict[str, int]:
        """The conversion event types, refreshed from the database every couple of seconds
        (another replica may have learnt one)."""
        if time.monotonic() - self.types_loaded > TYPES_TTL_S:
            self.types.update(await HistoryRepository(uow.session).conversion_types())
            self.types_loaded = time.monotonic()
        return self.types


@dataclass
class Recorded:
    """What ``record_responses`` did with its input."""

    stored: list[ResponseRecorded] = field(default_factory=list)
    duplicates: list[ResponseReceived] = field(default_factory=list)
    unknown: list[ResponseReceived] = field(default_factory=list)
    # Per input item, in order: "stored", "duplicate" or "unknown".
    outcome: list[str] = field(default_factory=list)


def contact_row(msg: ContactRecorded) -> ContactRow:
    """The stored form of a ``contact.recorded`` message."""
    within = None
    if msg.conversion is not None:
        try:
            within = parse_duration(msg.conversion.within)
        except ValueError:
            within = None
    return ContactRow(
        tracking_id=msg.tracking_id,
        at=parse_time(msg.time),
        customer_id=msg.customer_id,
        campaign_id=msg.campaign_id,
        decision_id=msg.decision_id,
        treatment=msg.treatment,
        offer_id=msg.offer_id,
        touchpoint=msg.touchpoint,
        channel=msg.channel,
        placement=msg.placement,
        control=msg.control,
        control_kind=msg.control_kind if msg.control else None,
        status="control" if msg.control else msg.status,
        conversion_event=msg.conversion.event if msg.conversion and within else None,
        conversion_within_s=within,
        reward=msg.reward.model_dump() if msg.reward else None,
        value=msg.value,
        run_id=msg.run_id,
    )


async def record_contacts(
    db: Database, uow: UnitOfWork, state: State, rows: Sequence[ContactRow]
) -> list[ContactRow]:
    """Store contacts (once per tracking id), open their conversion windows and attribute
    conversion events that arrived before them."""
    await state.partitions.ensure(db.engine, [r.at for r in rows])
    gone = await state.pseudonymise(uow, [r.customer_id for r in rows])
    if gone:
        rows = [replace(r, customer_id=gone.get(r.customer_id, r.customer_id)) for r in rows]
    repo = HistoryRepository(uow.session)
    new = await repo.insert_contacts(rows)
    learnt: dict[str, int] = {}
    for r in new:
        if r.conversion_event and r.conversion_within_s:
            known = max(state.types.get(r.conversion_event, 0), learnt.get(r.conversion_event, 0))
            if r.conversion_within_s > known:
                learnt[r.conversion_event] = r.conversion_within_s
    if learnt:
        await repo.note_conversion_types(learnt)
        # Known to this process's event consumer at once (once committed: see ``learn``).
        state.pending.update(learnt)
    with_rule = [r.tracking_id for r in new if r.conversion_event]
    if with_rule:
        await _convert(db, uow, state, await repo.first_conversions(tracking_ids=with_rule))
    return new


async def apply_deliveries(uow: UnitOfWork, reports: Sequence[DeliveryReported]) -> set[str]:
    """Update contact statuses from delivery reports; returns the tracking ids matched."""
    items = [
        (r.tracking_id, r.status, parse_time(r.time))
        for r in reports
        if r.status in ("sent", "delivered", "failed", "bounced", "expired")
    ]
    matched = await HistoryRepository(uow.session).apply_deliveries(items)
    return matched | {r.tracking_id for r in reports if r.status == "token_invalid"}


def _reward(ctx: Context) -> Reward | None:
    return Reward.model_validate(ctx.reward) if ctx.reward else None


async def record_responses(
    db: Database,
    uow: UnitOfWork,
    state: State,
    items: Sequence[ResponseReceived],
    *,
    event_ids: dict[int, str] | None = None,
) -> Recorded:
    """Store responses once per (tracking id, outcome) and announce each new one."""
    repo = HistoryRepository(uow.session)
    contexts = await repo.contexts([i.tracking_id for i in items])
    out = Recorded(outcome=["unknown"] * len(items))
    rows: list[ResponseRow] = []
    given: list[int] = []
    for n, item in enumerate(items):
        ctx = contexts.get(item.tracking_id)
        if ctx is None:
            out.unknown.append(item)
            continue
        rows.append(
            ResponseRow(
                ctx=ctx,
                outcome=item.outcome,
                at=parse_time(item.time),
                value=item.value,
                channel=item.channel or ctx.channel,
                link=item.link,
                text=item.text,
                choice=item.choice,
                source=item.source,
                event_id=(event_ids or {}).get(n),
            )
        )
        given.append(n)
    if not rows:
        return out
    await state.partitions.ensure(db.engine, [r.at for r in rows])
    new = await repo.insert_responses(rows)
    await repo.count_clicks(
        [
            (r.ctx.tracking_id, r.ctx.campaign_id, r.link)
            for r in rows
            if r.outcome == "clicked" and r.link
        ]
    )
    announced: set[tuple[str, str]] = set()
    for r, n in zip(rows, given, strict=True):
        item = items[n]
        key = (r.ctx.tracking_id, r.outcome)
        if key not in new or key in announced:
            out.duplicates.append(item)
            out.outcome[n] = "duplicate"
            continue
        announced.add(key)
        out.outcome[n] = "stored"
        rec = ResponseRecorded(
            tracking_id=r.ctx.tracking_id,
            customer_id=r.ctx.customer_id,
            campaign_id=r.ctx.campaign_id,
            outcome=item.outcome,
            time=iso(r.at),
            offer_id=r.ctx.offer_id,
            treatment=r.ctx.treatment,
            channel=r.channel,
            control=r.ctx.control,
            value=r.value,
            link=r.link,
            text=r.text,
            choice=r.choice,
            # A control contact was offered nothing: nothing to grant.
            reward=None if r.ctx.control else _reward(r.ctx),
            source=r.source,
        )
        uow.emit(*rec.to_event(source=SOURCE, id_=rec.event_id_()))
        out.stored.append(rec)
    if any(r.outcome == "converted" for r in rows):
        await repo.close_windows([r.ctx.tracking_id for r in rows if r.outcome == "converted"])
    return out


async def _convert(
    db: Database,
    uow: UnitOfWork,
    state: State,
    firsts: Sequence[tuple[str, str, datetime, float | None]],
) -> None:
    if not firsts:
        return
    items = [
        ResponseReceived(
            tracking_id=t, outcome="converted", time=iso(at), value=revenue, source="event"
        )
        for t, _, at, revenue in firsts
    ]
    await record_responses(db, uow, state, items, event_ids={n: f[1] for n, f in enumerate(firsts)})


@dataclass(frozen=True)
class Conversion:
    """What attribution needs of one behavioural event."""

    event_id: str
    type: str
    customer_id: str
    at: datetime
    revenue: float | None

    @classmethod
    def from_cloudevent(cls, ev: CloudEvent) -> Conversion | None:
        """The event, if it is about a known customer (anonymous events convert nothing)."""
        d = ev.data
        customer = d.get("customer_id")
        if not customer or not isinstance(d.get("type"), str):
            return None
        props: dict[str, Any] = d.get("properties") or {}
        revenue = props.get("value", props.get("amount"))
        if isinstance(revenue, bool) or not isinstance(revenue, (int, float)):
            revenue = None
        return cls(
            event_id=ev.id,
            type=d["type"],
            customer_id=str(customer),
            at=parse_time(str(d.get("time") or ev.time)),
            revenue=float(revenue) if revenue is not None else None,
        )


async def attribute_events(
    db: Database, uow: UnitOfWork, state: State, events: Sequence[Conversion]
) -> int:
    """Keep events of conversion types and convert the open windows they fall in."""
    types = await state.conversion_types(uow)
    kept = [e for e in events if e.type in types]
    if kept:
        gone = await state.pseudonymise(uow, [e.customer_id for e in kept])
        kept = [e for e in kept if e.customer_id not in gone]
    if not kept:
        return 0
    repo = HistoryRepository(uow.session)
    await repo.store_events([(e.event_id, e.customer_id, e.type, e.at, e.revenue) for e in kept])
    firsts = await repo.first_conversions(customers=[e.customer_id for e in kept])
    await _convert(db, uow, state, firsts)
    return len(firsts)


async def erase(uow: UnitOfWork, state: State, *, ids: Sequence[str]) -> None:
    """Drop the personal data of a customer (and the ids folded into it) from every row."""
    repo = HistoryRepository(uow.session)
    for cid in dict.fromkeys(ids):
        await repo.erase(cid, pseudonym(state.secret, cid))
    state.any_erased = True


async def prune(uow: UnitOfWork, state: State, now: datetime) -> None:
    """Forget conversion windows closed over a week ago and events no window can use."""
    longest = max((await state.conversion_types(uow)).values(), default=0)
    grace = timedelta(days=7)
    await HistoryRepository(uow.session).prune(
        windows_before=now - grace, events_before=now - grace - timedelta(seconds=longest)
    )
