"""SQL of the history: set-based writes (one statement per batch) and keyset reads.

Every write statement inserts into a narrow key table first (``contact_key``,
``response_key``) and carries on only with the rows that were new, so a message delivered
twice, a re-planned batch page or two concurrent duplicate requests count once; the report
aggregates are incremented in the same statement from exactly those rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from shared.contracts.bus import OUTCOMES

S = "feedback"
DELIVERY = ("sent", "delivered", "failed", "bounced", "expired")
RESPONSE_COUNTS = OUTCOMES  # every response outcome has its own count in the report rows
AGG_KEY = "campaign_id, day, treatment, channel, control, control_kind"


@dataclass(frozen=True)
class ContactRow:
    """One contact as stored."""

    tracking_id: str
    at: datetime
    customer_id: str
    campaign_id: str
    decision_id: str | None
    treatment: str | None
    offer_id: str | None
    touchpoint: str | None
    channel: str | None
    placement: str | None
    control: bool
    control_kind: str | None
    status: str
    conversion_event: str | None
    conversion_within_s: int | None
    reward: dict[str, Any] | None
    value: float | None
    run_id: str | None


@dataclass(frozen=True)
class Context:
    """What a response needs of its contact."""

    tracking_id: str
    at: datetime
    customer_id: str
    campaign_id: str
    treatment: str | None
    offer_id: str | None
    channel: str | None
    control: bool
    control_kind: str | None
    reward: dict[str, Any] | None


@dataclass(frozen=True)
class ResponseRow:
    """One response matched to its contact, ready to store."""

    ctx: Context
    outcome: str
    at: datetime
    value: float | None
    channel: str | None
    link: str | None
    text: str | None
    choice: str | None
    source: str | None
    event_id: str | None


def _arr(rows: Sequence[Any], attr: str) -> list[Any]:
    return [getattr(r, attr) for r in rows]


class PartitionCache:
    """Months whose partitions exist; creating one is a separate short transaction, so a
    batch never holds the parent's lock while it writes."""

    def __init__(self) -> None:
        self.months: set[date] = set()

    async def ensure(self, engine: AsyncEngine, times: Sequence[datetime]) -> None:
        """Create the monthly partitions of ``times`` that this process has not seen yet."""
        wanted = {date(t.year, t.month, 1) for t in times} - self.months
        if not wanted:
            return
        async with engine.begin() as conn:
            await conn.execute(
                sa.text(f"SELECT {S}.ensure_partitions(CAST(:m AS date[]))"),
                {"m": sorted(wanted)},
            )
        self.months |= wanted


class HistoryRepository:
    """Reads and writes of contacts, responses and their aggregates."""

    def __init__(self, session: AsyncSession | AsyncConnection) -> None:
        self.session = session

    async def insert_contacts(self, rows: Sequence[ContactRow]) -> list[ContactRow]:
        """Store the contacts not seen before; returns those (aggregates included)."""
        if not rows:
            return []
        stmt = f"""
        WITH input AS (
          SELECT * FROM unnest(
            CAST(:tracking_id AS text[]), CAST(:at AS timestamptz[]),
            CAST(:customer_id AS text[]), CAST(:campaign_id AS text[]),
            CAST(:decision_id AS text[]), CAST(:treatment AS text[]), CAST(:offer_id AS text[]),
            CAST(:touchpoint AS text[]), CAST(:channel AS text[]), CAST(:placement AS text[]),
            CAST(:control AS boolean[]), CAST(:control_kind AS text[]), CAST(:status AS text[]),
            CAST(:conversion_event AS text[]), CAST(:conversion_within_s AS integer[]),
            CAST(:reward AS text[]), CAST(:value AS float8[]), CAST(:run_id AS text[])
          ) AS t(tracking_id, at, customer_id, campaign_id, decision_id, treatment, offer_id,
                 touchpoint, channel, placement, control, control_kind, status,
                 conversion_event, conversion_within_s, reward, value, run_id)
        ),
        dedup AS (SELECT DISTINCT ON (tracking_id) * FROM input ORDER BY tracking_id, at),
        keyed AS (
          INSERT INTO {S}.contact_key (tracking_id, at) SELECT tracking_id, at FROM dedup
          ON CONFLICT (tracking_id) DO NOTHING RETURNING tracking_id
        ),
        ins AS (
          INSERT INTO {S}.contacts (tracking_id, at, customer_id, campaign_id, decision_id,
            treatment, offer_id, touchpoint, channel, placement, control, control_kind, status,
            conversion_event, conversion_within_s, reward, value, run_id)
          SELECT d.tracking_id, d.at, d.customer_id, d.campaign_id, d.decision_id, d.treatment,
            d.offer_id, d.touchpoint, d.channel, d.placement, d.control, d.control_kind,
            d.status, d.conversion_event, d.conversion_within_s, CAST(d.reward AS jsonb),
            d.value, d.run_id
          FROM dedup d JOIN keyed USING (tracking_id)
          RETURNING tracking_id, at, customer_id, campaign_id, treatment, channel, control,
            control_kind, touchpoint, conversion_event, conversion_within_s
        ),
        agg AS (
          INSERT INTO {S}.report_daily AS r ({AGG_KEY}, targeted, control_n, offered)
          SELECT campaign_id, CAST(at AT TIME ZONE 'UTC' AS date), coalesce(treatment, ''),
            coalesce(channel, ''), control, coalesce(control_kind, ''),
            count(*) FILTER (WHERE NOT control), count(*) FILTER (WHERE control),
            count(*) FILTER (WHERE NOT control AND touchpoint IS NOT NULL)
          FROM ins GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
          ON CONFLICT ({AGG_KEY}) DO UPDATE SET targeted = r.targeted + EXCLUDED.targeted,
            control_n = r.control_n + EXCLUDED.control_n, offered = r.offered + EXCLUDED.offered
        ),
        pc AS (
          SELECT customer_id, CAST(date_trunc('month', at AT TIME ZONE 'UTC') AS date) AS month,
            count(*) AS d
          FROM ins WHERE NOT control GROUP BY 1, 2
        ),
        press AS (
          INSERT INTO {S}.contact_pressure AS p (customer_id, month, n)
          SELECT customer_id, month, d FROM pc ORDER BY 1, 2
          ON CONFLICT (customer_id, month) DO UPDATE SET n = p.n + EXCLUDED.n
          RETURNING customer_id, month, n
        ),
        hist AS (
          INSERT INTO {S}.pressure_hist AS h (month, n, customers)
          SELECT month, k, sum(delta) FROM (
            SELECT month, n AS k, 1 AS delta FROM press
            UNION ALL
            SELECT p.month, p.n - pc.d, -1 FROM press p JOIN pc USING (customer_id, month)
            WHERE p.n - pc.d > 0
          ) moves GROUP BY 1, 2 ORDER BY 1, 2
          ON CONFLICT (month, n) DO UPDATE SET customers = h.customers + EXCLUDED.customers
        ),
        win AS (
          INSERT INTO {S}.open_windows (tracking_id, customer_id, event_type, opens_at, closes_at)
          SELECT tracking_id, customer_id, conversion_event, at,
            at + make_interval(secs => conversion_within_s)
          FROM ins WHERE conversion_event IS NOT NULL AND conversion_within_s IS NOT NULL
          ON CONFLICT DO NOTHING
        )
        SELECT tracking_id FROM ins
        """
        params = {
            f: _arr(rows, f)
            for f in (
                "tracking_id",
                "at",
                "customer_id",
                "campaign_id",
                "decision_id",
                "treatment",
                "offer_id",
                "touchpoint",
                "channel",
                "placement",
                "control",
                "control_kind",
                "status",
                "conversion_event",
                "conversion_within_s",
                "value",
                "run_id",
            )
        }
        params["reward"] = [orjson.dumps(r.reward).decode() if r.reward else None for r in rows]
        new = {r[0] for r in (await self.session.execute(sa.text(stmt), params)).all()}
        seen: set[str] = set()
        out = []
        for r in sorted(rows, key=lambda r: r.at):
            if r.tracking_id in new and r.tracking_id not in seen:
                seen.add(r.tracking_id)
                out.append(r)
        return out

    async def note_conversion_types(self, types: dict[str, int]) -> None:
        """Remember the event types some conversion rule names (and their longest window)."""
        await self.session.execute(
            sa.text(
                f"INSERT INTO {S}.conversion_types AS ct (event_type, max_within_s)"
                " SELECT * FROM unnest(CAST(:t AS text[]), CAST(:w AS integer[])) ORDER BY 1"
                " ON CONFLICT (event_type) DO UPDATE SET max_within_s = EXCLUDED.max_within_s"
                " WHERE ct.max_within_s < EXCLUDED.max_within_s"
            ),
            {"t": list(types), "w": list(types.values())},
        )

    async def conversion_types(self) -> dict[str, int]:
        rows = await self.session.execute(
            sa.text(f"SELECT event_type, max_within_s FROM {S}.conversion_types")
        )
        return {r[0]: int(r[1]) for r in rows.all()}

    async def contexts(self, tracking_ids: Sequence[str]) -> dict[str, Context]:
        """The contacts of these tracking ids (those known)."""
        if not tracking_ids:
            return {}
        rows = await self.session.execute(
            sa.text(
                f"SELECT c.tracking_id, c.at, c.customer_id, c.campaign_id, c.treatment,"
                f" c.offer_id, c.channel, c.control, c.control_kind, c.reward"
                f" FROM {S}.contact_key k JOIN {S}.contacts c"
                f" ON c.tracking_id = k.tracking_id AND c.at = k.at"
                f" WHERE k.tracking_id = ANY(CAST(:ids AS text[]))"
            ),
            {"ids": list(set(tracking_ids))},
        )
        return {r[0]: Context(*r) for r in rows.all()}

    async def insert_responses(self, rows: Sequence[ResponseRow]) -> set[tuple[str, str]]:
        """Store the (tracking id, outcome) pairs not seen before; returns those."""
        if not rows:
            return set()
        counts = ", ".join(f"count(*) FILTER (WHERE outcome = '{o}')" for o in RESPONSE_COUNTS)
        sets = ", ".join(f"{o} = r.{o} + EXCLUDED.{o}" for o in RESPONSE_COUNTS)
        stmt = f"""
        WITH input AS (
          SELECT * FROM unnest(
            CAST(:tracking_id AS text[]), CAST(:outcome AS text[]), CAST(:at AS timestamptz[]),
            CAST(:customer_id AS text[]), CAST(:campaign_id AS text[]), CAST(:treatment AS text[]),
            CAST(:offer_id AS text[]), CAST(:channel AS text[]), CAST(:agg_channel AS text[]),
            CAST(:control AS boolean[]), CAST(:control_kind AS text[]),
            CAST(:contact_at AS timestamptz[]), CAST(:value AS float8[]), CAST(:link AS text[]),
            CAST(:text AS text[]), CAST(:choice AS text[]), CAST(:source AS text[]),
            CAST(:event_id AS text[])
          ) AS t(tracking_id, outcome, at, customer_id, campaign_id, treatment, offer_id, channel,
                 agg_channel, control, control_kind, contact_at, value, link, text, choice,
                 source, event_id)
        ),
        dedup AS (
          SELECT DISTINCT ON (tracking_id, outcome) * FROM input ORDER BY tracking_id, outcome, at
        ),
        keyed AS (
          INSERT INTO {S}.response_key (tracking_id, outcome, at)
          SELECT tracking_id, outcome, at FROM dedup ORDER BY tracking_id, outcome
          ON CONFLICT DO NOTHING RETURNING tracking_id, outcome
        ),
        new AS (SELECT d.* FROM dedup d JOIN keyed USING (tracking_id, outcome)),
        ins AS (
          INSERT INTO {S}.responses (tracking_id, outcome, at, customer_id, campaign_id,
            treatment, offer_id, channel, control, value, link, text, choice, source, event_id)
          SELECT tracking_id, outcome, at, customer_id, campaign_id, treatment, offer_id,
            channel, control, value, link, text, choice, source, event_id FROM new
        ),
        agg AS (
          INSERT INTO {S}.report_daily AS r ({AGG_KEY}, {", ".join(RESPONSE_COUNTS)}, revenue)
          SELECT campaign_id, CAST(contact_at AT TIME ZONE 'UTC' AS date), coalesce(treatment, ''),
            coalesce(agg_channel, ''), control, coalesce(control_kind, ''), {counts},
            coalesce(sum(value) FILTER (WHERE outcome = 'converted'), 0)
          FROM new GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
          ON CONFLICT ({AGG_KEY}) DO UPDATE SET {sets}, revenue = r.revenue + EXCLUDED.revenue
        )
        SELECT tracking_id, outcome FROM keyed
        """
        params: dict[str, list[Any]] = {
            "tracking_id": [r.ctx.tracking_id for r in rows],
            "outcome": _arr(rows, "outcome"),
            "at": _arr(rows, "at"),
            "customer_id": [r.ctx.customer_id for r in rows],
            "campaign_id": [r.ctx.campaign_id for r in rows],
            "treatment": [r.ctx.treatment for r in rows],
            "offer_id": [r.ctx.offer_id for r in rows],
            "channel": [r.channel or r.ctx.channel for r in rows],
            "agg_channel": [r.ctx.channel for r in rows],
            "control": [r.ctx.control for r in rows],
            "control_kind": [r.ctx.control_kind for r in rows],
            "contact_at": [r.ctx.at for r in rows],
            "value": _arr(rows, "value"),
            "link": _arr(rows, "link"),
            "text": _arr(rows, "text"),
            "choice": _arr(rows, "choice"),
            "source": _arr(rows, "source"),
            "event_id": _arr(rows, "event_id"),
        }
        result = await self.session.execute(sa.text(stmt), params)
        return {(r[0], r[1]) for r in result.all()}

    async def count_clicks(self, clicks: Sequence[tuple[str, str, str]]) -> None:
        """Count (tracking id, campaign id, link) clicks once per message and link."""
        if not clicks:
            return
        await self.session.execute(
            sa.text(
                f"""
                WITH input AS (
                  SELECT DISTINCT * FROM unnest(CAST(:t AS text[]), CAST(:c AS text[]),
                    CAST(:l AS text[])) AS x(tracking_id, campaign_id, link)
                ),
                new AS (
                  INSERT INTO {S}.click_key (tracking_id, link)
                  SELECT tracking_id, link FROM input ORDER BY 1, 2
                  ON CONFLICT DO NOTHING RETURNING tracking_id, link
                )
                INSERT INTO {S}.link_clicks AS lc (campaign_id, link, clicks)
                SELECT i.campaign_id, i.link, count(*) FROM input i JOIN new USING (tracking_id, link)
                GROUP BY 1, 2 ORDER BY 1, 2
                ON CONFLICT (campaign_id, link) DO UPDATE SET clicks = lc.clicks + EXCLUDED.clicks
                """
            ),
            {"t": [c[0] for c in clicks], "c": [c[1] for c in clicks], "l": [c[2] for c in clicks]},
        )

    async def apply_deliveries(self, items: Sequence[tuple[str, str, datetime]]) -> set[str]:
        """Set delivery times (first report of each status wins) and count the new ones;
        returns the tracking ids that have a contact."""
        if not items:
            return set()
        firsts = ", ".join(f"min(at) FILTER (WHERE status = '{s}') AS {s}" for s in DELIVERY)
        olds = ", ".join(f"c.{s}_at AS old_{s}" for s in DELIVERY)
        sets = ", ".join(f"{s}_at = coalesce(c.{s}_at, o.{s})" for s in DELIVERY)
        news = ", ".join(
            f"count(*) FILTER (WHERE old_{s} IS NULL AND {s} IS NOT NULL)" for s in DELIVERY
        )
        incs = ", ".join(f"{s} = r.{s} + EXCLUDED.{s}" for s in DELIVERY)
        # The status shown is the most telling one reached: a bounce after a delivery wins.
        status = (
            "CASE WHEN coalesce(c.bounced_at, o.bounced) IS NOT NULL THEN 'bounced'"
            " WHEN coalesce(c.delivered_at, o.delivered) IS NOT NULL THEN 'delivered'"
            " WHEN coalesce(c.failed_at, o.failed) IS NOT NULL THEN 'failed'"
            " WHEN coalesce(c.expired_at, o.expired) IS NOT NULL THEN 'expired'"
            " WHEN coalesce(c.sent_at, o.sent) IS NOT NULL THEN 'sent' ELSE c.status END"
        )
        stmt = f"""
        WITH input AS (
          SELECT * FROM unnest(CAST(:t AS text[]), CAST(:s AS text[]), CAST(:a AS timestamptz[]))
            AS x(tracking_id, status, at)
        ),
        p AS (SELECT tracking_id, {firsts} FROM input GROUP BY tracking_id),
        o AS (
          SELECT p.*, c.at AS contact_at, c.campaign_id, c.treatment, c.channel, c.control,
            c.control_kind, {olds}
          FROM p JOIN {S}.contact_key k USING (tracking_id)
          JOIN {S}.contacts c ON c.tracking_id = k.tracking_id AND c.at = k.at
          ORDER BY p.tracking_id FOR UPDATE OF c
        ),
        upd AS (
          UPDATE {S}.contacts c SET {sets}, status = {status}
          FROM o WHERE c.tracking_id = o.tracking_id AND c.at = o.contact_at
        ),
        agg AS (
          INSERT INTO {S}.report_daily AS r ({AGG_KEY}, {", ".join(DELIVERY)})
          SELECT campaign_id, CAST(contact_at AT TIME ZONE 'UTC' AS date), coalesce(treatment, ''),
            coalesce(channel, ''), control, coalesce(control_kind, ''), {news}
          FROM o GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
          ON CONFLICT ({AGG_KEY}) DO UPDATE SET {incs}
        )
        SELECT tracking_id FROM o
        """
        result = await self.session.execute(
            sa.text(stmt),
            {"t": [i[0] for i in items], "s": [i[1] for i in items], "a": [i[2] for i in items]},
        )
        return {r[0] for r in result.all()}

    # -- conversions ------------------------------------------------------------------
    async def store_events(
        self, events: Sequence[tuple[str, str, str, datetime, float | None]]
    ) -> None:
        """Keep events of conversion types: (event id, customer, type, time, revenue)."""
        if not events:
            return
        await self.session.execute(
            sa.text(
                f"INSERT INTO {S}.recent_events (event_id, customer_id, event_type, at, revenue)"
                " SELECT * FROM unnest(CAST(:i AS text[]), CAST(:c AS text[]), CAST(:t AS text[]),"
                " CAST(:a AS timestamptz[]), CAST(:r AS float8[])) ON CONFLICT DO NOTHING"
            ),
            {
                "i": [e[0] for e in events],
                "c": [e[1] for e in events],
                "t": [e[2] for e in events],
                "a": [e[3] for e in events],
                "r": [e[4] for e in events],
            },
        )

    async def first_conversions(
        self, *, customers: Sequence[str] | None = None, tracking_ids: Sequence[str] | None = None
    ) -> list[tuple[str, str, datetime, float | None]]:
        """For open windows (of these customers, or these contacts): the first stored event
        of the window's type inside it, as (tracking id, event id, time, revenue)."""
        where = (
            "w.customer_id = ANY(CAST(:ids AS text[]))"
            if customers is not None
            else "w.tracking_id = ANY(CAST(:ids AS text[]))"
        )
        ids = list(set(customers if customers is not None else tracking_ids or []))
        if not ids:
            return []
        rows = await self.session.execute(
            sa.text(
                f"SELECT DISTINCT ON (w.tracking_id) w.tracking_id, e.event_id, e.at, e.revenue"
                f" FROM {S}.open_windows w JOIN {S}.recent_events e"
                f" ON e.customer_id = w.customer_id AND e.event_type = w.event_type"
                f" AND e.at >= w.opens_at AND e.at <= w.closes_at"
                f" WHERE {where} ORDER BY w.tracking_id, e.at, e.event_id"
            ),
            {"ids": ids},
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows.all()]

    async def close_windows(self, tracking_ids: Sequence[str]) -> None:
        if tracking_ids:
            await self.session.execute(
                sa.text(
                    f"DELETE FROM {S}.open_windows WHERE tracking_id = ANY(CAST(:t AS text[]))"
                ),
                {"t": list(tracking_ids)},
            )

    async def prune(self, *, windows_before: datetime, events_before: datetime) -> None:
        """Forget windows long closed and events older than any window still open."""
        await self.session.execute(
            sa.text(f"DELETE FROM {S}.open_windows WHERE closes_at < :w"), {"w": windows_before}
        )
        await self.session.execute(
            sa.text(f"DELETE FROM {S}.recent_events WHERE at < :e"), {"e": events_before}
        )

    # -- erasure ----------------------------------------------------------------------
    async def any_erased(self) -> bool:
        return bool(await self.session.scalar(sa.text(f"SELECT EXISTS (SELECT 1 FROM {S}.erased)")))

    async def erased(self, pseudonyms: Sequence[str]) -> set[str]:
        """Which of these pseudonyms belong to erased customers."""
        rows = await self.session.execute(
            sa.text(f"SELECT pseudonym FROM {S}.erased WHERE pseudonym = ANY(CAST(:p AS text[]))"),
            {"p": list(pseudonyms)},
        )
        return {r[0] for r in rows.all()}

    async def erase(self, customer_id: str, pseudonym: str) -> None:
        """Replace a customer id by its pseudonym everywhere; drop free texts and events."""
        p = {"c": customer_id, "p": pseudonym}
        await self.session.execute(
            sa.text(f"INSERT INTO {S}.erased (pseudonym) VALUES (:p) ON CONFLICT DO NOTHING"), p
        )
        for table in ("contacts", "open_windows", "contact_pressure"):
            await self.session.execute(
                sa.text(f"UPDATE {S}.{table} SET customer_id = :p WHERE customer_id = :c"), p
            )
        await self.session.execute(
            sa.text(
                f"UPDATE {S}.responses SET customer_id = :p, text = NULL, choice = NULL"
                " WHERE customer_id = :c"
            ),
            p,
        )
        await self.session.execute(
            sa.text(f"DELETE FROM {S}.recent_events WHERE customer_id = :c"), p
        )
