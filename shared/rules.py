"""The RULE language (API.md): parsed once into a typed tree, compiled to a fast evaluator.

One meaning for every engine: a rule is evaluated against a profile projection (the
document the profile service writes to Redis) and, for triggers, the firing event. A
missing attribute never matches a comparison (so ``ne`` on a missing attribute is false)
but matches ``not``. Numbers compare with numbers (booleans are not numbers), ISO dates
and times with dates and times, strings with strings; anything else does not match.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from shared import counters

OPS = (
    "eq",
    "ne",
    "lt",
    "lte",
    "gt",
    "gte",
    "between",
    "in",
    "not_in",
    "exists",
    "contains",
    "starts_with",
)
WINDOWS = ("1h", "1d", "7d", "30d", "90d", "total")
CHANNELS = ("push", "email", "sms", "inapp")
COUNT_OPS = ("eq", "ne", "lt", "lte", "gt", "gte")
MAX_DEPTH = 32
MAX_NODES = 1000


class RuleError(ValueError):
    """A rule that cannot be parsed; ``loc`` names the exact place (``rule.all[2].op``)."""

    def __init__(self, loc: str, msg: str) -> None:
        super().__init__(f"{loc}: {msg}")
        self.loc = loc
        self.msg = msg


# -- the tree ------------------------------------------------------------------
@dataclass(frozen=True)
class All:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class AnyOf:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    child: Node


@dataclass(frozen=True)
class Attr:
    name: str
    op: str
    value: Any


@dataclass(frozen=True)
class Tag:
    name: str


@dataclass(frozen=True)
class Consent:
    channel: str


@dataclass(frozen=True)
class SegmentRef:
    segment_id: str


@dataclass(frozen=True)
class EventCount:
    event: str
    op: str
    count: int
    within: str


@dataclass(frozen=True)
class EventLast:
    event: str
    prop: str
    op: str
    value: Any


@dataclass(frozen=True)
class Contacted:
    campaign: str
    within: str


@dataclass(frozen=True)
class Prop:
    name: str
    op: str
    value: Any


Node = (
    All
    | AnyOf
    | Not
    | Attr
    | Tag
    | Consent
    | SegmentRef
    | EventCount
    | EventLast
    | Contacted
    | Prop
)


# -- parsing -------------------------------------------------------------------
def parse(doc: Any, loc: str = "rule") -> Node:
    """Parse RULE JSON into a tree; raises RuleError naming the place of the first error."""
    counter = [0]
    return _parse(doc, loc, 0, counter)


def _keys(doc: dict[str, Any], loc: str, allowed: set[str], required: set[str]) -> None:
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise RuleError(f"{loc}.{unknown[0]}", f"unknown field '{unknown[0]}'")
    missing = sorted(required - set(doc))
    if missing:
        raise RuleError(f"{loc}.{missing[0]}", "is required")


def _str(v: Any, loc: str, what: str = "a non-empty string") -> str:
    if not isinstance(v, str) or not v or len(v) > 200:
        raise RuleError(loc, f"must be {what}")
    return v


def _scalar(v: Any, loc: str) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        raise RuleError(loc, "must be a finite number")
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    raise RuleError(loc, "must be a string, number or boolean")


def _op_value(doc: dict[str, Any], loc: str) -> tuple[str, Any]:
    op = doc.get("op")
    if op not in OPS:
        raise RuleError(f"{loc}.op", f"unknown op {op!r}; use one of {', '.join(OPS)}")
    if op == "exists":
        if "value" in doc and doc["value"] not in (True, None):
            raise RuleError(f"{loc}.value", "'exists' takes no value")
        return op, None
    if "value" not in doc:
        raise RuleError(f"{loc}.value", "is required")
    value = doc["value"]
    if op == "between":
        if not isinstance(value, list) or len(value) != 2:
            raise RuleError(f"{loc}.value", "'between' takes [low, high]")
        return op, tuple(_scalar(x, f"{loc}.value[{i}]") for i, x in enumerate(value))
    if op in ("in", "not_in"):
        if not isinstance(value, list) or not value or len(value) > 10_000:
            raise RuleError(f"{loc}.value", f"'{op}' takes a non-empty list")
        return op, tuple(_scalar(x, f"{loc}.value[{i}]") for i, x in enumerate(value))
    if op == "starts_with" and not isinstance(value, str):
        raise RuleError(f"{loc}.value", "'starts_with' takes a string")
    return op, _scalar(value, f"{loc}.value")


def _parse(doc: Any, loc: str, depth: int, counter: list[int]) -> Node:
    counter[0] += 1
    if counter[0] > MAX_NODES:
        raise RuleError(loc, f"a rule has at most {MAX_NODES} nodes")
    if depth > MAX_DEPTH:
        raise RuleError(loc, f"a rule nests at most {MAX_DEPTH} levels")
    if not isinstance(doc, dict) or not doc:
        raise RuleError(loc, 'must be an object such as {"tag": "value:gold"}')
    if "all" in doc or "any" in doc:
        key = "all" if "all" in doc else "any"
        _keys(doc, loc, {key}, {key})
        items = doc[key]
        # An empty "all" holds for everyone (a campaign without an audience is frozen as
        # {"all": []}); an empty "any" would hold for nobody, which is never meant.
        if not isinstance(items, list) or (key == "any" and not items):
            what = "a non-empty list of rules" if key == "any" else "a list of rules"
            raise RuleError(f"{loc}.{key}", f"must be {what}")
        children = tuple(
            _parse(x, f"{loc}.{key}[{i}]", depth + 1, counter) for i, x in enumerate(items)
        )
        return All(children) if key == "all" else AnyOf(children)
    if "not" in doc:
        _keys(doc, loc, {"not"}, {"not"})
        return Not(_parse(doc["not"], f"{loc}.not", depth + 1, counter))
    if "attr" in doc:
        _keys(doc, loc, {"attr", "op", "value"}, {"attr", "op"})
        op, value = _op_value(doc, loc)
        return Attr(_str(doc["attr"], f"{loc}.attr"), op, value)
    if "prop" in doc:
        _keys(doc, loc, {"prop", "op", "value"}, {"prop", "op"})
        op, value = _op_value(doc, loc)
        return Prop(_str(doc["prop"], f"{loc}.prop"), op, value)
    if "tag" in doc:
        _keys(doc, loc, {"tag"}, {"tag"})
        return Tag(_str(doc["tag"], f"{loc}.tag"))
    if "consent" in doc:
        _keys(doc, loc, {"consent"}, {"consent"})
        ch = doc["consent"]
        if ch not in CHANNELS:
            raise RuleError(
                f"{loc}.consent", f"unknown channel {ch!r}; use one of {', '.join(CHANNELS)}"
            )
        return Consent(ch)
    if "segment" in doc:
        _keys(doc, loc, {"segment"}, {"segment"})
        return SegmentRef(_str(doc["segment"], f"{loc}.segment"))
    if "event" in doc:
        event = _str(doc["event"], f"{loc}.event")
        if "last" in doc:
            _keys(doc, loc, {"event", "last", "op", "value"}, {"event", "last", "op"})
            op, value = _op_value(doc, loc)
            return EventLast(event, _str(doc["last"], f"{loc}.last"), op, value)
        _keys(doc, loc, {"event", "count", "within"}, {"event", "count"})
        count = doc["count"]
        if not isinstance(count, dict) or len(count) != 1:
            raise RuleError(f"{loc}.count", 'must be one comparison such as {"gte": 3}')
        ((cop, n),) = count.items()
        if cop not in COUNT_OPS:
            raise RuleError(
                f"{loc}.count.{cop}", f"unknown comparison; use one of {', '.join(COUNT_OPS)}"
            )
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise RuleError(f"{loc}.count.{cop}", "must be a whole number ≥ 0")
        within = doc.get("within", "total")
        if within not in WINDOWS:
            raise RuleError(
                f"{loc}.within", f"unknown window {within!r}; use one of {', '.join(WINDOWS)}"
            )
        return EventCount(event, cop, n, within)
    if "contacted" in doc:
        _keys(doc, loc, {"contacted"}, {"contacted"})
        c = doc["contacted"]
        if not isinstance(c, dict):
            raise RuleError(f"{loc}.contacted", 'must be {"campaign": …, "within": …}')
        _keys(c, f"{loc}.contacted", {"campaign", "within"}, {"campaign"})
        within = c.get("within", "90d")
        try:
            parse_duration(within)
        except ValueError as exc:
            raise RuleError(f"{loc}.contacted.within", str(exc)) from exc
        return Contacted(_str(c["campaign"], f"{loc}.contacted.campaign"), within)
    first = sorted(doc)[0]
    raise RuleError(
        f"{loc}.{first}",
        f"unknown rule '{first}'; use all, any, not, attr, tag, "
        "consent, segment, event, contacted or prop",
    )


def segments_of(node: Node) -> set[str]:
    """Segment ids a rule refers to (for cycle checks)."""
    if isinstance(node, (All, AnyOf)):
        return set().union(*(segments_of(c) for c in node.children))
    if isinstance(node, Not):
        return segments_of(node.child)
    if isinstance(node, SegmentRef):
        return {node.segment_id}
    return set()


def uses_event_props(node: Node) -> bool:
    """True if the rule reads the firing event's properties (allowed in triggers only)."""
    if isinstance(node, (All, AnyOf)):
        return any(uses_event_props(c) for c in node.children)
    if isinstance(node, Not):
        return uses_event_props(node.child)
    return isinstance(node, Prop)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DURATION_PATTERN = r"^[0-9]+[smhd]$"  # what parse_duration reads, for schemas


def parse_duration(text: Any) -> int:
    """Seconds of a duration such as ``90s``, ``15m``, ``48h``, ``30d``."""
    if (
        not isinstance(text, str)
        or len(text) < 2
        or text[-1] not in _UNITS
        or not (text[:-1].isascii() and text[:-1].isdigit())
    ):
        raise ValueError(f"not a duration: {text!r} (use 90s, 15m, 48h, 30d)")
    return int(text[:-1]) * _UNITS[text[-1]]


# -- comparing values as a person expects --------------------------------------
def _as_time(v: Any) -> datetime | None:
    if not isinstance(v, str) or len(v) < 10 or v[4] != "-":
        return None
    try:
        t = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        try:
            t = datetime.combine(date.fromisoformat(v[:10]), datetime.min.time())
        except ValueError:
            return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def comparable(a: Any, b: Any) -> tuple[Any, Any] | None:
    """The two values in a common kind, or None if they cannot be compared."""
    if _number(a) and _number(b):
        return a, b
    if isinstance(a, bool) or isinstance(b, bool):
        return (a, b) if isinstance(a, bool) and isinstance(b, bool) else None
    if isinstance(a, str) and isinstance(b, str):
        ta, tb = _as_time(a), _as_time(b)
        if ta is not None and tb is not None:
            return ta, tb
        return a, b
    return None


_MISSING = object()


def compare(actual: Any, op: str, value: Any) -> bool:
    """Apply one op; a missing actual value (``_MISSING``) never matches."""
    if actual is _MISSING or actual is None:
        return False
    if op == "exists":
        return True
    if op in ("eq", "ne"):
        pair = comparable(actual, value)
        if pair is None:
            return False
        return (pair[0] == pair[1]) == (op == "eq")
    if op in ("lt", "lte", "gt", "gte"):
        pair = comparable(actual, value)
        if pair is None:
            return False
        a, b = pair
        return {"lt": a < b, "lte": a <= b, "gt": a > b, "gte": a >= b}[op]
    if op == "between":
        lo, hi = value
        p1, p2 = comparable(actual, lo), comparable(actual, hi)
        return p1 is not None and p2 is not None and p1[1] <= p1[0] and p2[0] <= p2[1]
    if op in ("in", "not_in"):
        hit = any(compare(actual, "eq", v) for v in value)
        return hit == (op == "in")
    if op == "contains":
        if isinstance(actual, list):
            return any(compare(x, "eq", value) for x in actual)
        return isinstance(actual, str) and isinstance(value, str) and value in actual
    if op == "starts_with":
        return isinstance(actual, str) and actual.startswith(value)
    return False


# -- the evaluator -----------------------------------------------------------------
@dataclass
class Subject:
    """What a rule is evaluated against: a profile projection (+ the firing event)."""

    profile: Mapping[str, Any]
    event: Mapping[str, Any] | None = None
    now: datetime | None = None
    segments: frozenset[str] = frozenset()
    contacted: Callable[[str, str], bool] | None = None
    _tags: frozenset[str] | None = None
    _windows: dict[str, dict[str, int]] | None = None

    @property
    def tags(self) -> frozenset[str]:
        if self._tags is None:
            self._tags = frozenset(self.profile.get("tags") or ())
        return self._tags

    def count(self, event: str, within: str) -> int:
        c = (self.profile.get("counters") or {}).get(event)
        if not c:
            return 0
        if within == "total":
            return int(c.get("total", 0))
        if self._windows is None:
            self._windows = {}
        w = self._windows.get(event)
        if w is None:
            w = counters.windows(c, self.now or datetime.now(UTC))
            self._windows[event] = w
        return w[within]


Predicate = Callable[[Subject], bool]


def compile_rule(
    node: Node, *, resolve_segment: Callable[[str], Predicate] | None = None
) -> Predicate:
    """Compile a tree into nested closures (done once per campaign or segment)."""
    if isinstance(node, All):
        parts = [compile_rule(c, resolve_segment=resolve_segment) for c in node.children]
        return lambda s: all(p(s) for p in parts)
    if isinstance(node, AnyOf):
        parts = [compile_rule(c, resolve_segment=resolve_segment) for c in node.children]
        return lambda s: any(p(s) for p in parts)
    if isinstance(node, Not):
        inner = compile_rule(node.child, resolve_segment=resolve_segment)
        return lambda s: not inner(s)
    if isinstance(node, Tag):
        name = node.name
        return lambda s: name in s.tags
    if isinstance(node, Consent):
        ch = node.channel
        return lambda s: (s.profile.get("consents") or {}).get(ch) is True
    if isinstance(node, Attr):
        name, op, value = node.name, node.op, node.value
        return lambda s: compare((s.profile.get("attributes") or {}).get(name, _MISSING), op, value)
    if isinstance(node, Prop):
        name, op, value = node.name, node.op, node.value

        def prop(s: Subject) -> bool:
            props = ((s.event or {}).get("properties")) or {}
            return compare(props.get(name, _MISSING), op, value)

        return prop
    if isinstance(node, EventCount):
        ev, cop, n, within = node.event, node.op, node.count, node.within
        return lambda s: compare(s.count(ev, within), cop, n)
    if isinstance(node, EventLast):
        ev, pname, op, value = node.event, node.prop, node.op, node.value

        def last(s: Subject) -> bool:
            props = (s.profile.get("last") or {}).get(ev) or {}
            return compare(props.get(pname, _MISSING), op, value)

        return last
    if isinstance(node, SegmentRef):
        sid = node.segment_id
        if resolve_segment is not None:
            return resolve_segment(sid)
        return lambda s: sid in s.segments
    if isinstance(node, Contacted):
        camp, within = node.campaign, node.within
        return lambda s: s.contacted is not None and s.contacted(camp, within)
    raise TypeError(f"not a rule node: {node!r}")


def evaluate(rule: Node | Predicate, profile: Mapping[str, Any], **kw: Any) -> bool:
    """Evaluate a rule (tree or compiled) against one profile projection."""
    pred = rule if callable(rule) else compile_rule(rule)
    return pred(Subject(profile, **kw))


def count_clauses(node: Node) -> int:
    """Leaf clauses of a rule (how rule sizes are quoted in benchmarks)."""
    if isinstance(node, (All, AnyOf)):
        return sum(count_clauses(c) for c in node.children)
    if isinstance(node, Not):
        return count_clauses(node.child)
    return 1


def walk(node: Node) -> Sequence[Node]:
    """Every node of a tree, depth first."""
    out: list[Node] = [node]
    if isinstance(node, (All, AnyOf)):
        for c in node.children:
            out.extend(walk(c))
    elif isinstance(node, Not):
        out.extend(walk(node.child))
    return out
