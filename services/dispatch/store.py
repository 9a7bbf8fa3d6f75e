"""All SQL of the message table: intake, the send queue's claims, outcomes, reads, erasure.

The table is the queue. A request is inserted once (the tracking id is the key, so a
redelivery — or a batch page redone days later, long after JetStream's duplicate window —
inserts nothing); senders claim due rows with ``FOR UPDATE SKIP LOCKED`` and a lease, send,
and write the outcome. A row still ``sending`` when its lease ends was interrupted between
the provider call and the commit: it becomes ``in_doubt`` and is sent again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from shared.contracts.bus import DispatchRequested
from shared.events import iso

S = "dispatch"
WAITING = ("queued", "in_doubt")
FINAL = ("sent", "delivered", "failed", "bounced", "expired")


@dataclass
class NewMessage:
    """A request as it is stored at intake."""

    req: DispatchRequested
    status: str  # queued, or final at once: delivered (in-app), failed, expired
    reason: str | None
    traceparent: str | None
    address_key: str | None
    expires_at: datetime | None
    requested_at: datetime | None
    provider: str | None = None


@dataclass
class Claimed:
    """A row claimed for sending."""

    tracking_id: str
    req: DispatchRequested
    attempt: int  # this attempt's number (1 = first)
    created_at: datetime
    expires_at: datetime | None
    traceparent: str | None
    in_doubt: bool


@dataclass
class Outcome:
    """What one send attempt ended in, to store."""

    tracking_id: str
    status: str  # queued (retry), sent, delivered, failed, bounced, expired
    provider: str | None
    provider_id: str | None
    reason: str | None
    attempts: list[dict[str, Any]]  # this attempt's sends: at, provider, result, reason …
    next_attempt_at: datetime | None = None


async def insert(session: AsyncSession, rows: Sequence[NewMessage], now: datetime) -> set[str]:
    """Store new requests; returns the tracking ids that were new (the others were known)."""
    if not rows:
        return set()
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "t",
            "cu",
            "ca",
            "ch",
            "la",
            "pr",
            "st",
            "ak",
            "rq",
            "tp",
            "re",
            "ex",
            "ra",
            "pv",
        )
    }
    for r in rows:
        q = r.req
        cols["t"].append(q.tracking_id)
        cols["cu"].append(q.customer_id)
        cols["ca"].append(q.campaign_id)
        cols["ch"].append(q.channel)
        cols["la"].append(q.lane)
        cols["pr"].append(q.priority)
        cols["st"].append(r.status)
        cols["ak"].append(r.address_key)
        cols["rq"].append(q.model_dump_json(exclude_none=True))
        cols["tp"].append(r.traceparent)
        cols["re"].append(r.reason)
        cols["ex"].append(r.expires_at)
        cols["ra"].append(r.requested_at)
        cols["pv"].append(r.provider)
    got = await session.execute(
        sa.text(
            f"INSERT INTO {S}.message (tracking_id, customer_id, campaign_id, channel, lane,"
            " priority, status, address_key, request, traceparent, reason, expires_at,"
            " requested_at, provider, next_attempt_at, created_at, updated_at,"
            " delivered_at)"
            " SELECT t, cu, ca, ch, la, pr, st, ak, rq::jsonb, tp, re, ex, ra, pv, :now, :now,"
            " :now, CASE WHEN st = 'delivered' THEN CAST(:now AS timestamptz) END"
            " FROM unnest(CAST(:t AS text[]), CAST(:cu AS text[]), CAST(:ca AS text[]),"
            " CAST(:ch AS text[]), CAST(:la AS text[]), CAST(:pr AS int[]), CAST(:st AS text[]),"
            " CAST(:ak AS text[]), CAST(:rq AS text[]), CAST(:tp AS text[]),"
            " CAST(:re AS text[]), CAST(:ex AS timestamptz[]), CAST(:ra AS timestamptz[]),"
            " CAST(:pv AS text[]))"
            " AS u(t, cu, ca, ch, la, pr, st, ak, rq, tp, re, ex, ra, pv)"
            " ON CONFLICT (tracking_id) DO NOTHING RETURNING tracking_id"
        ),
        {**cols, "now": now},
    )
    return {r[0] for r in got}


async def claim(
    session: AsyncSession,
    *,
    channel: str,
    lane: str,
    limit: int,
    owner: str,
    lease_s: float,
    now: datetime,
) -> list[Claimed]:
    """Take up to ``limit`` due rows of one channel and lane for sending (a leased claim)."""
    # Lock, then update by key: an ``UPDATE … WHERE key IN (SELECT … LIMIT … SKIP LOCKED)``
    # can be planned to run its subquery again per outer row (see ``shared.db.OutboxRelay``).
    ids = (
        (
            await session.execute(
                sa.text(
                    f"SELECT tracking_id FROM {S}.message"
                    " WHERE status IN ('queued', 'in_doubt') AND channel = :ch AND lane = :lane"
                    " AND next_attempt_at <= :now"
                    " ORDER BY priority DESC, next_attempt_at LIMIT :n FOR UPDATE SKIP LOCKED"
                ),
                {"now": now, "ch": channel, "lane": lane, "n": limit},
            )
        )
        .scalars()
        .all()
    )
    if not ids:
        return []
    rows = (
        await session.execute(
            sa.text(
                f"UPDATE {S}.message m SET status = 'sending', claimed_by = :owner,"
                " claimed_until = CAST(:now AS timestamptz) + make_interval(secs => :lease),"
                " attempt_count = m.attempt_count + 1, updated_at = :now"
                " WHERE m.tracking_id = ANY(:ids)"
                " RETURNING m.tracking_id, m.request, m.attempt_count, m.created_at,"
                " m.expires_at, m.traceparent, m.in_doubt"
            ),
            {"owner": owner, "now": now, "lease": lease_s, "ids": list(ids)},
        )
    ).all()
    return [
        Claimed(
            r[0],
            DispatchRequested.model_validate(r[1]),
            int(r[2]),
            r[3],
            r[4],
            r[5],
            bool(r[6]),
        )
        for r in rows
    ]


async def finish(session: AsyncSession, outcomes: Sequence[Outcome], now: datetime) -> None:
    """Store the outcome of claimed rows. Only rows still ``sending`` are written (a claim
    that outlived its lease and was taken again is not overwritten by the late answer) — or
    rows whose provider's receipt (an SMS status callback) arrived before this record: they
    keep the receipt's status and get the attempt."""
    if not outcomes:
        return
    await session.execute(
        sa.text(
            f"UPDATE {S}.message m SET"
            " status = CASE WHEN m.status = 'sending' THEN u.st ELSE m.status END,"
            " provider = COALESCE(u.pv, m.provider),"
            " provider_id = COALESCE(u.pid, m.provider_id),"
            " reason = CASE WHEN m.status = 'sending' THEN u.re ELSE m.reason END,"
            " attempts = m.attempts || u.att::jsonb,"
            " next_attempt_at = COALESCE(u.nx, m.next_attempt_at),"
            " claimed_by = NULL, claimed_until = NULL, updated_at = :now,"
            " sent_at = CASE WHEN u.st IN ('sent', 'delivered') THEN COALESCE(m.sent_at, :now)"
            "  ELSE m.sent_at END,"
            " delivered_at = CASE WHEN u.st = 'delivered' THEN :now ELSE m.delivered_at END,"
            f" local_seq = CASE WHEN u.pv = 'local' THEN nextval('{S}.local_seq')"
            "  ELSE m.local_seq END"
            " FROM unnest(CAST(:t AS text[]), CAST(:st AS text[]), CAST(:pv AS text[]),"
            " CAST(:pid AS text[]), CAST(:re AS text[]), CAST(:att AS text[]),"
            " CAST(:nx AS timestamptz[])) AS u(t, st, pv, pid, re, att, nx)"
            " WHERE m.tracking_id = u.t AND (m.status = 'sending' OR (m.status IN"
            " ('delivered', 'failed') AND m.sent_at IS NULL AND m.claimed_by IS NOT NULL))"
        ),
        {
            "t": [o.tracking_id for o in outcomes],
            "st": [o.status for o in outcomes],
            "pv": [o.provider for o in outcomes],
            "pid": [o.provider_id for o in outcomes],
            "re": [o.reason for o in outcomes],
            "att": [orjson.dumps(o.attempts).decode() for o in outcomes],
            "nx": [o.next_attempt_at for o in outcomes],
            "now": now,
        },
    )


async def recover(session: AsyncSession, *, now: datetime, owner: str | None = None) -> int:
    """Rows whose send was interrupted (lease over, or claimed by this instance's previous
    life) become ``in_doubt`` and due now; the provider may have them already."""
    cond = "claimed_until < :now" if owner is None else "(claimed_until < :now OR claimed_by = :o)"
    got = await session.execute(
        sa.text(
            f"UPDATE {S}.message SET status = 'in_doubt', in_doubt = TRUE, next_attempt_at = :now,"
            " attempts = attempts || jsonb_build_array(jsonb_build_object('at', CAST(:at AS text),"
            " 'result', 'interrupted', 'reason', 'the send was interrupted (process stopped)"
            " between the provider call and its record; sent again')),"
            " claimed_by = NULL, claimed_until = NULL, updated_at = :now"
            f" WHERE status = 'sending' AND {cond} RETURNING tracking_id"
        ),
        {"now": now, "o": owner, "at": iso(now)},
    )
    return len(got.all())


async def mark(
    session: AsyncSession, tracking_id: str, *, status: str, reason: str | None, now: datetime
) -> DispatchRequested | None:
    """A provider's receipt (an SMS status callback): delivered or failed. It may arrive
    before the send itself is recorded (the provider is fast): ``finish`` then keeps it."""
    row = (
        await session.execute(
            sa.text(
                f"UPDATE {S}.message SET status = :st, reason = COALESCE(:re, reason),"
                " delivered_at = CASE WHEN :st = 'delivered' THEN CAST(:now AS timestamptz)"
                "  ELSE delivered_at END,"
                " attempts = attempts || jsonb_build_array(jsonb_build_object('at',"
                " CAST(:at AS text), 'result', 'receipt', 'status', CAST(:st AS text),"
                " 'reason', CAST(:re AS text))), updated_at = :now"
                " WHERE tracking_id = :t AND status IN ('sending', 'sent', 'delivered')"
                " AND status <> :st RETURNING request"
            ),
            {"t": tracking_id, "st": status, "re": reason, "now": now, "at": iso(now)},
        )
    ).first()
    return DispatchRequested.model_validate(row[0]) if row else None


async def get(session: AsyncSession, tracking_id: str) -> dict[str, Any] | None:
    """One message with its attempts."""
    row = (
        (
            await session.execute(
                sa.text(f"SELECT * FROM {S}.message WHERE tracking_id = :t"), {"t": tracking_id}
            )
        )
        .mappings()
        .first()
    )
    return dict(row) if row else None


async def inbox(session: AsyncSession, customer_id: str, now: datetime) -> list[dict[str, Any]]:
    """A customer's in-app messages not yet expired, newest first."""
    rows = (
        await session.execute(
            sa.text(
                f"SELECT tracking_id, request, created_at, expires_at, read_at FROM {S}.message"
                " WHERE customer_id = :c AND channel = 'inapp' AND status = 'delivered'"
                " AND (expires_at IS NULL OR expires_at > :now)"
                " ORDER BY created_at DESC, seq DESC LIMIT 100"
            ),
            {"c": customer_id, "now": now},
        )
    ).mappings()
    return [dict(r) for r in rows]


async def read(
    session: AsyncSession, customer_id: str, message_id: str, now: datetime
) -> tuple[bool, DispatchRequested] | None:
    """Mark an in-app message read: (first time?, request); None if it is not theirs."""
    row = (
        await session.execute(
            sa.text(
                f"SELECT request, read_at FROM {S}.message WHERE tracking_id = :t"
                " AND customer_id = :c AND channel = 'inapp' FOR UPDATE"
            ),
            {"t": message_id, "c": customer_id},
        )
    ).first()
    if row is None:
        return None
    if row[1] is None:
        await session.execute(
            sa.text(
                f"UPDATE {S}.message SET read_at = :now, updated_at = :now WHERE tracking_id = :t"
            ),
            {"t": message_id, "now": now},
        )
    return row[1] is None, DispatchRequested.model_validate(row[0])


async def latest_to(
    session: AsyncSession, address_key: str, *, since: datetime
) -> DispatchRequested | None:
    """The newest SMS sent to a number (what a reply answers)."""
    row = (
        await session.execute(
            sa.text(
                f"SELECT request FROM {S}.message WHERE address_key = :a AND channel = 'sms'"
                " AND status IN ('sent', 'delivered') AND created_at >= :since"
                " ORDER BY created_at DESC LIMIT 1"
            ),
            {"a": address_key, "since": since},
        )
    ).first()
    return DispatchRequested.model_validate(row[0]) if row else None


async def local_outbox(
    session: AsyncSession, *, channel: str | None, after: int, limit: int
) -> list[dict[str, Any]]:
    """What the local outbox received (no provider configured), in delivery order. Rows of the
    last second are left for the next read: a delivery numbered earlier may still be
    committing, and a reader's cursor must not pass it."""
    rows = (
        await session.execute(
            sa.text(
                f"SELECT local_seq AS seq, tracking_id, customer_id, campaign_id, channel,"
                f" status, request, delivered_at FROM {S}.message"
                " WHERE local_seq > :after AND updated_at < now() - interval '1 second'"
                " AND (CAST(:ch AS text) IS NULL OR channel = :ch) ORDER BY local_seq LIMIT :n"
            ),
            {"after": after, "ch": channel, "n": limit},
        )
    ).mappings()
    return [dict(r) for r in rows]


async def erase(session: AsyncSession, ids: Sequence[str], pseudonym: dict[str, str]) -> int:
    """Right to erasure: the customer's messages keep their counts, lose who and what."""
    got = await session.execute(
        sa.text(
            f"UPDATE {S}.message m SET customer_id = u.p, address_key = NULL,"
            " request = (m.request - 'address' - 'content' - 'locale')"
            " || jsonb_build_object('customer_id', u.p),"
            " attempts = '[]'::jsonb, reason = NULL"
            " FROM unnest(CAST(:ids AS text[]), CAST(:ps AS text[])) AS u(c, p)"
            " WHERE m.customer_id = u.c"
        ),
        {"ids": list(ids), "ps": [pseudonym[i] for i in ids]},
    )
    return int(got.rowcount or 0)  # type: ignore[attr-defined]


async def purge(session: AsyncSession, *, before: datetime, limit: int = 10_000) -> int:
    """Delete up to ``limit`` finished messages created before ``before``."""
    got = await session.execute(
        sa.text(
            f"DELETE FROM {S}.message WHERE tracking_id IN (SELECT tracking_id FROM {S}.message"
            " WHERE created_at < :before AND status IN ('sent', 'delivered', 'failed', 'bounced',"
            " 'expired') LIMIT :n)"
        ),
        {"before": before, "n": limit},
    )
    return int(got.rowcount or 0)  # type: ignore[attr-defined]


async def backlog(session: AsyncSession) -> dict[str, int]:
    """Messages waiting to be sent, by channel (the send queue's partial index holds only
    these rows, so this reads the index, not the table)."""
    rows = (
        await session.execute(
            sa.text(
                f"SELECT channel, count(*) FROM {S}.message"
                " WHERE status IN ('queued', 'in_doubt') GROUP BY channel"
            )
        )
    ).all()
    return {str(r[0]): int(r[1]) for r in rows}
