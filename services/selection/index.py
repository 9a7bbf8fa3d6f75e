"""The audience index: the whole population in memory, built for boolean algebra.

Why this shape (measured figures in the README's design section): a preview must not
scan JSON rows. Every customer gets a dense integer slot; each tag, consent and
categorical attribute value is a roaring bitmap of slots (``pyroaring``), so ``all`` /
``any`` / ``not`` are bitmap AND / OR / ANDNOT at a few microseconds per container.
Numbers live in dense ``float64`` columns compared with numpy in one vectorised pass.
Behaviour counters keep their time buckets (the same buckets as the profile
projection) in append-only columnar entries per event type, so a window such as
``30d`` is summed per customer at query time with one ``bincount``; a customer's
entries are replaced by bumping its generation, and dead entries are compacted away.

One meaning with the evaluator in ``shared.rules``: categorical values are matched by
calling ``shared.rules.compare`` once per *distinct* value, so strings, ISO dates and
booleans behave exactly as in the hot path; only numbers are vectorised, and the
property test in ``tests/selection`` proves both engines select the same customers.
Slots are never reused (an erased customer's slot stays empty), so contact history or
counter entries of an erased customer can never leak into someone else.
"""

from __future__ import annotations

import array
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from pyroaring import BitMap

from shared import rules
from shared.counters import DAY_S, SLOT_S
from shared.rules import compare

_NUMERIC_OPS = ("eq", "ne", "lt", "lte", "gt", "gte")
_GROW = 1.5
# Inside ``all``, a column scan looks only at the candidates left when they are fewer than
# 1/RESTRICT_FACTOR of the population (tests set it to 0 and to a huge value: both paths).
RESTRICT_FACTOR = 8
OTHER = "(other)"
NONE = "(none)"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def to_bitmap(slots: np.ndarray) -> BitMap:
    """Slots (any integer numpy array) as a bitmap; via array.array, the fast path."""
    return BitMap(array.array("I", slots.astype(np.uint32, copy=False).tobytes()))


def to_slots(bm: BitMap) -> np.ndarray:
    return np.frombuffer(bm.to_array(), dtype=np.uint32)


def _grown(a: np.ndarray, n: int, fill: Any) -> np.ndarray:
    if len(a) >= n:
        return a
    out = np.full(max(n, int(len(a) * _GROW) + 1024), fill, dtype=a.dtype)
    out[: len(a)] = a
    return out


# -- one attribute (or one "last" event property) ------------------------------------
@dataclass
class Column:
    """Values of one attribute across the population.

    Numbers sit in ``num`` (NaN: none); strings and booleans are categorical codes with one
    bitmap per distinct value; lists and objects (rare) are kept as they are in ``other``.
    """

    num: np.ndarray = field(default_factory=lambda: np.full(0, np.nan))
    code: np.ndarray = field(default_factory=lambda: np.full(0, -1, dtype=np.int32))
    values: list[Any] = field(default_factory=list)
    codes: dict[tuple[bool, Any], int] = field(default_factory=dict)
    bitmaps: list[BitMap] = field(default_factory=list)
    numbers: BitMap = field(default_factory=BitMap)
    other: dict[int, Any] = field(default_factory=dict)
    present: BitMap = field(default_factory=BitMap)

    def ensure(self, n: int) -> None:
        self.num = _grown(self.num, n, np.nan)
        self.code = _grown(self.code, n, -1)

    def clear(self, slot: int) -> None:
        if slot not in self.present:
            return
        self.present.discard(slot)
        if slot < len(self.num) and not math.isnan(self.num[slot]):
            self.num[slot] = np.nan
            self.numbers.discard(slot)
        if slot < len(self.code) and self.code[slot] >= 0:
            self.bitmaps[self.code[slot]].discard(slot)
            self.code[slot] = -1
        self.other.pop(slot, None)

    def set(self, slot: int, value: Any) -> None:
        """Set (after ``clear`` for a customer already indexed); None means absent."""
        if value is None:
            return
        self.present.add(slot)
        if _is_number(value):
            self.num[slot] = float(value)
            self.numbers.add(slot)
        elif isinstance(value, (str, bool)):
            key = (isinstance(value, bool), value)
            c = self.codes.get(key)
            if c is None:
                c = self.codes[key] = len(self.values)
                self.values.append(value)
                self.bitmaps.append(BitMap())
            self.code[slot] = c
            self.bitmaps[c].add(slot)
        else:
            self.other[slot] = value

    def set_many(self, slots: list[int], values: list[Any]) -> None:
        """``set`` for many slots that hold no value yet (customers new to the index), in
        one pass: bitmaps and arrays are updated once per column and value, not per slot."""
        present: list[int] = []
        num_slots: list[int] = []
        num_values: list[float] = []
        by_code: dict[int, list[int]] = {}
        codes = self.codes
        for slot, value in zip(slots, values, strict=True):
            kind = type(value)  # exact types first: the common cases, checked cheaply
            if value is None:
                continue
            present.append(slot)
            if kind is int or kind is float or (kind is not bool and _is_number(value)):
                num_slots.append(slot)
                num_values.append(float(value))
            elif kind is str or isinstance(value, (str, bool)):
                key = (kind is bool, value)
                c = codes.get(key)
                if c is None:
                    c = codes[key] = len(self.values)
                    self.values.append(value)
                    self.bitmaps.append(BitMap())
                got = by_code.get(c)
                if got is None:
                    by_code[c] = [slot]
                else:
                    got.append(slot)
            else:
                self.other[slot] = value
        self.present.update(present)
        if num_slots:
            self.num[num_slots] = num_values
            self.numbers.update(num_slots)
        for c, members in by_code.items():
            self.code[members] = c
            self.bitmaps[c].update(members)

    def match(self, op: str, value: Any, within: BitMap | None = None) -> BitMap:
        """Slots whose value satisfies ``op value`` exactly as ``shared.rules.compare``
        (numbers are only scanned inside ``within`` when it is small)."""
        if op == "exists":
            return self.present.copy()
        out = BitMap()
        nums = self._numeric(op, value, within)
        if nums is not None:
            out |= nums
        if not self._numeric_only(op, value):
            for c, v in enumerate(self.values):
                bm = self.bitmaps[c]
                if bm and compare(v, op, value):
                    out |= bm
            for slot, v in self.other.items():
                if compare(v, op, value):
                    out.add(slot)
        return out

    @staticmethod
    def _numeric_only(op: str, value: Any) -> bool:
        """True when no string, boolean or list can satisfy the comparison."""
        if op in _NUMERIC_OPS:
            return _is_number(value)
        if op == "between":
            return any(_is_number(v) for v in value)
        if op == "in":
            return all(_is_number(v) for v in value)
        return False

    def _numeric(self, op: str, value: Any, within: BitMap | None = None) -> BitMap | None:
        if not self.numbers:
            return None
        slots: np.ndarray | None = None
        if within is not None and len(within) * RESTRICT_FACTOR < len(self.num):
            slots = to_slots(within & self.numbers)
            x = self.num[slots]
        else:
            x = self.num
        with np.errstate(invalid="ignore"):
            if op in _NUMERIC_OPS:
                if not _is_number(value):
                    return None
                v = float(value)
                mask = _compare_array(x, op, v)
                if op == "ne":
                    mask &= ~np.isnan(x)
            elif op == "between":
                lo, hi = value
                if not (_is_number(lo) and _is_number(hi)):
                    return None
                mask = (x >= float(lo)) & (x <= float(hi))
            elif op in ("in", "not_in"):
                vs = [float(v) for v in value if _is_number(v)]
                hit = np.isin(x, vs) if vs else np.zeros(len(x), dtype=bool)
                if op == "in":
                    mask = hit
                else:
                    mask = ~hit & ~np.isnan(x)
            else:  # contains / starts_with never hold for a number
                return None
        hits = np.flatnonzero(mask)
        return to_bitmap(hits if slots is None else slots[hits])

    def breakdown(self, members: BitMap) -> dict[Any, int]:
        """Members per distinct value (values as they are; numbers as numbers)."""
        counts: dict[Any, int] = {}
        for c, v in enumerate(self.values):
            n = members.intersection_cardinality(self.bitmaps[c])
            if n:
                counts[v] = n
        numeric = members & self.numbers
        if numeric:
            vals, ns = np.unique(self.num[to_slots(numeric)], return_counts=True)
            for v, n in zip(vals.tolist(), ns.tolist(), strict=True):
                key = int(v) if float(v).is_integer() else v
                counts[key] = counts.get(key, 0) + int(n)
        for slot, v in self.other.items():
            if slot in members:
                key = repr(v)
                counts[key] = counts.get(key, 0) + 1
        return counts


# -- behaviour counters of one event type --------------------------------------------
_KIND_TOTAL, _KIND_SLOT, _KIND_DAY = 0, 1, 2


@dataclass
class EventColumn:
    """Counter buckets of one event type, as append-only entries with generations."""

    gen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    nent: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    slot: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    kind: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int8))
    key: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    cnt: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    egen: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    staged: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    dead: int = 0

    def ensure(self, n: int) -> None:
        self.gen = _grown(self.gen, n, 0)
        self.nent = _grown(self.nent, n, 0)

    def replace(self, slot: int, buckets: Mapping[str, Any] | None) -> None:
        """The customer's buckets for this event type become ``buckets`` (None: none)."""
        g = int(self.gen[slot]) + 1
        self.gen[slot] = g
        self.dead += int(self.nent[slot])
        n = 0
        if buckets:
            self.staged.append((slot, _KIND_TOTAL, 0, int(buckets.get("total", 0)), g))
            n = 1
            for k, v in (buckets.get("m") or {}).items():
                self.staged.append((slot, _KIND_SLOT, int(k), int(v), g))
                n += 1
            for k, v in (buckets.get("d") or {}).items():
                self.staged.append((slot, _KIND_DAY, int(k), int(v), g))
                n += 1
        self.nent[slot] = n

    def flush(self) -> None:
        if self.staged:
            a = np.array(self.staged, dtype=np.int64)
            self.staged = []
            self.slot = np.concatenate([self.slot, a[:, 0].astype(np.int32)])
            self.kind = np.concatenate([self.kind, a[:, 1].astype(np.int8)])
            self.key = np.concatenate([self.key, a[:, 2]])
            self.cnt = np.concatenate([self.cnt, a[:, 3]])
            self.egen = np.concatenate([self.egen, a[:, 4].astype(np.int32)])
        if self.dead > 100_000 and self.dead > len(self.slot) // 2:
            live = self.egen == self.gen[self.slot]
            for name in ("slot", "kind", "key", "cnt", "egen"):
                setattr(self, name, getattr(self, name)[live])
            self.dead = 0

    def counts(self, within: str, now: datetime, n: int) -> np.ndarray:
        """Count per slot in the window, the way ``shared.counters.windows`` sums it."""
        self.flush()
        live = self.egen == self.gen[self.slot]
        now_s = int(now.timestamp())
        if within == "total":
            sel = live & (self.kind == _KIND_TOTAL)
        elif within in ("1h", "1d"):
            span = 3600 if within == "1h" else DAY_S
            sel = live & (self.kind == _KIND_SLOT) & (self.key >= (now_s - span) // SLOT_S + 1)
        else:
            days = int(within[:-1])
            sel = live & (self.kind == _KIND_DAY) & (self.key > now_s // DAY_S - days)
        return np.bincount(self.slot[sel], weights=self.cnt[sel], minlength=n)


@dataclass
class ContactColumn:
    """When customers were contacted by one campaign (control contacts excluded)."""

    slot: list[int] = field(default_factory=list)
    at: list[float] = field(default_factory=list)

    def since(self, cutoff: float) -> BitMap:
        if not self.slot:
            return BitMap()
        at = np.asarray(self.at)
        return to_bitmap(np.asarray(self.slot, dtype=np.int64)[at >= cutoff])

    def compact(self) -> None:
        """Keep the latest contact per customer (contacts only grow otherwise)."""
        latest: dict[int, float] = {}
        for s, t in zip(self.slot, self.at, strict=True):
            if t > latest.get(s, -math.inf):
                latest[s] = t
        self.slot, self.at = list(latest), list(latest.values())


# -- the population -----------------------------------------------------------------
class UnknownField(ValueError):
    """A breakdown on a field no customer has."""


SegmentResolver = Callable[[str], rules.Node]


@dataclass
class Change:
    """A customer's changes seen in one consumer batch: the newest version, the parts they
    touched, and the oldest version among them."""

    version: int
    parts: set[str]
    since: int

    def add(self, version: int, parts: set[str]) -> None:
        self.version = max(self.version, version)
        self.since = min(self.since, version)
        self.parts |= parts


@dataclass
class Population:
    """Every customer's audience-relevant data, indexed by slot."""

    ids: list[str | None] = field(default_factory=list)
    pos: dict[str, int] = field(default_factory=dict)
    alive: BitMap = field(default_factory=BitMap)
    version: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    tags: dict[str, BitMap] = field(default_factory=dict)
    consents: dict[str, BitMap] = field(default_factory=dict)
    attrs: dict[str, Column] = field(default_factory=dict)
    lasts: dict[tuple[str, str], Column] = field(default_factory=dict)
    events: dict[str, EventColumn] = field(default_factory=dict)
    contacts: dict[str, ContactColumn] = field(default_factory=dict)
    seq: int = 0  # the PROFILE/CONTACT stream position this index reflects
    built_at: float = 0.0

    # -- size -----------------------------------------------------------------------
    @property
    def total(self) -> int:
        return len(self.alive)

    @property
    def capacity(self) -> int:
        return len(self.ids)

    def _slot(self, customer_id: str) -> tuple[int, bool]:
        slot = self.pos.get(customer_id)
        if slot is not None:
            return slot, False
        slot = len(self.ids)
        self.ids.append(customer_id)
        self.pos[customer_id] = slot
        self.version = _grown(self.version, slot + 1, 0)
        return slot, True

    # -- writes -------------------------------------------------------------------------
    def upsert_many(
        self,
        docs: Iterable[Mapping[str, Any]],
        parts: Mapping[str, Change] | None = None,
    ) -> int:
        """Apply projection documents (newer versions only); returns how many applied.

        ``parts`` may name, per customer, the changes since a version: the parts they
        touched (``tags``, ``attributes``, ``consents``, ``counters``, ``event:<type>``).
        When the document is the newest of them and the index holds the version before the
        oldest, only those parts are applied (the others did not move); otherwise the whole
        document is.
        """
        todo: list[tuple[int, Mapping[str, Any], set[str] | None, bool]] = []
        for doc in docs:
            cid = doc["customer_id"]
            v = int(doc.get("version", 0))
            slot, new = self._slot(cid)
            if not new and slot in self.alive and v <= self.version[slot]:
                continue
            hinted = (parts or {}).get(cid)
            hint: set[str] | None = None
            if (
                hinted
                and not new
                and slot in self.alive
                and v == hinted.version
                and hinted.since == self.version[slot] + 1
            ):
                hint = hinted.parts
            self.version[slot] = v
            todo.append((slot, doc, hint, new or slot not in self.alive))
        if not todo:
            return 0
        n = len(self.ids)
        # Customers new to the index (an import, a rebuild) go in together: one update per
        # tag, consent and column rather than one per customer and value.
        self._add_fresh({slot: doc for slot, doc, _, fresh in todo if fresh}, n)
        # Tags: customers already indexed leave every tag bitmap at once, then rejoin.
        retag = BitMap(s for s, _, h, fresh in todo if not fresh and (h is None or "tags" in h))
        if retag:
            for bm in self.tags.values():
                bm.difference_update(retag)
        for slot, doc, hint, fresh in todo:
            if fresh:
                continue
            self.alive.add(slot)
            if hint is None or "tags" in hint:
                for t in doc.get("tags") or ():
                    tag_bm = self.tags.get(t)
                    if tag_bm is None:
                        tag_bm = self.tags[t] = BitMap()
                    tag_bm.add(slot)
            if hint is None or "consents" in hint:
                for bm in self.consents.values():
                    bm.discard(slot)
                for ch, ok in (doc.get("consents") or {}).items():
                    if ok is True:
                        self.consents.setdefault(ch, BitMap()).add(slot)
            if hint is None or "attributes" in hint:
                self._set_columns(self.attrs, slot, doc.get("attributes") or {}, n)
            if hint is None or "counters" in hint:
                self._set_columns(self.lasts, slot, _flat_last(doc), n)
                self._set_counters(slot, doc.get("counters") or {}, hint, False, n)
        return len(todo)

    def _add_fresh(self, docs: Mapping[int, Mapping[str, Any]], n: int) -> None:
        """Whole documents of slots that hold nothing (new, or emptied by ``remove``)."""
        if not docs:
            return
        self.alive.update(docs)
        tags: dict[str, list[int]] = {}
        consents: dict[str, list[int]] = {}
        attrs: dict[Any, tuple[list[int], list[Any]]] = {}
        lasts: dict[Any, tuple[list[int], list[Any]]] = {}
        for slot, doc in docs.items():
            for t in doc.get("tags") or ():
                members = tags.get(t)
                if members is None:
                    tags[t] = [slot]
                else:
                    members.append(slot)
            for ch, ok in (doc.get("consents") or {}).items():
                if ok is True:
                    consents.setdefault(ch, []).append(slot)
            for target, values in ((attrs, doc.get("attributes")), (lasts, _flat_last(doc))):
                for name, v in (values or {}).items():
                    pair = target.get(name)
                    if pair is None:
                        target[name] = ([slot], [v])
                    else:
                        pair[0].append(slot)
                        pair[1].append(v)
            ctrs = doc.get("counters")
            if ctrs:
                self._set_counters(slot, ctrs, None, True, n)
        for t, members in tags.items():
            bm = self.tags.get(t)
            if bm is None:
                bm = self.tags[t] = BitMap()
            bm.update(members)
        for ch, members in consents.items():
            self.consents.setdefault(ch, BitMap()).update(members)
        for cols, columns in ((self.attrs, attrs), (self.lasts, lasts)):
            for name, (members, values) in columns.items():
                col = cols.get(name)
                if col is None:
                    col = cols[name] = Column()
                col.ensure(n)
                col.set_many(members, values)

    def _set_columns(
        self, cols: dict[Any, Column], slot: int, values: Mapping[Any, Any], n: int
    ) -> None:
        """A customer's values become ``values`` (columns it no longer has are cleared)."""
        for name, col in cols.items():
            if name not in values:
                col.clear(slot)
        for name, value in values.items():
            target = cols.get(name)
            if target is None:
                target = cols[name] = Column()
            col = target
            col.ensure(n)
            col.clear(slot)
            col.set(slot, value)

    def _set_counters(
        self,
        slot: int,
        ctrs: Mapping[str, Any],
        hint: set[str] | None,
        fresh: bool,
        n: int,
    ) -> None:
        if fresh:
            names: set[str] = set(ctrs)
        else:
            hinted = {h[6:] for h in hint or () if h.startswith("event:")}
            names = hinted or set(self.events) | set(ctrs)
        for name in names:
            buckets = ctrs.get(name)
            col = self.events.get(name)
            if buckets is None:
                if col is not None and slot < len(col.nent) and col.nent[slot]:
                    col.replace(slot, None)
                continue
            if col is None:
                col = self.events[name] = EventColumn()
            col.ensure(n)
            col.replace(slot, buckets)

    def holds(self, customer_id: str, version: int) -> bool:
        """Whether the index holds exactly this version of a customer."""
        slot = self.pos.get(customer_id)
        return slot is not None and slot in self.alive and self.version[slot] == version

    def remove(self, customer_id: str) -> bool:
        """Forget a customer entirely (erasure, or merged into another profile)."""
        slot = self.pos.pop(customer_id, None)
        if slot is None:
            return False
        self.ids[slot] = None
        self.alive.discard(slot)
        for bm in self.tags.values():
            bm.discard(slot)
        for bm in self.consents.values():
            bm.discard(slot)
        for col in (*self.attrs.values(), *self.lasts.values()):
            col.clear(slot)
        for ev in self.events.values():
            if slot < len(ev.nent) and ev.nent[slot]:
                ev.replace(slot, None)
        return True

    def contacted(self, customer_id: str, campaign: str, at: float) -> None:
        slot, _ = self._slot(customer_id)  # a contact may arrive before the profile
        col = self.contacts.setdefault(campaign, ContactColumn())
        col.slot.append(slot)
        col.at.append(at)
        if len(col.slot) > 200_000 and len(col.slot) > 2 * len(self.alive):
            col.compact()

    def prepare(self) -> None:
        """Fold staged counter entries into their arrays (before a save or a query)."""
        for ev in self.events.values():
            ev.flush()

    # -- reads --------------------------------------------------------------------------
    def select(
        self,
        node: rules.Node,
        now: datetime,
        resolve: SegmentResolver | None = None,
    ) -> BitMap:
        """The slots of the customers matching a rule (``prop`` is refused upstream)."""
        memo: dict[str, BitMap] = {}
        return self._select(node, now, resolve, memo)

    def _cost(self, node: rules.Node) -> int:
        """Evaluation order inside ``all``: bitmap lookups first, scans of columns last."""
        if isinstance(node, (rules.Tag, rules.Consent, rules.SegmentRef)):
            return 0
        if isinstance(node, rules.Attr):
            col = self.attrs.get(node.name)
            return 1 if col is None or not col.numbers else 3
        if isinstance(node, (rules.All, rules.AnyOf, rules.Not)):
            return 2
        return 4

    def _select(
        self,
        node: rules.Node,
        now: datetime,
        resolve: SegmentResolver | None,
        memo: dict[str, BitMap],
        within: BitMap | None = None,
    ) -> BitMap:
        """Members matching ``node``; when ``within`` is given, only those inside it (column
        scans then look at the candidates left instead of the whole population)."""
        scope = self.alive if within is None else within
        if isinstance(node, rules.All):
            acc: BitMap | None = within
            for child in sorted(node.children, key=self._cost):
                acc = self._select(child, now, resolve, memo, acc)
                if not acc:
                    break
            return acc if acc is not None else self.alive.copy()
        if isinstance(node, rules.AnyOf):
            out = BitMap()
            for child in node.children:
                rest = scope - out if out else within
                out |= self._select(child, now, resolve, memo, rest)
            return out
        if isinstance(node, rules.Not):
            return scope - self._select(node.child, now, resolve, memo, within)
        if isinstance(node, rules.Tag):
            bm = self.tags.get(node.name)
            return (bm & scope) if bm is not None else BitMap()
        if isinstance(node, rules.Consent):
            bm = self.consents.get(node.channel)
            return (bm & scope) if bm is not None else BitMap()
        if isinstance(node, rules.Attr):
            col = self.attrs.get(node.name)
            return col.match(node.op, node.value, within) & scope if col else BitMap()
        if isinstance(node, rules.EventLast):
            col = self.lasts.get((node.event, node.prop))
            return col.match(node.op, node.value, within) & scope if col else BitMap()
        if isinstance(node, rules.EventCount):
            ev = self.events.get(node.event)
            if ev is None:
                return scope.copy() if compare(0, node.op, node.count) else BitMap()
            counts = ev.counts(node.within, now, self.capacity)
            if within is not None and len(within) * RESTRICT_FACTOR < self.capacity:
                slots = to_slots(within)
                return to_bitmap(slots[_compare_array(counts[slots], node.op, node.count)])
            mask = _compare_array(counts, node.op, node.count)
            return to_bitmap(np.flatnonzero(mask)) & scope
        if isinstance(node, rules.Contacted):
            history = self.contacts.get(node.campaign)
            if history is None:
                return BitMap()
            cutoff = now.timestamp() - rules.parse_duration(node.within)
            return history.since(cutoff) & scope
        if isinstance(node, rules.SegmentRef):
            if node.segment_id not in memo:
                if resolve is None:
                    raise LookupError(node.segment_id)
                memo[node.segment_id] = self._select(resolve(node.segment_id), now, resolve, memo)
            return memo[node.segment_id] & scope
        raise ValueError(f"{type(node).__name__} cannot select a population")

    def members(self, bm: BitMap, *, start: int = 0, limit: int | None = None) -> list[str]:
        """Customer ids of slots, in slot order."""
        ids = self.ids
        slots = to_slots(bm)
        if start or limit is not None:
            slots = slots[start : None if limit is None else start + limit]
        return [ids[s] or "" for s in slots.tolist()]

    def sample(self, bm: BitMap, k: int) -> list[str]:
        """Up to ``k`` members spread evenly over the set (stable for the same set)."""
        n = len(bm)
        if n == 0 or k <= 0:
            return []
        picks = sorted({(i * n) // min(k, n) for i in range(min(k, n))})
        return [self.ids[bm[i]] for i in picks]  # type: ignore[misc]

    def breakdown(self, members: BitMap, name: str, top: int) -> dict[str, int]:
        """Members per value of an attribute (``attributes.region``), per tag of a namespace
        (``tags:value``) or per consent (``consents.push``): the ``top`` largest values, the
        rest summed under ``(other)``, members without a value under ``(none)``."""
        counts: dict[Any, int]
        covered: BitMap
        if name.startswith("attributes."):
            col = self.attrs.get(name[len("attributes.") :])
            if col is None or not col.present:
                raise UnknownField(f"no customer has the attribute '{name[11:]}'")
            counts = col.breakdown(members)
            covered = col.present
        elif name.startswith("tags:"):
            prefix = name[len("tags:") :] + ":"
            counts, covered = {}, BitMap()
            for tag, bm in self.tags.items():
                if tag.startswith(prefix):
                    n = members.intersection_cardinality(bm)
                    covered |= bm
                    if n:
                        counts[tag[len(prefix) :]] = n
            if not covered:
                raise UnknownField(f"no customer has a tag in the namespace '{prefix[:-1]}'")
        elif name.startswith("consents."):
            ch = name[len("consents.") :]
            if ch not in rules.CHANNELS:
                raise UnknownField(f"unknown channel '{ch}'")
            yes = members.intersection_cardinality(self.consents.get(ch, BitMap()))
            return {"true": yes, "false": len(members) - yes}
        else:
            raise UnknownField(
                "name an attribute ('attributes.region'), a tag namespace ('tags:value') "
                "or a consent ('consents.push')"
            )
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
        out = {str(k): n for k, n in ranked[:top]}
        rest = sum(n for _, n in ranked[top:])
        if rest:
            out[OTHER] = rest
        missing = members.difference_cardinality(covered)
        if missing:
            out[NONE] = missing
        return out


def _flat_last(doc: Mapping[str, Any]) -> dict[tuple[str, str], Any]:
    """A document's last event values, one entry per (event type, property)."""
    last = doc.get("last") or {}
    return {(e, p): v for e, props in last.items() for p, v in (props or {}).items()}


def _compare_array(x: np.ndarray, op: str, v: float) -> np.ndarray:
    if op == "eq":
        return x == v
    if op == "ne":
        return x != v
    if op == "lt":
        return x < v
    if op == "lte":
        return x <= v
    if op == "gt":
        return x > v
    return x >= v
