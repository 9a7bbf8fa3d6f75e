"""Segment use cases: define, preview, freeze (snapshots), page; rule checks with places.

Services never commit: callers pass a unit of work.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from services.selection.audience import Audience
from services.selection.index import UnknownField
from services.selection.models import Segment, Snapshot
from services.selection.segments.repository import SegmentRepository, SnapshotRepository
from shared import rules
from shared.contracts.bus import SegmentChanged, SegmentDeleted, SegmentSnapshotReady
from shared.contracts.segments import (
    PreviewRequest,
    PreviewResult,
    SegmentList,
    SegmentPut,
    SnapshotCreated,
    SnapshotPage,
)
from shared.contracts.segments import Segment as SegmentView
from shared.db import UnitOfWork
from shared.errors import Conflict, NotFound, Unavailable, Unprocessable
from shared.paging import decode_cursor, encode_cursor

SOURCE = "kairos/selection"
CHUNK = 10_000
_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


# -- rules, with the place of every error ------------------------------------------------
def _loc(path: str) -> list[str | int]:
    """``rule.all[2].op`` → ``["rule", "all", 2, "op"]`` (body fields, as in validation errors)."""
    out: list[str | int] = []
    for name, idx in _STEP.findall(path):
        out.append(int(idx) if idx else name)
    return out


def _invalid(path: str, msg: str) -> Unprocessable:
    return Unprocessable(f"{path}: {msg}", errors=[{"loc": _loc(path), "msg": msg}])


def _places(doc: Any, key: str, path: str = "rule") -> Iterator[tuple[str, Any]]:
    """Every ``{key: …}`` clause in raw RULE JSON with its path."""
    if isinstance(doc, dict):
        if key in doc:
            yield path, doc[key]
        for k in ("all", "any"):
            if isinstance(doc.get(k), list):
                for i, child in enumerate(doc[k]):
                    yield from _places(child, key, f"{path}.{k}[{i}]")
        if "not" in doc:
            yield from _places(doc["not"], key, f"{path}.not")


def parse_rule(doc: Any) -> rules.Node:
    """A segment rule as a tree, or 422 naming the place (``rule.all[2].op: …``)."""
    try:
        node = rules.parse(doc)
    except rules.RuleError as exc:
        raise _invalid(exc.loc, exc.msg) from exc
    for path, _ in _places(doc, "prop"):
        raise _invalid(
            f"{path}.prop",
            "event properties exist only in campaign triggers, not in segments or audiences",
        )
    return node


async def resolver(uow: UnitOfWork, doc: Any, node: rules.Node) -> dict[str, rules.Node]:
    """Every segment a rule refers to, transitively, parsed; 422 for unknown references."""
    repo = SegmentRepository(uow.session)
    found: dict[str, rules.Node] = {}
    todo = rules.segments_of(node)
    first = True
    while todo:
        rows = await repo.rules_of(sorted(todo))
        if first:
            for path, sid in _places(doc, "segment"):
                if sid not in rows:
                    raise _invalid(f"{path}.segment", f"unknown segment '{sid}'")
            first = False
        nxt: set[str] = set()
        for sid in todo:
            seg = rows.get(sid)
            if seg is None:  # a stored segment refers to one that is gone
                raise Unprocessable(f"segment '{sid}' (referenced indirectly) does not exist")
            found[sid] = rules.parse(seg.rule)
            nxt |= rules.segments_of(found[sid]) - set(found)
        todo = nxt
    return found


def _cycle(graph: dict[str, list[str]], start: str) -> list[str] | None:
    """A path start → … → start in the reference graph, if there is one."""
    stack: list[tuple[str, list[str]]] = [(r, [start, r]) for r in graph.get(start, [])]
    seen: set[str] = set()
    while stack:
        sid, path = stack.pop()
        if sid == start:
            return path
        if sid in seen:
            continue
        seen.add(sid)
        stack.extend((r, [*path, r]) for r in graph.get(sid, []))
    return None


def view(seg: Segment, count: int | None = None) -> SegmentView:
    return SegmentView(
        segment_id=seg.segment_id,
        name=seg.name,
        description=seg.description,
        rule=seg.rule,
        version=seg.version,
        count=count,
        created_at=seg.created_at,
        updated_at=seg.updated_at,
        updated_by=seg.updated_by,
    )


async def count_segment(uow: UnitOfWork, audience: Audience, seg: Segment) -> int | None:
    """Members of a segment now (None while the index loads)."""
    if not audience.ready:
        return None
    node = rules.parse(seg.rule)
    refs = await resolver(uow, seg.rule, node)
    return len(audience.pop.select(node, datetime.now(UTC), refs.__getitem__))


# -- segments -------------------------------------------------------------------------------
async def put_segment(
    uow: UnitOfWork, *, segment_id: str, body: SegmentPut, principal: str | None, now: datetime
) -> Segment:
    """Create or replace a segment; its references must exist and must not loop back."""
    node = parse_rule(body.rule)
    repo = SegmentRepository(uow.session)
    await repo.lock_graph()
    await resolver(uow, body.rule, node)
    refs = sorted(rules.segments_of(node))
    graph = await repo.graph()
    graph[segment_id] = refs
    loop = _cycle(graph, segment_id)
    if loop is not None:
        path = next(p for p, sid in _places(body.rule, "segment") if sid == loop[1])
        raise _invalid(
            f"{path}.segment",
            "segments may not refer to each other in a cycle: " + " → ".join(loop),
        )
    seg = await repo.get(segment_id, for_update=True)
    if seg is None:
        seg = repo.add(
            Segment(
                segment_id=segment_id,
                name=body.name,
                description=body.description,
                rule=body.rule,
                refs=refs,
                version=1,
                created_at=now,
                updated_at=now,
                updated_by=principal,
            )
        )
    else:
        seg.name, seg.description, seg.rule, seg.refs = body.name, body.description, body.rule, refs
        seg.version += 1
        seg.updated_at, seg.updated_by = now, principal
    await uow.session.flush()
    uow.emit(
        *SegmentChanged(segment_id=segment_id, version=seg.version, rule=body.rule).to_event(
            source=SOURCE
        )
    )
    return seg


async def get_segment(uow: UnitOfWork, segment_id: str) -> Segment:
    seg = await SegmentRepository(uow.session).get(segment_id)
    if seg is None:
        raise NotFound(f"Segment '{segment_id}' does not exist.")
    return seg


async def list_segments(uow: UnitOfWork, *, cursor: str | None, limit: int) -> SegmentList:
    after = decode_cursor(cursor)
    rows = await SegmentRepository(uow.session).page(str(after), limit)
    nxt = encode_cursor(rows[-1].segment_id) if len(rows) == limit else None
    return SegmentList(segments=[view(s) for s in rows], next_cursor=nxt)


async def delete_segment(uow: UnitOfWork, segment_id: str) -> None:
    repo = SegmentRepository(uow.session)
    await repo.lock_graph()
    seg = await get_segment(uow, segment_id)
    users = await repo.referenced_by(segment_id)
    if users:
        raise Conflict(
            f"Segment '{segment_id}' is used by {', '.join(sorted(users))}; change those first."
        )
    await repo.delete(seg)
    uow.emit(*SegmentDeleted(segment_id=segment_id).to_event(source=SOURCE))


# -- previews -------------------------------------------------------------------------------
def _require_ready(audience: Audience) -> None:
    if not audience.ready:
        raise Unavailable(
            f"The audience index is loading ({audience.pop.total} customers so far); "
            "try again shortly."
        )


async def preview(uow: UnitOfWork, audience: Audience, body: PreviewRequest) -> PreviewResult:
    """Size, make-up and a sample of an audience, straight from the index."""
    node = parse_rule(body.rule)
    refs = await resolver(uow, body.rule, node)
    _require_ready(audience)
    t0 = time.perf_counter()
    pop = audience.pop
    members = pop.select(node, datetime.now(UTC), refs.__getitem__)
    breakdown: dict[str, dict[str, int]] = {}
    for i, name in enumerate(body.breakdown):
        try:
            breakdown[name] = pop.breakdown(members, name, body.top)
        except UnknownField as exc:
            raise Unprocessable(
                f"breakdown[{i}]: {exc}",
                errors=[{"loc": ["breakdown", i], "msg": str(exc)}],
            ) from exc
    return PreviewResult(
        count=len(members),
        total=pop.total,
        breakdown=breakdown,
        sample=pop.sample(members, body.sample),
        took_ms=round((time.perf_counter() - t0) * 1000, 2),
        as_of=audience.last_change_at or datetime.now(UTC),
    )


# -- snapshots ------------------------------------------------------------------------------
async def create_snapshot(
    uow: UnitOfWork,
    audience: Audience,
    *,
    segment_id: str,
    principal: str | None,
    now: datetime,
    rule: dict[str, Any] | None = None,
) -> SnapshotCreated:
    """Freeze the segment's membership now (or, with ``rule`` and no segment, the members of
    that rule: a campaign's audience); later profile changes do not alter it."""
    if rule is None:
        seg = await get_segment(uow, segment_id)
        rule, version = seg.rule, seg.version
        node = rules.parse(rule)
    else:
        node, version = parse_rule(rule), 0
    refs = await resolver(uow, rule, node)
    _require_ready(audience)
    members = audience.pop.members(audience.pop.select(node, now, refs.__getitem__))
    snapshot_id = "snap-" + secrets.token_hex(8)
    repo = SnapshotRepository(uow.session)
    repo.add(
        Snapshot(
            snapshot_id=snapshot_id,
            segment_id=segment_id,
            segment_version=version,
            rule=rule,
            count=len(members),
            chunk_size=CHUNK,
            created_at=now,
            created_by=principal,
        )
    )
    await uow.session.flush()
    await repo.write_members(snapshot_id, members, CHUNK)
    uow.emit(
        *SegmentSnapshotReady(
            snapshot_id=snapshot_id,
            segment_id=segment_id,
            segment_version=version,
            count=len(members),
        ).to_event(source=SOURCE)
    )
    return SnapshotCreated(
        snapshot_id=snapshot_id, segment_id=segment_id, count=len(members), created_at=now
    )


async def snapshot_page(
    uow: UnitOfWork, *, segment_id: str | None, snapshot_id: str, cursor: str | None, limit: int
) -> SnapshotPage:
    """One page of a snapshot's members; every member appears on exactly one page."""
    snap = await SnapshotRepository(uow.session).get(snapshot_id)
    if segment_id is None and snap is not None:
        segment_id = snap.segment_id
    if snap is None or snap.segment_id != segment_id:
        raise NotFound(f"Snapshot '{snapshot_id}' of segment '{segment_id or ''}' does not exist.")
    offset = 0
    if cursor:
        raw = decode_cursor(cursor)
        if not raw.isdigit():
            raise Unprocessable(
                "cursor: not a cursor this API returned",
                errors=[{"loc": ["query", "cursor"], "msg": "not a cursor this API returned"}],
            )
        offset = int(raw)
    end = min(offset + limit, snap.count)
    members: list[str] = []
    if offset < end:
        first, last = offset // snap.chunk_size, (end - 1) // snap.chunk_size
        rows = await SnapshotRepository(uow.session).members(snapshot_id, first, last)
        base = first * snap.chunk_size
        members = rows[offset - base : end - base]
    return SnapshotPage(
        snapshot_id=snapshot_id,
        segment_id=segment_id,
        count=snap.count,
        members=members,
        next_cursor=encode_cursor(end) if end < snap.count else None,
    )


# -- one customer ---------------------------------------------------------------------------
async def segments_of_customer(
    uow: UnitOfWork, audience: Audience, doc: dict[str, Any] | None
) -> list[str]:
    """The segments a customer belongs to now, decided by the hot-path evaluator."""
    if doc is None:
        return []
    rows = await SegmentRepository(uow.session).page("", 10_000)
    trees = {s.segment_id: rules.parse(s.rule) for s in rows}
    compiled: dict[str, rules.Predicate] = {}

    def resolve(sid: str) -> rules.Predicate:
        if sid not in compiled:
            tree = trees.get(sid)
            compiled[sid] = (
                rules.compile_rule(tree, resolve_segment=resolve)
                if tree is not None
                else (lambda s: False)
            )
        return compiled[sid]

    now = datetime.now(UTC)
    subject = rules.Subject(
        doc, now=now, contacted=audience.contacted_check(doc["customer_id"], now)
    )
    return sorted(sid for sid in trees if resolve(sid)(subject))
