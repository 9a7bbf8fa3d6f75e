"""All SQL of the profile service."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col

from services.profile.models import Counter, Customer, Device, Identity, Merge
from services.profile.projection import Doc, doc_from_row
from shared.db import Repository
from shared.privacy import ANON_PREFIX


def _j(v: Any) -> str:
    return orjson.dumps(v).decode()


class CustomerRepository(Repository[Customer]):
    model = Customer

    async def resolve(self, ids: Iterable[str]) -> dict[str, str]:
        """Map known ids to their surviving profile id (merged-away ids follow ``merged_into``)."""
        ids = list(set(ids))
        if not ids:
            return {}
        rows = await self.session.execute(
            sa.text(
                "SELECT customer_id, COALESCE(merged_into, customer_id) FROM profile.customer"
                " WHERE customer_id = ANY(:ids)"
            ),
            {"ids": ids},
        )
        return {r[0]: r[1] for r in rows.all()}

    async def lock_anonymous(self, anonymous_ids: Iterable[str]) -> None:
        """Hold transaction advisory locks on anonymous ids (in key order, so two batches
        cannot deadlock on them): batches that resolve the same anonymous id run one at a time."""
        ids = sorted(set(anonymous_ids))
        if ids:
            await self.session.execute(
                sa.text(
                    "SELECT count(pg_advisory_xact_lock(k)) FROM (SELECT DISTINCT"
                    " hashtextextended('kairos.anonymous_id:' || a, 0) AS k"
                    " FROM unnest(CAST(:ids AS text[])) AS a ORDER BY k) AS s"
                ),
                {"ids": ids},
            )

    async def lock_profiles(self, ids: Iterable[str]) -> None:
        """Lock profile rows in id order before a batch writes any of them."""
        ids = sorted(set(ids))
        if ids:
            await self.session.execute(
                sa.text(
                    "SELECT count(*) FROM (SELECT 1 FROM profile.customer"
                    " WHERE customer_id = ANY(:ids) ORDER BY customer_id FOR UPDATE) AS s"
                ),
                {"ids": ids},
            )

    async def owners_of_events(
        self, customer_ids: Iterable[str], anonymous_ids: Iterable[str]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """In one query: the surviving profile of each known customer id, and the surviving
        owner of each known anonymous id."""
        cids, anons = sorted(set(customer_ids)), sorted(set(anonymous_ids))
        if not cids and not anons:
            return {}, {}
        rows = await self.session.execute(
            sa.text(
                "SELECT 'c', customer_id, COALESCE(merged_into, customer_id) FROM profile.customer"
                " WHERE customer_id = ANY(:cids)"
                " UNION ALL SELECT 'a', i.value, COALESCE(c.merged_into, i.customer_id)"
                " FROM profile.identity i LEFT JOIN profile.customer c"
                " ON c.customer_id = i.customer_id"
                " WHERE i.kind = 'anonymous_id' AND i.value = ANY(:anons)"
            ),
            {"cids": cids, "anons": anons},
        )
        resolved: dict[str, str] = {}
        anon: dict[str, str] = {}
        for kind, key, owner in rows.all():
            (resolved if kind == "c" else anon)[key] = owner
        return resolved, anon

    async def ensure(self, ids: Iterable[str], now: datetime) -> set[str]:
        """Create empty profiles for ids seen for the first time; returns those created."""
        ids = sorted(set(ids))
        if not ids:
            return set()
        rows = await self.session.execute(
            sa.text(
                "INSERT INTO profile.customer (customer_id, attributes, tags, consents,"
                " created_at, updated_at, version)"
                " SELECT unnest(CAST(:ids AS text[])), '{}', '{}', '{}', :now, :now, 0"
                " ON CONFLICT DO NOTHING RETURNING customer_id"
            ),
            {"ids": ids, "now": now},
        )
        return set(rows.scalars().all())

    async def bump(self, ids: Iterable[str], now: datetime) -> dict[str, int]:
        """Grow the version of each profile (one change each); returns the new versions."""
        rows = await self.session.execute(
            sa.text(
                "UPDATE profile.customer SET version = version + 1, updated_at = :now"
                " WHERE customer_id = ANY(:ids) RETURNING customer_id, version"
            ),
            {"ids": sorted(set(ids)), "now": now},
        )
        return {r[0]: r[1] for r in rows.all()}

    async def bump_announced(
        self, types: Mapping[str, Sequence[str]], now: datetime
    ) -> tuple[int, dict[str, int]]:
        """``bump`` the customers of ``types`` (customer -> the event types their counters got),
        and write the event batch's announcement row (``profile.import_batch``, kind
        ``events``: each customer's new version and event types) in the same statement;
        returns the row's id and the new versions."""
        ids = sorted(types)
        rows = (
            await self.session.execute(
                sa.text(
                    "WITH t AS (SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:types AS text[]))"
                    " AS t(id, types)),"
                    " b AS (UPDATE profile.customer c SET version = c.version + 1,"
                    " updated_at = :now FROM t WHERE c.customer_id = t.id"
                    " RETURNING c.customer_id, c.version, t.types),"
                    " a AS (INSERT INTO profile.import_batch"
                    " (created_at, size, customers, event_types, kind)"
                    " SELECT :now, count(*), COALESCE(jsonb_object_agg(customer_id, version),"
                    " '{}'), COALESCE(jsonb_object_agg(customer_id, types::jsonb), '{}'),"
                    " 'events' FROM b RETURNING batch_id)"
                    " SELECT a.batch_id, b.customer_id, b.version FROM a LEFT JOIN b ON true"
                ),
                {
                    "ids": ids,
                    "types": [orjson.dumps(sorted(set(types[c]))).decode() for c in ids],
                    "now": now,
                },
            )
        ).all()
        return int(rows[0][0]), {r[1]: r[2] for r in rows if r[1] is not None}

    async def prune_event_batches(self, before: datetime) -> None:
        """Forget event batches' announcement rows older than ``before``."""
        await self.session.execute(
            sa.text(
                "DELETE FROM profile.import_batch WHERE kind = 'events' AND created_at < :before"
            ),
            {"before": before},
        )

    async def prune_processed(self, before: datetime, limit: int) -> int:
        """Forget up to ``limit`` processed event ids claimed before ``before`` (events that
        old are out of every stream, so none is redelivered); returns how many went. The
        rows to go are picked once (``ARRAY(…)``, an init plan), then deleted by tuple id."""
        got = await self.session.execute(
            sa.text(
                "DELETE FROM profile.processed_event WHERE ctid = ANY(ARRAY("
                "SELECT ctid FROM profile.processed_event WHERE at < :before LIMIT :n))"
            ),
            {"before": before, "n": limit},
        )
        return int(got.rowcount or 0)  # type: ignore[attr-defined]

    async def upsert_many(self, rows: Sequence[dict[str, Any]]) -> None:
        """Create or replace whole profiles (PUT, import) in one statement; each replaced
        profile's version grows by one. Merged-away ids are left alone."""
        if not rows:
            return
        await self.session.execute(
            sa.text(
                "INSERT INTO profile.customer AS c (customer_id, attributes, tags, consents,"
                " timezone, locale, created_at, updated_at, version)"
                " SELECT u.id, u.a::jsonb, ARRAY(SELECT jsonb_array_elements_text(u.t::jsonb)),"
                " u.c::jsonb, u.tz, u.lc, u.ts, u.ts, 1 FROM unnest(CAST(:ids AS text[]),"
                " CAST(:a AS text[]), CAST(:t AS text[]), CAST(:c AS text[]), CAST(:tz AS text[]),"
                " CAST(:lc AS text[]), CAST(:ts AS timestamptz[])) AS u(id, a, t, c, tz, lc, ts)"
                " ON CONFLICT (customer_id) DO UPDATE SET attributes = EXCLUDED.attributes,"
                " tags = EXCLUDED.tags, consents = EXCLUDED.consents, timezone = EXCLUDED.timezone,"
                " locale = EXCLUDED.locale, updated_at = EXCLUDED.updated_at, version = c.version + 1"
                " WHERE c.merged_into IS NULL"
            ),
            {
                "ids": [r["customer_id"] for r in rows],
                "a": [_j(r["attributes"]) for r in rows],
                "t": [_j(r["tags"]) for r in rows],
                "c": [_j(r["consents"]) for r in rows],
                "tz": [r["timezone"] for r in rows],
                "lc": [r["locale"] for r in rows],
                "ts": [r["updated_at"] for r in rows],
            },
        )

    async def versions(self, ids: Sequence[str]) -> dict[str, int]:
        rows = await self.session.execute(
            sa.text(
                "SELECT customer_id, version FROM profile.customer WHERE customer_id = ANY(:ids)"
            ),
            {"ids": list(ids)},
        )
        return {r[0]: r[1] for r in rows.all()}

    # -- identities ----------------------------------------------------------
    async def identities_of(self, ids: Sequence[str]) -> dict[str, dict[str, str]]:
        rows = await self.session.execute(
            sa.select(col(Identity.kind), col(Identity.value), col(Identity.customer_id)).where(
                col(Identity.customer_id).in_(list(ids))
            )
        )
        out: dict[str, dict[str, str]] = {}
        for kind, value, cid in rows.all():
            out.setdefault(cid, {})[kind] = value
        return out

    async def owners(self, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """Who owns each (kind, value) identity now."""
        if not pairs:
            return {}
        rows = await self.session.execute(
            sa.text(
                "SELECT kind, value, customer_id FROM profile.identity"
                " WHERE (kind, value) IN (SELECT * FROM unnest(CAST(:k AS text[]), CAST(:v AS text[])))"
            ),
            {"k": [p[0] for p in pairs], "v": [p[1] for p in pairs]},
        )
        return {(r[0], r[1]): r[2] for r in rows.all()}

    async def identity_conflicts(
        self, lines: list[int], ids: list[str], kinds: list[str], values: list[str]
    ) -> list[tuple[int, str, str, int | None]]:
        """Claims (line, customer, kind, value) that another customer holds: (line, kind,
        owner, None) when a stored identity belongs to another customer, (line, kind, owner,
        first line) when an earlier claim of the same request names another customer."""
        if not lines:
            return []
        rows = await self.session.execute(
            sa.text(CONFLICTS_SQL), {"l": lines, "c": ids, "k": kinds, "v": values}
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows.all()]

    async def set_identities(
        self, customer_id: str, identities: dict[str, str], *, replace: bool
    ) -> None:
        if replace:
            await self.session.execute(
                sa.text(
                    "DELETE FROM profile.identity WHERE customer_id = :c AND kind <> 'anonymous_id'"
                ),
                {"c": customer_id},
            )
        else:
            await self.session.execute(
                sa.text("DELETE FROM profile.identity WHERE customer_id = :c AND kind = ANY(:k)"),
                {"c": customer_id, "k": list(identities)},
            )
        await self.add_identities([(k, v, customer_id) for k, v in identities.items()])

    async def add_identities(self, triples: Sequence[tuple[str, str, str]]) -> None:
        """Link (kind, value) identities to customers; an identity already owned stays put."""
        if triples:
            await self.session.execute(
                sa.text(
                    "INSERT INTO profile.identity (kind, value, customer_id)"
                    " SELECT * FROM unnest(CAST(:k AS text[]), CAST(:v AS text[]),"
                    " CAST(:c AS text[])) ON CONFLICT DO NOTHING"
                ),
                {
                    "k": [t[0] for t in triples],
                    "v": [t[1] for t in triples],
                    "c": [t[2] for t in triples],
                },
            )

    async def find_by_identity(self, kind: str, value: str) -> str | None:
        row = await self.session.execute(
            sa.select(col(Identity.customer_id)).where(
                col(Identity.kind) == kind, col(Identity.value) == value
            )
        )
        return row.scalar_one_or_none()

    # -- devices -------------------------------------------------------------
    async def devices_of(self, ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        rows = await self.session.execute(
            sa.select(Device).where(Device.customer_id.in_(list(ids)))  # type: ignore[attr-defined]
        )
        out: dict[str, list[dict[str, Any]]] = {}
        for d in rows.scalars().all():
            out.setdefault(d.customer_id, []).append(
                {
                    "platform": d.platform,
                    "token": d.token,
                    "app_id": d.app_id,
                    "registered_at": d.registered_at,
                }
            )
        return out

    async def add_device(self, customer_id: str, dev: dict[str, Any], now: datetime) -> str | None:
        """Register (or move) a token; returns the customer that held it before, if another."""
        before = (
            await self.session.execute(
                sa.text("SELECT customer_id FROM profile.device WHERE token = :t FOR UPDATE"),
                {"t": dev["token"]},
            )
        ).scalar_one_or_none()
        stmt = insert(Device).values(customer_id=customer_id, registered_at=now, **dev)
        stmt = stmt.on_conflict_do_update(
            index_elements=[Device.token],
            set_={
                "customer_id": customer_id,
                "platform": dev["platform"],
                "app_id": dev["app_id"],
                "registered_at": now,
            },
        )
        await self.session.execute(stmt)
        return before if before not in (None, customer_id) else None

    async def drop_token(self, token: str, reported_at: datetime) -> str | None:
        """Remove a token a provider called invalid, unless registered again after that."""
        row = await self.session.execute(
            sa.text(
                "DELETE FROM profile.device WHERE token = :t AND registered_at <= :at"
                " RETURNING customer_id"
            ),
            {"t": token, "at": reported_at},
        )
        return row.scalar_one_or_none()

    # -- counters ------------------------------------------------------------
    async def counters_of(
        self, ids: Sequence[str], *, for_update: bool = False
    ) -> dict[str, dict[str, Counter]]:
        stmt = sa.select(Counter).where(Counter.customer_id.in_(list(ids)))  # type: ignore[attr-defined]
        if for_update:
            stmt = stmt.order_by(Counter.customer_id, Counter.event_type).with_for_update()
        out: dict[str, dict[str, Counter]] = {}
        for c in (await self.session.execute(stmt)).scalars().all():
            out.setdefault(c.customer_id, {})[c.event_type] = c
        return out

    async def counters_for_update(
        self, ids: Sequence[str]
    ) -> dict[tuple[str, str], dict[str, Any]]:
        """Counter rows of customers, locked, as plain dicts (the hot path builds no ORM objects)."""
        rows = await self.session.execute(
            sa.text(
                "SELECT customer_id, event_type, total, first_seen, last_seen, buckets::text,"
                " last::text FROM profile.counter WHERE customer_id = ANY(:ids)"
                " ORDER BY customer_id, event_type FOR UPDATE"
            ),
            {"ids": list(ids)},
        )
        return {
            (r[0], r[1]): {
                "customer_id": r[0],
                "event_type": r[1],
                "total": r[2],
                "first_seen": r[3],
                "last_seen": r[4],
                "buckets": orjson.loads(r[5]),
                "last": orjson.loads(r[6]),
            }
            for r in rows.all()
        }

    async def save_counters(self, rows: Sequence[dict[str, Any]]) -> None:
        """Upsert counter rows in one statement."""
        if not rows:
            return
        await self.session.execute(
            sa.text(
                "INSERT INTO profile.counter AS c (customer_id, event_type, total, first_seen,"
                " last_seen, buckets, last)"
                " SELECT u.c, u.t, u.n, u.f, u.l, u.b::jsonb, u.v::jsonb FROM unnest("
                " CAST(:c AS text[]), CAST(:t AS text[]), CAST(:n AS bigint[]),"
                " CAST(:f AS timestamptz[]), CAST(:l AS timestamptz[]), CAST(:b AS text[]),"
                " CAST(:v AS text[])) AS u(c, t, n, f, l, b, v)"
                " ON CONFLICT (customer_id, event_type) DO UPDATE SET total = EXCLUDED.total,"
                " first_seen = EXCLUDED.first_seen, last_seen = EXCLUDED.last_seen,"
                " buckets = EXCLUDED.buckets, last = EXCLUDED.last"
            ),
            {
                "c": [r["customer_id"] for r in rows],
                "t": [r["event_type"] for r in rows],
                "n": [r["total"] for r in rows],
                "f": [r["first_seen"] for r in rows],
                "l": [r["last_seen"] for r in rows],
                "b": [_j(r["buckets"]) for r in rows],
                "v": [_j(r["last"]) for r in rows],
            },
        )

    async def claim_events(self, ids: Sequence[str], now: datetime) -> set[str]:
        """Record event ids; returns those not seen before."""
        if not ids:
            return set()
        rows = await self.session.execute(
            sa.text(
                "INSERT INTO profile.processed_event (event_id, at)"
                " SELECT unnest(CAST(:ids AS text[])), :now ON CONFLICT DO NOTHING RETURNING event_id"
            ),
            {"ids": list(ids), "now": now},
        )
        return set(rows.scalars().all())

    async def projection_docs(
        self, ids: Sequence[str], *, counters_only: bool = False
    ) -> list[Doc]:
        """Projection documents built by Postgres (the whole profile, or only its counters)."""
        if not ids:
            return []
        sql = COUNTERS_SQL if counters_only else PROJECTION_SQL
        rows = await self.session.execute(sa.text(sql), {"ids": list(ids)})
        return [doc_from_row(r) for r in rows.all()]

    async def projection_docs_mixed(self, ids: Sequence[str], whole: set[str]) -> list[Doc]:
        """One query for a batch: whole documents for ``whole``, counters only for the rest."""
        if not ids:
            return []
        rows = await self.session.execute(
            sa.text(MIXED_SQL), {"ids": list(ids), "whole": sorted(whole & set(ids))}
        )
        return [doc_from_row(r) for r in rows.all()]

    async def export_page(self, after: str, limit: int) -> list[bytes]:
        """Projection documents (both parts and the version, one JSON object each) of the
        customers after ``after`` in id order: how other services rebuild their read models."""
        rows = await self.session.execute(sa.text(EXPORT_SQL), {"after": after, "limit": limit})
        out = []
        for r in rows.all():
            d = doc_from_row(r)
            assert d.profile is not None
            out.append(
                b"".join((d.profile[:-1], b",", d.counters[1:-1], b',"version":%d}' % d.version))
            )
        return out

    # -- merges & erasure ------------------------------------------------------
    async def record_merge(self, m: Merge) -> Merge:
        self.session.add(m)
        await self.session.flush()
        return m

    async def merges_of(self, customer_id: str) -> Sequence[Merge]:
        rows = await self.session.execute(
            sa.select(Merge)
            .where(col(Merge.target) == customer_id)
            .order_by(col(Merge.merge_id).desc())
        )
        return rows.scalars().all()

    async def move_rows(self, source: str, target: str) -> dict[str, int]:
        """Move identities and devices of ``source`` to ``target``; mark source merged."""
        moved = {}
        for table in ("identity", "device"):
            r = await self.session.execute(
                sa.text(f"UPDATE profile.{table} SET customer_id = :t WHERE customer_id = :s"),
                {"t": target, "s": source},
            )
            moved[table] = r.rowcount  # type: ignore[attr-defined]
        await self.session.execute(
            sa.text("UPDATE profile.customer SET merged_into = :t WHERE merged_into = :s"),
            {"t": target, "s": source},
        )
        return moved

    async def erase(self, customer_id: str) -> list[str]:
        """Delete a profile and everything personal about it, merged-away ids included."""
        ids = [customer_id] + list(
            (
                await self.session.execute(
                    sa.text("SELECT customer_id FROM profile.customer WHERE merged_into = :c"),
                    {"c": customer_id},
                )
            ).scalars()
        )
        # An anonymous id's raw events sit under ``anon:<id>`` (``event_subject``) even when no
        # anonymous profile was ever made (its events and the identifying one came in one
        # batch, so nothing was folded): name every anonymous id the customer holds too.
        anonymous = (
            await self.session.execute(
                sa.text(
                    "SELECT value FROM profile.identity"
                    " WHERE customer_id = ANY(:ids) AND kind = 'anonymous_id'"
                ),
                {"ids": ids},
            )
        ).scalars()
        ids = list(dict.fromkeys([*ids, *(ANON_PREFIX + a for a in anonymous)]))
        for table in ("identity", "device", "counter", "merge"):
            col = "target" if table == "merge" else "customer_id"
            await self.session.execute(
                sa.text(f"DELETE FROM profile.{table} WHERE {col} = ANY(:ids)"), {"ids": ids}
            )
        await self.session.execute(
            sa.text("DELETE FROM profile.merge WHERE source = ANY(:ids)"), {"ids": ids}
        )
        await self.session.execute(
            sa.text("DELETE FROM profile.customer WHERE customer_id = ANY(:ids)"), {"ids": ids}
        )
        # The import announcements that named them (the stream messages name no one).
        await self.session.execute(
            sa.text(
                "UPDATE profile.import_batch SET customers = customers - CAST(:ids AS text[]),"
                " event_types = event_types - CAST(:ids AS text[])"
                " WHERE customers ?| CAST(:ids AS text[])"
            ),
            {"ids": ids},
        )
        return ids


# One rule for identities: a stored owner wins; among claims of one request, the first line.
# ``{claims}`` yields (line, customer id, kind, value): the request's claims as arrays (PUT,
# PATCH) or an import batch's staged rows. Each claim looks its identity up by the primary
# key (LATERAL with LIMIT: never a hash join over every stored identity).
_CONFLICTS = """
WITH claims(line, cid, kind, value) AS ({claims}),
c AS (SELECT line, cid, kind COLLATE "C" AS kind, value COLLATE "C" AS value FROM claims),
first AS (SELECT DISTINCT ON (kind, value) kind, value, cid, line FROM c
          ORDER BY kind, value, line)
SELECT c.line, c.kind, COALESCE(i.customer_id, f.cid),
       CASE WHEN i.customer_id IS NULL THEN f.line END
FROM c JOIN first f ON f.kind = c.kind AND f.value = c.value
LEFT JOIN LATERAL (SELECT customer_id FROM profile.identity
                   WHERE kind = c.kind AND value = c.value LIMIT 1) i ON true
WHERE COALESCE(i.customer_id, f.cid) <> c.cid
ORDER BY c.line, c.kind
"""


def conflicts_sql(claims: str) -> str:
    """The identity rule over a claims relation (line, customer id, kind, value)."""
    return _CONFLICTS.format(claims=claims)


CONFLICTS_SQL = conflicts_sql(
    "SELECT * FROM unnest(CAST(:l AS int[]), CAST(:c AS text[]), CAST(:k AS text[]),"
    " CAST(:v AS text[]))"
)


def to_json(v: Any) -> str:
    return _j(v)


# The compact read model decisions use. Postgres reads each part of a document and hands
# it over as text; ``projection.profile_part`` and ``counters_part`` put the document
# together (the one place its shape is written). Building the whole document in Postgres
# (``json_build_object``) cost an import's upsert two thirds of its Postgres time.
_IDENTITIES = """COALESCE((SELECT jsonb_object_agg(i.kind, i.value)
                          FROM profile.identity i WHERE i.customer_id = c.customer_id), '{}')"""
_DEVICES = """COALESCE((SELECT json_agg(json_build_object(
                             'platform', d.platform, 'token', d.token, 'app_id', d.app_id))
                         FROM profile.device d WHERE d.customer_id = c.customer_id), '[]')"""
_COUNTERS = """COALESCE((SELECT jsonb_object_agg(k.event_type, k.buckets || jsonb_build_object(
                              'total', k.total, 'first', k.first_seen, 'last', k.last_seen))
                          FROM profile.counter k WHERE k.customer_id = c.customer_id), '{}')"""
_LASTS = """COALESCE((SELECT jsonb_object_agg(k.event_type, k.last) FROM profile.counter k
                      WHERE k.customer_id = c.customer_id AND k.last <> '{}'), '{}')"""
# In the order ``projection.doc_from_row`` reads them, after the id, version and creation ms.
_PROFILE_PART = (
    "c.attributes::text",
    "c.tags",
    "c.consents::text",
    f"{_IDENTITIES}::text",
    f"{_DEVICES}::text",
    "c.timezone",
    "c.locale",
    "c.created_at",
)
_COUNTERS_PART = (f"{_COUNTERS}::text", f"{_LASTS}::text")


def _when(condition: str | None, expr: str) -> str:
    """``expr``, or NULL unless ``condition`` holds."""
    if condition is None:
        return expr
    if condition == "false":
        return "NULL"
    return f"CASE WHEN {condition} THEN {expr} END"


def projection_columns(profile: str | None = None, counters: str | None = None) -> str:
    """A projection document's parts over a customer row ``c``, as ``doc_from_row`` takes
    them: the id, version, creation time (ms), the profile part's values, the update time
    and the behaviour part's values. ``profile`` and ``counters`` are conditions under which
    each part is read (None: always); a part not read comes back as NULLs.

    An import's upsert reads neither for a row it has just inserted (``c.xmax = 0`` in its
    ``RETURNING``): it knows that customer's profile from its own lines, and such a customer has no
    devices and no counters (events and device registrations create the customer row first,
    so their rows can only follow it)."""
    cols = [
        "c.customer_id",
        "c.version",
        "(extract(epoch FROM c.created_at) * 1000)::bigint",
        *(_when(profile, e) for e in _PROFILE_PART),
        "c.updated_at",
        *(_when(counters, e) for e in _COUNTERS_PART),
    ]
    return ",\n  ".join(cols)


def _projection_sql(
    profile: str | None = None, counters: str | None = None, *, also: str = ""
) -> str:
    return f"""
SELECT {projection_columns(profile, counters)}
FROM profile.customer c{also}
WHERE c.customer_id = ANY(:ids) AND c.merged_into IS NULL
"""


PROJECTION_SQL = _projection_sql()
EXPORT_SQL = PROJECTION_SQL.replace(
    "WHERE c.customer_id = ANY(:ids) AND c.merged_into IS NULL",
    "WHERE c.customer_id > :after AND c.merged_into IS NULL ORDER BY c.customer_id LIMIT :limit",
)
COUNTERS_SQL = _projection_sql(profile="false")
# Whole documents for some ids, the counters part alone for the others (an event batch).
# (Whether a row is whole is worked out once, not in each of the part's columns.)
MIXED_SQL = _projection_sql(
    profile="w.whole",
    also="\nCROSS JOIN LATERAL (SELECT c.customer_id = ANY(:whole) AS whole OFFSET 0) w",
)
